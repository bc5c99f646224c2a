"""What the Trainer's strategy and precision mean for the figures, decided once at fit start.

Three facts shape a measurement:

* **Where parameter gradients live.** ``p.grad`` holds the full gradient under single-device and
  DDP (already all-reduced), and a DTensor under ``ModelParallelStrategy`` (FSDP2, HSDP, tensor
  parallelism), whose partials are combined over the mesh dims it is split on (see
  :mod:`lightning_gradwatch.measure.reduction`). Under FSDP1 (``FSDPStrategy``, sharded) ``p.grad`` is a view
  into a flat shard that may be missing on some ranks, and DeepSpeed keeps gradients in its own
  partitioned buffers: there the parameter figures are *not measured* (a warning says so) instead of
  being silently wrong.
* **Data parallelism.** Each rank back-propagates its own loss, but the strategy averages parameter
  gradients over the ``N`` data-parallel ranks, i.e. it optimizes ``(1/N) * sum of the rank losses``.
  The gradient of that objective at rank r's block output is the tensor hook's gradient divided by
  ``N``; combined over ranks this gives exactly the figures of a single process on the global batch.
* **Loss scaling.** With an AMP ``GradScaler`` tensor hooks see ``scale * gradient`` while parameter
  gradients are unscaled before ``on_before_optimizer_step`` (not for optimizers that unscale inside
  their own ``step()``, e.g. ``fused=True``: a warning says their parameter figures are scaled).

Block norms are divided by both: the scale is packed as a device scalar (no host sync), the
data-parallel size is a host integer applied after the single host copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_gradwatch._compat import (
    optimizer_unscales_in_step,
    scaler_enabled,
    torch_feature_gaps,
)
from lightning_gradwatch.measure.reduction import ReductionPlan, plan_reduction

#: FSDP1 sharding strategies under which ``p.grad`` holds the full gradient on every rank.
_FSDP1_UNSHARDED = ("NO_SHARD",)


@dataclass(frozen=True)
class StrategySupport:
    """What can be measured under the Trainer's strategy.

    Attributes:
        params: parameter figures (``grad_norm_total``, ``grad_param_norm/*``, ``grad_stats/*``) are
            measured.
        reasons: why something is not measured, one sentence each (also emitted as warnings).
    """

    params: bool = True
    reasons: tuple[str, ...] = ()


def check_strategy(trainer: pl.Trainer, plan: Optional[ReductionPlan] = None) -> StrategySupport:
    """Decide what is measurable under ``trainer.strategy`` and warn (once, on rank 0) about the rest.

    Example::

        support = check_strategy(trainer)
        if not support.params:
            ...  # log block-output figures only
    """
    strategy = trainer.strategy
    names = {cls.__name__ for cls in type(strategy).__mro__}
    reasons: list[str] = []
    params = True
    if "DeepSpeedStrategy" in names:
        params = False
        reasons.append(
            "DeepSpeedStrategy keeps gradients in DeepSpeed's own (partitioned) buffers, so `p.grad` "
            "is not the gradient: grad_norm_total, grad_param_norm/* and grad_stats/* are not "
            "measured; block-output figures (grad_norm/*, grad_gain/*, grad_flow/*) are."
        )
        if str(trainer.precision).startswith("16"):
            reasons.append(
                "DeepSpeed fp16 scales the loss inside its engine: block-output norms include that "
                "loss scale (gains and log-gains, being ratios, do not)."
            )
    elif "FSDPStrategy" in names and _fsdp1_sharding(strategy) not in _FSDP1_UNSHARDED:
        params = False
        reasons.append(
            "FSDPStrategy (FSDP1) shards parameter gradients into flat buffers (`p.grad` is a local "
            "slice, or None on ranks that hold none of it): grad_norm_total, grad_param_norm/* and "
            "grad_stats/* are not measured; block-output figures are. Use ModelParallelStrategy with "
            "fully_shard (FSDP2) to measure parameter gradients too."
        )
    replicas = (plan or plan_reduction(trainer)).data_parallel_size
    plain = _plain_parameters(trainer) if "ModelParallelStrategy" in names and replicas > 1 else []
    if plain:
        shown = ", ".join(plain[:5]) + (", ..." if len(plain) > 5 else "")
        reasons.append(
            f"ModelParallelStrategy with {replicas} data-parallel ranks, but "
            f"{len(plain)} trainable parameter(s) are plain tensors, not DTensors ({shown}): "
            "nothing synchronizes their gradients over the data-parallel ranks (expert weights "
            "held per rank, modules left out of fully_shard), so their figures are this rank's "
            "only and grad_norm_total is not the global one. Apply fully_shard to them."
        )
    if scaler_enabled(trainer) and any(
        optimizer_unscales_in_step(optimizer) for optimizer in trainer.optimizers
    ):
        reasons.append(
            "an optimizer unscales gradients inside its own step() (e.g. fused=True) under a "
            "GradScaler: parameter figures (grad_norm_total, grad_param_norm/*, grad_stats/*) "
            "include the loss scale; block-output figures and gains do not."
        )
    reasons += torch_feature_gaps(getattr(trainer, "lightning_module", None))
    for reason in reasons:
        rank_zero_warn(f"GradientFlowCallback: {reason}")
    return StrategySupport(params=params, reasons=tuple(reasons))


def _plain_parameters(trainer: pl.Trainer) -> list[str]:
    """Trainable non-DTensor parameters of the model (nothing synchronizes their gradients when
    several data-parallel ranks train it)."""
    module = trainer.lightning_module
    if module is None:
        return []
    return [
        name
        for name, p in module.named_parameters()
        if p.requires_grad and not hasattr(p, "placements")
    ]


def _fsdp1_sharding(strategy: Any) -> str:
    sharding = getattr(strategy, "sharding_strategy", None)
    return str(getattr(sharding, "name", sharding))
