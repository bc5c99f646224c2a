"""The fit context: every fact about the Trainer that a measured step needs, decided once at fit
start and passed down (the strategy's support, the reduction plan, the effective measuring spec, the
measured parameters, the optimizers and their blocks, the loggers and the run's files), so nothing
below the callback inspects the Trainer again to decide the same thing."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn

from lightning_gradwatch.keys import TOTAL_NORM_KEY, total_norm_key
from lightning_gradwatch.lightning.optimizers import OptimizerSteps, optimizer_steps
from lightning_gradwatch.lightning.run_files import RunFiles, resolve_run_files
from lightning_gradwatch.lightning.strategies import StrategySupport, check_strategy
from lightning_gradwatch.measure.blocks import eager_name
from lightning_gradwatch.measure.probe import GradientProbe
from lightning_gradwatch.measure.record import GradientMeasurement, MeasurementSpec
from lightning_gradwatch.measure.record import measure as measure_record
from lightning_gradwatch.measure.reduction import ReductionPlan, plan_reduction

__all__ = ["FitContext", "build_fit_context", "require_a_logger"]


def require_a_logger(trainer: pl.Trainer) -> None:
    """Raise ``ValueError`` when the Trainer has no logger to write to."""
    if not trainer.loggers:
        raise ValueError(
            "GradientFlowCallback needs a logger to write to, but the Trainer has none "
            "(logger=False). Add one (e.g. TensorBoardLogger) or pass require_logger=False and "
            "read `callback.last`."
        )


@dataclass(frozen=True)
class FitContext:
    """What one fit measures and how, fixed at fit start.

    Attributes:
        blocks: the watched ``(name, module)`` blocks, in forward order.
        spec: the measuring spec as the strategy allows it (``measure_params`` off where ``p.grad``
            is not the gradient).
        plan: how figures combine across ranks.
        support: what the strategy lets the callback measure, and why not the rest.
        params: the measurable ``(name, parameter)`` pairs (none where ``p.grad`` is not the
            gradient), frozen ones included: which of them train is re-read during the fit
            (:meth:`~lightning_gradwatch.lightning.optimizers.OptimizerSteps.track_trainable`).
        steps: the optimizers: names, the parameters and blocks each owns, when each is measured.
        loggers: the Trainer's loggers.
        files: where the run's files go (alert trail, model facts, halt checkpoint), paths or URLs.
        is_global_zero: whether this process writes (loggers, files, messages).
    """

    blocks: list[tuple[str, nn.Module]]
    spec: MeasurementSpec
    plan: ReductionPlan
    support: StrategySupport
    params: list[tuple[str, nn.Parameter]]
    steps: OptimizerSteps
    loggers: list[Logger]
    files: RunFiles
    is_global_zero: bool

    @property
    def block_names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    def batch_starts(self, step: int, epoch: int, every: int) -> bool:
        """A batch starts at global ``step`` of ``epoch``: whether it may hold a measured step (every
        ``every`` steps). Which parameters train is re-read at each epoch's first batch and on
        measured steps (:meth:`OptimizerSteps.track_trainable`)."""
        measured = self.steps.may_be_due(step, every)
        self.steps.track_trainable(epoch, force=measured)
        return measured

    def measure(
        self,
        probe: GradientProbe,
        k: int,
        step: int,
        every: int,
        *,
        scale: Optional[Tensor],
        take_loss: Callable[[], Optional[Tensor]],
    ) -> Optional[GradientMeasurement]:
        """Optimizer ``k``'s step at ``step`` over what it owns, if it is measured (every ``every``
        steps): its block rows of the probe and its parameters' gradients, reduced across ranks and
        copied to the host once (``scale``: the AMP loss scale the block gradients carry;
        ``take_loss``: the step's loss, taken only when measured). Its totals carry the optimizer's
        name when there are several."""
        steps = self.steps
        if not steps.measures(k, step, every):
            return None
        params = steps.params[k]
        if params and all(p.grad is None for _, p in params):
            # training_step returned None: Lightning skipped the backward, there is nothing to
            # measure (figures of no gradient would read as NaN). Under FSDP1 `params` is empty.
            return None
        measurement = measure_record(
            steps.rows(probe.buffer, k),
            [(name, p.grad) for name, p in params if p.grad is not None],
            self.spec,
            self.plan,
            step=step,
            block_names=steps.block_names[k],
            scale=scale,
            loss=take_loss(),
        )
        steps.clear(probe.buffer, k)  # later steps of this batch start afresh
        measurement.chained = [probe.chained[i] for i in steps.blocks[k]]
        name = measurement.optimizer = steps.names[k]
        total = measurement.metrics.pop(TOTAL_NORM_KEY, None) if name is not None else None
        if total is not None:
            measurement.metrics[total_norm_key(name)] = total
        return measurement


def build_fit_context(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    blocks: Sequence[tuple[str, nn.Module]],
    spec: MeasurementSpec,
    rules: Sequence[Any],
    device: torch.device,
    alerts_path: Optional[str] = None,
) -> FitContext:
    """Inspect the Trainer once: strategy (warning once about what it prevents), reduction plan,
    measured parameters, optimizers (``device``: where the probe buffer lives) and the run's files
    (``alerts_path``: the user's, if any)."""
    plan = plan_reduction(trainer)
    support = check_strategy(trainer, plan)
    spec = dataclasses.replace(spec, measure_params=support.params)
    params = [(eager_name(name), p) for name, p in pl_module.named_parameters()]
    params = params if spec.measure_params else []
    return FitContext(
        blocks=list(blocks),
        spec=spec,
        plan=plan,
        support=support,
        params=params,
        steps=optimizer_steps(trainer, blocks, params, device, rules),
        loggers=list(trainer.loggers),
        files=resolve_run_files(trainer, alerts_path),
        is_global_zero=trainer.is_global_zero,
    )
