"""Measuring the gradient noise scale inside a Lightning run (``noise_scale=True``), on measured
steps only; the math is in :mod:`lightning_gradwatch.numerics.noise_scale`.

Two ways to get gradients at two batch sizes:

* **DDP, 2+ ranks** (``B_small`` = this rank's samples in the step, ``B_big`` = all ranks'): a DDP
  communication hook, registered at fit start, adds up ``|bucket.buffer()|^2`` (this rank's local
  gradient, before the all-reduce) over the step's buckets when armed, then finishes with torch's
  ``allreduce_hook``. A user's ``DDPStrategy(ddp_comm_hook=...)`` is wrapped in ``setup`` (before
  Lightning registers it, on CUDA) so both run; a hook registered any other way leaves the figure
  unmeasured, with a warning. Per measured step: one norm pass over the local gradient (inside the
  hook) and one extra ``all_reduce`` of two float64 (the local squared norm and the sample count,
  summed over ranks) plus its host copy.
* **One process, ``accumulate_grad_batches >= 2``** (``B_small`` = a micro-batch, ``B_big`` = the
  step's micro-batches): a tensor hook on every trainable parameter, registered at the first
  micro-batch of a measured step and removed at its optimizer step, adds the squared norm of each
  micro-batch's gradient into a device scalar. Per measured step: one squared-norm kernel per
  parameter per micro-batch, and one host copy.

``|G_big|^2`` is the callback's own ``grad_norm_total`` squared when ``norm_type="l2"`` (no extra
pass); with another norm type, one more batched norm pass over the parameter gradients. Not measured
(one warning at fit start): FSDP, ModelParallelStrategy, DeepSpeed, other multi-process strategies,
manual optimization, and single-process runs without accumulation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

from lightning_gradwatch._compat import loss_scale, set_user_ddp_comm_hook, user_ddp_comm_hook
from lightning_gradwatch.measure.record import GradientMeasurement
from lightning_gradwatch.measure.reduction import ReductionPlan
from lightning_gradwatch.numerics.noise_scale import NoiseScaleEstimator
from lightning_gradwatch.numerics.norms import accumulation_dtype, foreach_partial_norms

__all__ = ["NoiseScaleMonitor"]

_SHARDED = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")
_PREFIX = "GradientFlowCallback(noise_scale=True): the gradient noise scale is not measured"


class NoiseScaleMonitor:
    """Gradient squared norms at two batch sizes on measured steps, folded into a
    :class:`~lightning_gradwatch.numerics.noise_scale.NoiseScaleEstimator`.

    Example::

        monitor = NoiseScaleMonitor(enabled=True)
        monitor.setup(trainer)                                  # Callback.setup
        monitor.start(trainer, pl_module, plan)                 # on_fit_start
        monitor.on_batch_start(trainer, batch, measured=True)   # every micro-batch
        metrics = monitor.update(trainer, measurement, params)  # measured optimizer step
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.mode: Optional[str] = None  # "ddp", "accumulation" or None (not measured)
        self.estimator = NoiseScaleEstimator()
        self._composed = False
        self._armed = False
        self._step = -1
        self._samples = 0
        self._local_sq: Optional[Tensor] = None  # DDP: this rank's |g|^2 summed over buckets
        self._micro: list[Tensor] = []  # accumulation: one |g_k|^2 per micro-batch
        self._sizes: list[int] = []
        self._handles: list[Any] = []

    # -- lifecycle -------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer) -> None:
        """Wrap a user's ``ddp_comm_hook`` before the strategy registers it (Lightning does so on
        CUDA only, during strategy setup, which comes after ``Callback.setup``)."""
        strategy = trainer.strategy
        user_hook = user_ddp_comm_hook(strategy)
        if not self.enabled or not isinstance(strategy, DDPStrategy) or user_hook is None:
            return
        if getattr(user_hook, "_gradwatch_composed", False):
            self._composed = True
            return
        set_user_ddp_comm_hook(strategy, self._compose(user_hook))
        self._composed = True

    def start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, plan: ReductionPlan
    ) -> None:
        """Decide how (or whether) to measure, and register the DDP hook if needed (``plan``: the
        fit's reduction plan, for its data-parallel size)."""
        self.remove()
        self._armed, self._step = False, -1
        self.mode = self._choose_mode(trainer, pl_module, plan) if self.enabled else None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- steps -----------------------------------------------------------------------------------

    def on_batch_start(self, trainer: pl.Trainer, batch: Any, measured: bool) -> None:
        """Count this micro-batch's samples on a measured step; arm at its first micro-batch."""
        if self.mode is None or not measured:
            return
        step = trainer.global_step
        device = trainer.strategy.root_device
        if step != self._step:
            self._step, self._samples, self._armed = step, 0, True
            self._micro, self._sizes = [], []
            self._local_sq = torch.zeros((), dtype=torch.float64, device=device)
            if self.mode == "accumulation":
                self._hook_params(trainer.lightning_module)
        try:
            size = extract_batch_size(batch)
        except Exception as error:  # the same batch structure on every rank: all stop together
            rank_zero_warn(f"{_PREFIX}: cannot tell the batch size ({error}).")
            self.mode, self._armed = None, False
            self.remove()
            return
        self._samples += size
        self._sizes.append(size)
        if self.mode == "accumulation":
            self._micro.append(torch.zeros((), dtype=torch.float64, device=device))

    def update(
        self,
        trainer: pl.Trainer,
        measurement: GradientMeasurement,
        params: Sequence[tuple[str, nn.Parameter]],
    ) -> dict[str, float]:
        """On a measured optimizer step (every rank: DDP adds a collective): the metrics to log."""
        if not self._armed or self._step != measurement.step:
            return {}
        self._armed = False
        self.remove()
        if measurement.skipped_by_scaler:
            return {}
        scale = loss_scale(trainer)
        inv_sq = 1.0 if scale is None else (1.0 / scale.double() ** 2)
        # Lightning divides each micro-batch loss by `accumulate_grad_batches`; a short last step of
        # an epoch has fewer micro-batches: rescale to the gradients of mean losses.
        accumulate = trainer.accumulate_grad_batches
        short = (accumulate / max(len(self._sizes), 1)) ** 2
        big_sq = _big_sq(measurement, params) * short
        if self.mode == "ddp":
            small, b_small, b_big = self._ddp_small(inv_sq)
            small *= short
        else:
            small, b_small, b_big = self._micro_small(inv_sq, accumulate)
        if not b_small < b_big:
            return {}
        return self.estimator.update(small, big_sq, b_small, b_big)

    # -- internals -------------------------------------------------------------------------------

    def _choose_mode(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, plan: ReductionPlan
    ) -> Optional[str]:
        names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        replicas = plan.data_parallel_size
        reason = None
        if not pl_module.automatic_optimization:
            reason = "under manual optimization (the micro-batch structure is yours)"
        elif names & set(_SHARDED):
            reason = f"under {type(trainer.strategy).__name__} (sharded gradients)"
        elif replicas > 1 and isinstance(trainer.strategy.model, DistributedDataParallel):
            return "ddp" if self._register(trainer.strategy.model) else None
        elif replicas > 1:
            reason = f"under {type(trainer.strategy).__name__} (not DDP)"
        elif trainer.accumulate_grad_batches >= 2:
            return "accumulation"
        else:
            reason = "with one process and no gradient accumulation (one batch size only)"
        rank_zero_warn(
            f"{_PREFIX} {reason}. It is measured under DDP with 2+ ranks, or in one process with "
            "accumulate_grad_batches >= 2."
        )
        return None

    def _register(self, model: DistributedDataParallel) -> bool:
        try:
            model.register_comm_hook(None, self._compose(allreduce_hook))
        except RuntimeError as error:  # torch's reducer takes one hook
            if self._composed:  # the strategy registered the user's hook wrapped by `setup`
                return True
            rank_zero_warn(
                f"{_PREFIX}: a DDP communication hook is already registered ({error}). Pass it as "
                "DDPStrategy(ddp_comm_hook=...) so that it can be wrapped."
            )
            return False
        return True

    def _compose(self, hook: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        # No annotations: DDP rejects a hook whose annotations are not the real GradBucket /
        # Future classes, and this module's are strings (`from __future__ import annotations`).
        def measured_hook(state, bucket):  # type: ignore[no-untyped-def]
            if self._armed and self._local_sq is not None:
                # This rank's gradient, before the all-reduce: one norm pass on measured steps.
                values = bucket.buffer()  # one dtype per bucket: float64 under 64-true
                norm = torch.linalg.vector_norm(values, dtype=accumulation_dtype(values.dtype))
                self._local_sq += norm.double().square()
            return hook(state, bucket)

        measured_hook._gradwatch_composed = True  # type: ignore[attr-defined]
        return measured_hook

    def _hook_params(self, module: nn.Module) -> None:
        def hook(grad: Tensor) -> None:
            if self._micro:
                values = grad.coalesce().values() if grad.is_sparse else grad
                dtype = accumulation_dtype(values.dtype)  # never narrower than the gradient
                norm = torch.linalg.vector_norm(values.detach(), dtype=dtype)
                self._micro[-1] += norm.double().square()

        self.remove()  # a step armed but never measured (no gradient at all) left its hooks
        self._handles = [p.register_hook(hook) for p in module.parameters() if p.requires_grad]

    def _ddp_small(self, inv_sq: Any) -> tuple[float, float, float]:
        assert self._local_sq is not None
        both = torch.stack([self._local_sq * inv_sq, self._local_sq.new_tensor(self._samples)])
        dist.all_reduce(both)  # summed over ranks: the one extra collective per measured step
        total_sq, samples = both.tolist()
        ranks = dist.get_world_size()
        return total_sq / ranks, samples / ranks, samples

    def _micro_small(self, inv_sq: Any, accumulate: int) -> tuple[float, float, float]:
        if not self._micro:
            return math.nan, 0.0, 0.0
        # Lightning divides each micro-batch loss by `accumulate`: undo it to get each micro-batch's
        # own mean-loss gradient.
        squares = (torch.stack(self._micro) * inv_sq * accumulate**2).tolist()
        count = len(squares)
        return sum(squares) / count, sum(self._sizes) / count, float(sum(self._sizes))


def _big_sq(measurement: GradientMeasurement, params: Sequence[tuple[str, nn.Parameter]]) -> float:
    """``|G_big|^2``: the measured L2 total norm squared, else one batched pass."""
    if measurement.norm_type == "l2" and measurement.grads_measured:
        return measurement.total_norm**2
    grads = [p.grad for _, p in params if p.grad is not None]
    if not grads:
        return math.nan
    return float(foreach_partial_norms(grads, "l2").double().sum())  # type: ignore[arg-type]
