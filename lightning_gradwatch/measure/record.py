"""One measured step as data: :func:`measure` packs every device-side figure into one vector (its
:class:`~lightning_gradwatch.measure.packing.Packing` is the only code that knows the offsets), has it reduced across ranks
(:mod:`lightning_gradwatch.measure.reduction`), copies it to the host once and turns the floats into a
:class:`GradientMeasurement` with the logged metric keys. :func:`measure_params` is the
parameter-only variant for the every-step governance check.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

from torch import Tensor

from lightning_gradwatch.keys import (
    DEFAULT_EPS,
    GRAD_STAT_KEYS,
    TOTAL_NORM_KEY,
    flow_key,
    gain_key,
    log_gain_key,
    norm_key,
    param_norm_key,
    stats_key,
)
from lightning_gradwatch.measure.packing import Packing
from lightning_gradwatch.measure.probe import CALLS, NUMEL, PARTIAL
from lightning_gradwatch.measure.reduction import ReductionPlan, param_partials, reduce_step
from lightning_gradwatch.numerics.grad_stats import (
    finalize_grad_stats,
    stat_partials_finite,
)
from lightning_gradwatch.numerics.norms import (
    Category,
    NormType,
    classify_gain,
    finalize_norm,
    step_flow,
    validate_norm_type,
)
from lightning_gradwatch.validation import (
    check_param_filter,
    check_positive,
    check_thresholds,
    check_type,
)

ParamFilter = Union[bool, str, Sequence[str]]


@dataclass
class GradientMeasurement:
    """Everything measured at one optimizer step (plain Python floats).

    Attributes:
        step: the optimizer step (``trainer.global_step`` before the update).
        block_names: qualified names of the blocks, in forward order.
        block_norms: norm of dL/d(block output); ``None`` for a block that got no gradient.
        gains: ``block_norms[i-1] / block_norms[i]`` for ``i >= 1`` (keyed by block ``i``).
        log_gains: the log of each gain.
        categories: the :class:`~lightning_gradwatch.numerics.norms.Category` of each transition.
        summary: the gain summary keys (``SUMMARY_KEYS``) plus ``end_to_end_gain``.
        total_norm: the norm over all parameter gradients.
        param_norms: the gradient norms of the parameters ``log_param_norms`` selects, only those.
        grads_measured: parameter gradients measured (0: none, so no total norm); of them,
            ``nonfinite_params`` hold a NaN/Inf and ``zero_grad_params`` are exactly zero.
        grad_stats: ``mean``, ``std``, ``min``, ``max``, ``zero_fraction``, ``large_fraction``,
            ``nonfinite_count`` over all parameter-gradient elements (empty when disabled).
        metrics: the flat dict handed to the loggers.
        skipped_by_scaler: the AMP GradScaler found inf/NaN parameter gradients and skips this
            optimizer step (the scaler doing its job): the callback does not log it (unless a rule
            halts training).
        chained: per block, whether its input was block ``i - 1``'s output tensor itself (nothing
            in between), as seen by the probe in this step's forward (empty: unknown).
        optimizer: with several optimizers, the name of the one stepping (its parameters and
            blocks are what was measured); ``None`` with one.
        loss: the step's training loss as governance reads it (``None``: not read), copied to the
            host with the rest.
    """

    step: int
    norm_type: str
    block_names: list[str]
    block_norms: list[Optional[float]]
    gains: list[Optional[float]]
    log_gains: list[Optional[float]]
    categories: list[Category]
    summary: dict[str, float]
    total_norm: float
    param_norms: dict[str, float]
    grad_stats: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)
    grads_measured: int = 0
    nonfinite_params: list[str] = field(default_factory=list)
    zero_grad_params: list[str] = field(default_factory=list)
    skipped_by_scaler: bool = False
    chained: list[bool] = field(default_factory=list)
    optimizer: Optional[str] = None
    loss: Optional[float] = None

    def norms_of(self, names: Sequence[str]) -> list[Optional[float]]:
        """The block norms in the order of ``names`` (``None`` for a block this step did not
        measure: with several optimizers a step measures its optimizer's blocks only)."""
        measured = dict(zip(self.block_names, self.block_norms))
        return [measured.get(name) for name in names]

    @property
    def nonfinite_blocks(self) -> list[str]:
        """Blocks whose output gradient had a NaN or Inf, in forward order."""
        return [
            name
            for name, norm in zip(self.block_names, self.block_norms)
            if norm is not None and not math.isfinite(norm)
        ]


@dataclass(frozen=True)
class MeasurementSpec:
    """How to turn gradients into figures (the measuring arguments of the callback)."""

    norm_type: NormType = "l2"
    eps: float = DEFAULT_EPS
    damping_threshold: float = 0.5
    amplifying_threshold: float = 2.0
    large_threshold: float = 1.0
    grad_stats: bool = True
    log_param_norms: ParamFilter = False
    #: False where ``p.grad`` is not the gradient (FSDP1, DeepSpeed): parameter figures are left out.
    measure_params: bool = True

    @classmethod
    def from_arguments(
        cls,
        norm_type: object,
        eps: object,
        damping_threshold: object,
        amplifying_threshold: object,
        large_threshold: object,
        log_grad_stats: object,
        log_param_norms: object,
    ) -> MeasurementSpec:
        """The callback's measuring arguments of these names, validated (``TypeError`` or
        ``ValueError`` naming the argument and what it allows)."""
        low, high = check_thresholds(damping_threshold, amplifying_threshold)
        return cls(
            norm_type=validate_norm_type(norm_type),
            eps=check_positive(eps, "eps"),
            damping_threshold=low,
            amplifying_threshold=high,
            large_threshold=check_positive(large_threshold, "large_threshold"),
            grad_stats=check_type(log_grad_stats, bool, "log_grad_stats"),
            log_param_norms=check_param_filter(log_param_norms),
        )

    def logs_param(self, name: str) -> bool:
        if isinstance(self.log_param_norms, bool):
            return self.log_param_norms
        patterns = (
            [self.log_param_norms]
            if isinstance(self.log_param_norms, str)
            else list(self.log_param_norms)
        )
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def measure(
    block_rows: Tensor,
    named_grads: Sequence[tuple[str, Tensor]],
    spec: MeasurementSpec,
    plan: ReductionPlan,
    *,
    step: int,
    block_names: Sequence[str],
    scale: Optional[Tensor] = None,
    loss: Optional[Tensor] = None,
) -> GradientMeasurement:
    """One measured step: pack block rows and parameter figures, reduce them across ranks, copy
    them to the host once (twice where a NaN/Inf makes the statistics be counted again) and build
    the :class:`GradientMeasurement`.

    Args:
        block_rows: the probe's ``(n, 3)`` buffer for this step.
        named_grads: ``(name, p.grad)`` of every parameter with a gradient.
        spec: what to measure.
        plan: how figures combine across ranks.
        step: the optimizer step.
        block_names: the blocks' names, in the order of ``block_rows``.
        scale: the AMP loss scale the block gradients carry (a device scalar), if any.
        loss: the step's loss (a device scalar) to copy to the host with the figures, if any.
    """
    grads = [grad for _, grad in named_grads]
    stats = spec.grad_stats and spec.measure_params
    packing = Packing(
        len(block_names), len(grads), stats=stats, scaled=scale is not None, loss=loss is not None
    )
    # The cheap statistics pass: recounted below where it cannot be trusted.
    rows, partials, stat_row = reduce_step(
        block_rows, grads, spec.norm_type, plan, stats=stats, large_threshold=spec.large_threshold
    )
    values = packing.pack(rows, partials, stat_row, scale, loss).tolist()  # the one host copy
    if stats and not stat_partials_finite(values[packing.grad_stats]):
        # A NaN/Inf somewhere, which the cheap statistics pass cannot count: count exactly. Every
        # rank sees the same combined sum, so every rank takes this branch (and its collective).
        _, exact = param_partials(
            grads,
            spec.norm_type,
            stats=True,
            large_threshold=spec.large_threshold,
            assume_finite=False,
        )
        values[packing.grad_stats] = exact.tolist()  # type: ignore[union-attr]
    measurement = build_measurement(
        values,
        packing,
        step=step,
        block_names=block_names,
        param_names=[name for name, _ in named_grads],
        param_numels=[grad.numel() for grad in grads],
        spec=spec,
        replicas=plan.data_parallel_size,
    )
    # The AMP scaler skips the step exactly when an unscaled parameter gradient is inf/NaN.
    measurement.skipped_by_scaler = scale is not None and not _all_finite(measurement)
    return measurement


def measure_params(
    named_grads: Sequence[tuple[str, Tensor]],
    spec: MeasurementSpec,
    *,
    step: int,
    loss: Optional[Tensor] = None,
) -> GradientMeasurement:
    """The parameter-only variant of :func:`measure` for the every-step governance check: total
    and per-parameter norms in one batched pass and one host copy (no block rows, no statistics),
    with ``loss`` (a device scalar) in the same copy if given."""
    grads = [grad for _, grad in named_grads]
    packing = Packing(0, len(grads), loss=loss is not None)
    partials, _ = param_partials(
        grads, spec.norm_type, stats=False, large_threshold=spec.large_threshold, assume_finite=True
    )
    if not grads and loss is not None:
        partials = partials.to(loss.device)  # nothing to measure: the copy is the loss's
    values = packing.pack(partials.new_zeros(0, 3), partials, None, None, loss).tolist()
    return build_measurement(
        values,
        packing,
        step=step,
        block_names=[],
        param_names=[name for name, _ in named_grads],
        param_numels=[grad.numel() for grad in grads],
        spec=dataclasses.replace(spec, grad_stats=False, log_param_norms=False),
    )


def build_measurement(
    values: Sequence[float],
    packing: Packing,
    *,
    step: int,
    block_names: Sequence[str],
    param_names: Sequence[str],
    param_numels: Sequence[int],
    spec: MeasurementSpec,
    replicas: int = 1,
) -> GradientMeasurement:
    """The :class:`GradientMeasurement` of the host copy of a :class:`Packing`'s vector.

    Block norms are divided by the packed loss scale and by ``replicas``, the number of
    data-parallel ranks whose gradients the strategy averages (see
    :mod:`lightning_gradwatch.lightning.strategies`).
    """
    scale = packing.scale(values) * replicas
    block_norms: list[Optional[float]] = [
        finalize_norm(row[PARTIAL], row[NUMEL], spec.norm_type, scale) if row[CALLS] > 0 else None
        for row in packing.rows(values)
    ]
    partials = values[packing.params]
    param_norms = {
        name: finalize_norm(partial, numel, spec.norm_type)
        for name, partial, numel in zip(param_names, partials, param_numels)
        if spec.log_param_norms is not False and spec.logs_param(name)
    }
    lo, hi = spec.damping_threshold, spec.amplifying_threshold
    # No blocks (a model without any, or an optimizer owning none): no flow to summarise.
    gains, log_gains, summary = (
        step_flow(block_norms, spec.eps, lo, hi) if block_norms else ([], [], {})
    )
    measurement = GradientMeasurement(
        step=step,
        norm_type=spec.norm_type,
        block_names=list(block_names),
        block_norms=block_norms,
        gains=gains,
        log_gains=log_gains,
        categories=[classify_gain(gain, lo, hi) for gain in gains],
        summary=summary,
        total_norm=_total_norm(partials, param_numels, spec.norm_type),
        param_norms=param_norms,
        grads_measured=len(partials),
        # Of every parameter (a partial, sum of |g|^p or max, is 0 / non-finite as its norm is).
        nonfinite_params=[n for n, p in zip(param_names, partials) if not math.isfinite(p)],
        zero_grad_params=[n for n, p in zip(param_names, partials) if p == 0.0],
        grad_stats=finalize_grad_stats(values[packing.grad_stats]) if packing.stats else {},
        loss=packing.loss_value(values),
    )
    measurement.metrics = to_metrics(measurement, spec)
    return measurement


def _all_finite(measurement: GradientMeasurement) -> bool:
    figures = [measurement.total_norm] if measurement.grads_measured else measurement.block_norms
    return all(value is None or math.isfinite(value) for value in figures)


def _total_norm(partials: Sequence[float], numels: Sequence[int], norm_type: NormType) -> float:
    if not partials:
        return math.nan
    if norm_type == "linf":
        return max(partials) if all(not math.isnan(p) for p in partials) else math.nan
    return finalize_norm(sum(partials), float(sum(numels)), norm_type)


def to_metrics(measurement: GradientMeasurement, spec: MeasurementSpec) -> dict[str, float]:
    """The flat ``{key: value}`` dict of the README's metric table (missing blocks are left out)."""
    metrics: dict[str, float] = {}
    names = measurement.block_names
    for name, norm in zip(names, measurement.block_norms):
        if norm is not None:
            metrics[norm_key(name)] = norm
    for name, gain, log_gain in zip(names[1:], measurement.gains, measurement.log_gains):
        if gain is not None and log_gain is not None:
            metrics[gain_key(name)] = gain
            metrics[log_gain_key(name)] = log_gain
    if spec.measure_params:
        metrics[TOTAL_NORM_KEY] = measurement.total_norm
    for name, norm in measurement.param_norms.items():  # the selected ones only
        metrics[param_norm_key(name)] = norm
    for key, value in measurement.summary.items():
        metrics[flow_key(key)] = float(value)
    for key in GRAD_STAT_KEYS:
        if key in measurement.grad_stats:
            metrics[stats_key(key)] = measurement.grad_stats[key]
    return metrics
