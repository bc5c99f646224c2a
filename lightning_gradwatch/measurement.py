"""One measured step as data: pack every device-side figure into one vector, copy it to the host once,
and turn the floats into a :class:`GradientMeasurement` with the logged metric keys.

The packed vector is ``[block rows (n x 3) | parameter partials (m) | grad-stat partials (8) | scale]``
so that a distributed reduction (see :mod:`lightning_gradwatch.distributed`) and the host copy each
happen exactly once per measured step.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

from lightning_gradwatch.norms import (
    GRAD_STAT_KEYS,
    N_STAT_PARTIALS,
    Category,
    NormType,
    classify_gain,
    compute_gains,
    compute_log_gains,
    end_to_end_gain,
    finalize_grad_stats,
    finalize_norm,
    summarize_gains,
)
from lightning_gradwatch.probe import CALLS, NUMEL, PARTIAL

ParamFilter = Union[bool, str, Sequence[str]]


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


@dataclass
class GradientMeasurement:
    """Everything measured at one optimizer step (plain Python floats).

    Attributes:
        step: the optimizer step (``trainer.global_step`` before the update).
        block_names: qualified names of the blocks, in forward order.
        block_norms: norm of dL/d(block output); ``None`` for a block that got no gradient.
        gains: ``block_norms[i-1] / block_norms[i]`` for ``i >= 1`` (keyed by block ``i``).
        log_gains: the log of each gain.
        categories: the :class:`~lightning_gradwatch.norms.Category` of each transition.
        summary: the seed-001 summary keys plus ``end_to_end_gain``.
        total_norm: the norm over all parameter gradients.
        param_norms: per-parameter gradient norms.
        grad_stats: ``mean``, ``std``, ``min``, ``max``, ``zero_fraction``, ``large_fraction``,
            ``nonfinite_count`` over all parameter-gradient elements (empty when disabled).
        metrics: the flat dict handed to the loggers.
        skipped_by_scaler: the AMP GradScaler found inf/NaN parameter gradients and skips this
            optimizer step (the scaler doing its job): the callback does not log it (unless a rule
            halts training).
        chained: per block, whether its input was block ``i - 1``'s output tensor itself (nothing
            in between), as seen by the probe in this step's forward (empty: unknown).
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
    skipped_by_scaler: bool = False
    chained: list[bool] = field(default_factory=list)

    @property
    def nonfinite_blocks(self) -> list[str]:
        """Blocks whose output gradient had a NaN or Inf, in forward order."""
        return [
            name
            for name, norm in zip(self.block_names, self.block_norms)
            if norm is not None and not math.isfinite(norm)
        ]


@dataclass
class MeasurementSpec:
    """How to turn gradients into figures (the measuring arguments of the callback)."""

    norm_type: NormType = "l2"
    eps: float = 1e-30
    damping_threshold: float = 0.5
    amplifying_threshold: float = 2.0
    large_threshold: float = 1.0
    grad_stats: bool = True
    log_param_norms: ParamFilter = False
    #: False where ``p.grad`` is not the gradient (FSDP1, DeepSpeed): parameter figures are left out.
    measure_params: bool = True

    def logs_param(self, name: str) -> bool:
        if isinstance(self.log_param_norms, bool):
            return self.log_param_norms
        patterns = (
            [self.log_param_norms]
            if isinstance(self.log_param_norms, str)
            else list(self.log_param_norms)
        )
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def pack(
    block_rows: Tensor,
    param_partials: Tensor,
    stat_row: Optional[Tensor],
    scale: Optional[Tensor] = None,
) -> Tensor:
    """All device-side figures of one step in one float64 vector (no host sync).

    ``block_rows`` and ``param_partials`` (and ``stat_row``, when the statistics are measured) are
    already combined across ranks (see :mod:`lightning_gradwatch.distributed`).
    """
    device = block_rows.device
    parts = [block_rows.reshape(-1).double(), param_partials.to(device).double()]
    if stat_row is not None:
        parts.append(stat_row.to(device).double())
    scale_value = (
        torch.ones(1, dtype=torch.float64, device=device)
        if scale is None
        else scale.detach().reshape(1).to(device=device, dtype=torch.float64)
    )
    parts.append(scale_value)
    return torch.cat(parts)


def stats_slice(num_blocks: int, num_params: int) -> slice:
    """Where :func:`pack` puts the :func:`~lightning_gradwatch.norms.grad_stat_partials` row."""
    start = 3 * num_blocks + num_params
    return slice(start, start + N_STAT_PARTIALS)


def unpack(
    values: Sequence[float],
    *,
    step: int,
    block_names: Sequence[str],
    param_names: Sequence[str],
    param_numels: Sequence[int],
    spec: MeasurementSpec,
    replicas: int = 1,
) -> GradientMeasurement:
    """Build the :class:`GradientMeasurement` from the host copy of :func:`pack`'s vector.

    Block norms are divided by the packed loss scale and by ``replicas``, the number of
    data-parallel ranks whose gradients the strategy averages (see
    :mod:`lightning_gradwatch.strategies`).
    """
    n, m = len(block_names), len(param_names)
    scale = (values[-1] if values[-1] > 0 else 1.0) * replicas
    rows = [values[3 * i : 3 * i + 3] for i in range(n)]
    block_norms: list[Optional[float]] = [
        finalize_norm(row[PARTIAL], row[NUMEL], spec.norm_type, scale) if row[CALLS] > 0 else None
        for row in rows
    ]
    partials = values[3 * n : 3 * n + m]
    param_norms = {
        name: finalize_norm(partial, numel, spec.norm_type)
        for name, partial, numel in zip(param_names, partials, param_numels)
    }
    total_norm = _total_norm(partials, param_numels, spec.norm_type)
    grad_stats = (
        finalize_grad_stats(values[stats_slice(n, m)])
        if spec.grad_stats and spec.measure_params
        else {}
    )
    gains = compute_gains(block_norms, spec.eps)
    log_gains = compute_log_gains(block_norms, spec.eps)
    lo, hi = spec.damping_threshold, spec.amplifying_threshold
    summary = summarize_gains(gains, log_gains, lo, hi)
    summary["end_to_end_gain"] = end_to_end_gain(block_norms, spec.eps)
    measurement = GradientMeasurement(
        step=step,
        norm_type=spec.norm_type,
        block_names=list(block_names),
        block_norms=block_norms,
        gains=gains,
        log_gains=log_gains,
        categories=[classify_gain(gain, lo, hi) for gain in gains],
        summary=summary,
        total_norm=total_norm,
        param_norms=param_norms,
        grad_stats=grad_stats,
    )
    measurement.metrics = to_metrics(measurement, spec)
    return measurement


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
            metrics[f"grad_norm/{name}"] = norm
    for name, gain, log_gain in zip(names[1:], measurement.gains, measurement.log_gains):
        if gain is not None and log_gain is not None:
            metrics[f"grad_gain/{name}"] = gain
            metrics[f"grad_log_gain/{name}"] = log_gain
    if spec.measure_params:
        metrics["grad_norm_total"] = measurement.total_norm
    if spec.log_param_norms is not False:  # off by default: no walk over every parameter
        for name, norm in measurement.param_norms.items():
            if spec.logs_param(name):
                metrics[f"grad_param_norm/{name}"] = norm
    for key, value in measurement.summary.items():
        metrics[f"grad_flow/{key}"] = float(value)
    for key in GRAD_STAT_KEYS:
        if key in measurement.grad_stats:
            metrics[f"grad_stats/{key}"] = measurement.grad_stats[key]
    return metrics
