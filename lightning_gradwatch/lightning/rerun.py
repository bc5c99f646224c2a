"""Rerun attribution (``Rule(..., rerun=True)``): when such a rule trips, the step's forward and
backward run again on every rank, before the decision is applied, and the figures are compared with
the first execution's. The same figures again mean the data or the model state caused the trip
(``"reproducible"``); different ones mean hardware or non-determinism (``"transient"``).

How: each micro-batch of the step (the references :class:`~.batches.StepBatches` kept) goes through
``training_step`` again with the torch RNG state (CPU, and the current CUDA device's) of its start
restored, under the precision plugin's context, on the bare LightningModule (under DDP: not through
the DDP wrapper, so no collective runs), with ``self.log`` silenced. Gradients come from
``torch.autograd.grad`` into temporary buffers: the step's own ``.grad`` is untouched. The block
outputs are measured by a temporary probe while the callback's own is disarmed. Afterwards module
buffers (BatchNorm running statistics) and the RNG state are put back as they were, so the run goes
on exactly as without the rerun. Compared, per rank and with :data:`RTOL` (:data:`RTOL_16BIT` under
16-bit precision): the loss, each measured block's local output-gradient norm and, in one process,
the total parameter-gradient norm. One ``all_gather`` of 8 floats per rank then tells every rank
the verdict of the others.

Cost, on trips of such rules only: one more forward and backward per micro-batch, the memory of one
set of gradients, a few host syncs. Unavailable (said in the record, never guessed): manual
optimization, strategies whose forward runs collectives (FSDP, ModelParallelStrategy, DeepSpeed,
SyncBatchNorm), a ``training_step`` that returns no loss, or a rerun that raises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_gradwatch._compat import loss_scale
from lightning_gradwatch.governance.evidence import RankEvidence, block_figures
from lightning_gradwatch.lightning.batches import StepBatches
from lightning_gradwatch.lightning.rerun_exec import execute_again
from lightning_gradwatch.measure.probe import GradientProbe
from lightning_gradwatch.numerics.norms import NormType

__all__ = ["RTOL", "RTOL_16BIT", "Execution", "StepRerun", "rerun_unavailable"]

#: Relative tolerance of "the same figure" (plus 1e-12 absolute): reruns on the same device with the
#: same RNG state are usually bit-identical; this leaves room for non-deterministic reduction order.
RTOL = 1e-4
#: The same under 16-bit precision (fp16/bf16 autocast or weights).
RTOL_16BIT = 1e-2
_ATOL = 1e-12
_STATUS = ("reproducible", "transient", "unavailable")
_FIGURES = ("loss", "grad_norm", "param_norm")


@dataclass
class Execution:
    """One execution's local figures of a step on this rank."""

    loss: Optional[float] = None
    block_norms: dict[str, Optional[float]] = field(default_factory=dict)
    grad_norm: Optional[float] = None  # every measured block's output gradient together
    param_norm: Optional[float] = None  # the parameter gradients' total norm


def rerun_unavailable(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[str]:
    """Why this fit's steps cannot be rerun (``None``: they can)."""
    if not pl_module.automatic_optimization:
        return (
            "manual optimization: training_step runs its own backward and optimizer steps, "
            "which a rerun would repeat"
        )
    names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
    for name in ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"):
        if name in names:
            return f"{name} runs collectives inside the forward, which one rank cannot repeat alone"
    if trainer.world_size > 1 and "DDPStrategy" not in names:
        return f"{type(trainer.strategy).__name__}: the rerun supports one process and DDP only"
    if any(isinstance(module, nn.SyncBatchNorm) for module in pl_module.modules()):
        return "SyncBatchNorm all-reduces inside the forward, which one rank cannot repeat alone"
    return None


class StepRerun:
    """Reruns a tripped step on every rank and returns the record of the verdict.

    Example::

        rerun = StepRerun()
        rerun.start(trainer, pl_module)  # on_fit_start: what the strategy allows
        record = rerun.run(trainer, pl_module, batches, probe, blocks, params, first, "l2")
    """

    def __init__(self) -> None:
        self.reason: Optional[str] = None
        self.tolerance = RTOL

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.reason = rerun_unavailable(trainer, pl_module)
        self.tolerance = RTOL_16BIT if "16" in str(trainer.precision) else RTOL

    def run(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batches: StepBatches,
        probe: Optional[GradientProbe],
        blocks: Sequence[tuple[str, nn.Module]],
        params: Sequence[tuple[str, nn.Parameter]],
        first: Execution,
        norm_type: NormType,
    ) -> dict[str, Any]:
        """Rerun the step on this rank, compare, and agree with the other ranks (call on every
        rank at the same step)."""
        reason = self.reason
        second = Execution()
        if reason is None and (not batches.batches or len(batches.rng) != len(batches.batches)):
            reason = "the step's batches or their RNG state were not kept"
        if reason is None:
            try:
                second = self._execute(
                    trainer, pl_module, batches, probe, blocks, params, norm_type
                )
            except Exception as error:  # whatever the model raises: a record, never a crash
                reason = f"the rerun raised {type(error).__name__}: {error}"
        status = 2 if reason is not None else int(not self._same(first, second))
        if reason is None and first.loss is None and not first.block_norms:
            status, reason = 2, "no figure of the first execution to compare with"
        return self._combine(trainer, status, first, second, reason)

    def _execute(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batches: StepBatches,
        probe: Optional[GradientProbe],
        blocks: Sequence[tuple[str, nn.Module]],
        params: Sequence[tuple[str, nn.Parameter]],
        norm_type: NormType,
    ) -> Execution:
        scale = loss_scale(trainer)
        loss, rows, param_norm = execute_again(
            trainer, pl_module, batches, probe, blocks, params, norm_type, scale
        )
        names = [name for name, _ in blocks]
        scale_value = 1.0 if scale is None else float(scale)
        norms, grad_norm = block_figures(rows.reshape(-1).tolist(), names, norm_type, scale_value)
        return Execution(loss=loss, block_norms=norms, grad_norm=grad_norm, param_norm=param_norm)

    def _same(self, first: Execution, second: Execution) -> bool:
        pairs = [(first.loss, second.loss), (first.param_norm, second.param_norm)]
        pairs += [(v, second.block_norms.get(k)) for k, v in first.block_norms.items()]
        return all(
            _close(a, b, self.tolerance) for a, b in pairs if a is not None and b is not None
        )

    def _combine(
        self,
        trainer: pl.Trainer,
        status: int,
        first: Execution,
        second: Execution,
        reason: Optional[str],
    ) -> dict[str, Any]:
        """Every rank's status and figures (one ``all_gather`` with several ranks)."""
        values = [getattr(run, name) for name in _FIGURES for run in (first, second)]
        present = sum(1 << i for i, value in enumerate(values) if value is not None)
        row = [float(status), float(present), *(_float(value) for value in values)]
        if trainer.world_size > 1:
            sent = torch.tensor(row, dtype=torch.float64, device=trainer.strategy.root_device)
            rows = trainer.strategy.all_gather(sent).reshape(trainer.world_size, -1).tolist()
        else:
            rows = [row]
        codes = [int(r[0]) for r in rows]
        figures = [_values(r) for r in rows]
        transient = [rank for rank, code in enumerate(codes) if code == 1]
        missing = [rank for rank, code in enumerate(codes) if code == 2]
        record: dict[str, Any] = {
            "verdict": _STATUS[1] if transient else _STATUS[2] if missing else _STATUS[0],
            "ranks": transient or missing,
            "first": {name: [f[2 * i] for f in figures] for i, name in enumerate(_FIGURES)},
            "rerun": {name: [f[2 * i + 1] for f in figures] for i, name in enumerate(_FIGURES)},
            "tolerance": self.tolerance,
        }
        if record["verdict"] == "unavailable":
            record["reason"] = reason or f"rank(s) {missing} could not rerun the step"
        return record


def _close(a: float, b: float, rtol: float) -> bool:
    if not (math.isfinite(a) and math.isfinite(b)):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return abs(a - b) <= rtol * max(abs(a), abs(b)) + _ATOL


def _float(value: Optional[float]) -> float:
    return math.nan if value is None else float(value)


def _values(row: Sequence[float]) -> list[Optional[float]]:
    """A gathered row's figures, ``None`` where the rank had none (NaN stays NaN)."""
    present = int(row[1])
    return [value if present >> i & 1 else None for i, value in enumerate(row[2:])]


def first_execution(evidence: Optional[RankEvidence], param_norm: Optional[float]) -> Execution:
    """The first execution's figures on this rank: its evidence (loss, block rows before the
    reduction) and, where ``p.grad`` is still this rank's own, the total parameter-gradient norm."""
    if evidence is None:
        return Execution(param_norm=param_norm)
    return Execution(
        loss=evidence.loss,
        block_norms=dict(evidence.block_norms),
        grad_norm=evidence.grad_norm,
        param_norm=param_norm,
    )
