"""Pure gradient math: norm kinds, batched norms, gains, log-gains, categories, summary statistics.

Nothing here knows about hooks or Lightning. Device-side functions return *partial* reductions that can
be combined across micro-batches and ranks (sum of squares for L2, sum of absolute values for L1 and
mean, maximum for L-inf); host-side functions work on plain Python floats after the single
device-to-host copy of a measured step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from enum import Enum
from typing import Literal, Optional

import torch
from torch import Tensor

from lightning_gradwatch._compat import foreach_norm
from lightning_gradwatch.keys import DEFAULT_EPS, END_TO_END_KEY

NormType = Literal["l2", "l1", "linf", "mean"]
NORM_TYPES: tuple[str, ...] = ("l2", "l1", "linf", "mean")

_ORD = {"l2": 2.0, "l1": 1.0, "linf": math.inf, "mean": 1.0}


class Category(str, Enum):
    """How a backward transition changes the gradient norm (thresholds are heuristics)."""

    AMPLIFYING = "amplifying"
    DAMPING = "damping"
    HEALTHY = "healthy"
    VANISHING = "vanishing"
    MISSING = "missing"

    def __str__(self) -> str:  # "damping", not "Category.DAMPING", in messages and f-strings
        return self.value


def validate_norm_type(norm_type: object, argument: str = "norm_type") -> NormType:
    """Return ``norm_type`` if it is one of :data:`NORM_TYPES`, else raise a ``ValueError``."""
    if not isinstance(norm_type, str) or norm_type not in NORM_TYPES:
        raise ValueError(f"`{argument}` must be one of {list(NORM_TYPES)}, got {norm_type!r}.")
    return norm_type  # type: ignore[return-value]


def combines_by_max(norm_type: NormType) -> bool:
    """Whether partials of ``norm_type`` combine by maximum (L-inf) rather than by sum."""
    return norm_type == "linf"


# --------------------------------------------------------------------------------------------------
# Device side: partial reductions (no host sync)
# --------------------------------------------------------------------------------------------------


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype every figure of tensors of ``dtypes`` is accumulated in: float64 where any of them
    is float64, float32 otherwise (float32 itself and the half types, whose squares overflow and
    whose sums lose digits in their own dtype).

    The one place that decides it: never narrower than a gradient (``vector_norm`` refuses a
    narrowing ``dtype=``, and a float64 run's figures must keep float64 accuracy), never float64
    without need (slow on most accelerators, absent on some).

    Example::

        accumulation_dtype(torch.bfloat16)                 # torch.float32
        accumulation_dtype(torch.float32, torch.float64)   # torch.float64
    """
    return torch.float64 if torch.float64 in dtypes else torch.float32


def partial_norm(grad: Tensor, norm_type: NormType) -> Tensor:
    """The combinable partial of ``grad``'s norm as a 0-dim tensor on ``grad``'s device, in
    :func:`accumulation_dtype` of ``grad``'s dtype.

    L2 gives the sum of squares, L1 and mean the sum of absolute values, L-inf the maximum absolute value.
    """
    dtype = accumulation_dtype(grad.dtype)
    value = torch.linalg.vector_norm(grad.detach(), _ORD[norm_type], dtype=dtype)
    return value * value if norm_type == "l2" else value


def foreach_partial_norms(grads: Sequence[Tensor], norm_type: NormType) -> Tensor:
    """Partials (see :func:`partial_norm`) of many tensors in one batched pass per (device, dtype).

    Returns a vector on the first tensor's device in :func:`accumulation_dtype` of all their dtypes
    (the widest: float64 where any gradient is float64), in the order of ``grads``.
    """
    out_dtype = accumulation_dtype(*{grad.dtype for grad in grads})
    if not grads:
        return torch.zeros(0, dtype=out_dtype)
    target = grads[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for index, grad in enumerate(grads):
        # An empty tensor (an FSDP2 shard of an unevenly split parameter) has partial 0, the identity
        # of both sum and max; _foreach_norm refuses it for L-inf.
        if grad.numel() > 0:
            groups[(grad.device, grad.dtype)].append(index)
    if len(groups) == 1:
        ((_, dtype), indices), *_ = groups.items()
        if len(indices) == len(grads):  # the usual case: one stack, no per-tensor copies
            out = torch.stack(list(_foreach_norm(list(grads), _ORD[norm_type], dtype)))
            out = out.to(device=target, dtype=out_dtype)
            return out * out if norm_type == "l2" else out
    zero = torch.zeros((), dtype=out_dtype, device=target)
    values = [zero] * len(grads)
    for (_, dtype), indices in groups.items():
        norms = _foreach_norm([grads[i] for i in indices], _ORD[norm_type], dtype)
        for index, norm in zip(indices, norms):
            values[index] = norm.to(device=target, dtype=out_dtype)
    # One stack in the caller's order (no index tensor: that would be a host-to-device copy).
    out = torch.stack(values)
    return out * out if norm_type == "l2" else out


def _foreach_norm(tensors: list[Tensor], ord: float, dtype: torch.dtype) -> Sequence[Tensor]:
    """Norms of same-dtype ``tensors`` in :func:`accumulation_dtype` of ``dtype``."""
    accumulate = accumulation_dtype(dtype)
    # Low-precision gradients overflow their own dtype when squared and summed: accumulate wider.
    # In their own dtype otherwise (no ``dtype=``: no cast, the kernel torch's clipping uses).
    return foreach_norm(tensors, ord, dtype=None if accumulate == dtype else accumulate)


def combine_partials(partials: Tensor, norm_type: NormType, dim: int = 0) -> Tensor:
    """Combine partials along ``dim`` (sum, or max for L-inf)."""
    if combines_by_max(norm_type):
        return partials.amax(dim=dim)
    return partials.sum(dim=dim)


# --------------------------------------------------------------------------------------------------
# Host side: plain floats after the single transfer
# --------------------------------------------------------------------------------------------------


def finalize_norm(partial: float, numel: float, norm_type: NormType, scale: float = 1.0) -> float:
    """Turn a combined partial into the norm; ``scale`` undoes a loss scale (norms are 1-homogeneous)."""
    if norm_type == "l2":
        value = math.sqrt(partial) if partial >= 0 else math.nan
    elif norm_type == "mean":
        value = partial / numel if numel > 0 else math.nan
    else:
        value = partial
    return value / scale


def compute_gains(
    norms: Sequence[Optional[float]], eps: float = DEFAULT_EPS
) -> list[Optional[float]]:
    """Backward gains ``gamma_i = norm[i-1] / norm[i]`` for ``i = 1..n-1``.

    ``None`` where either norm is missing; ``inf`` where ``norm[i] <= eps`` (vanishing).
    """
    gains: list[Optional[float]] = []
    for previous, current in zip(norms[:-1], norms[1:]):
        if previous is None or current is None:
            gains.append(None)
        elif current <= eps:
            gains.append(math.inf)
        else:
            gains.append(previous / current)
    return gains


def compute_log_gains(
    norms: Sequence[Optional[float]], eps: float = DEFAULT_EPS
) -> list[Optional[float]]:
    """``log(norm[i-1]) - log(norm[i])``, computed in log space (no overflow of the ratio)."""
    log_gains: list[Optional[float]] = []
    for previous, current in zip(norms[:-1], norms[1:]):
        if previous is None or current is None:
            log_gains.append(None)
        elif current <= eps:
            log_gains.append(math.inf)
        elif previous <= 0.0:
            # Only an exact zero: a tiny finite gain (previous <= eps) keeps its finite log, so
            # log_gain == log(gain) everywhere.
            log_gains.append(-math.inf)
        else:
            log_gains.append(math.log(previous) - math.log(current))
    return log_gains


def classify_gain(
    gain: Optional[float], damping_threshold: float = 0.5, amplifying_threshold: float = 2.0
) -> Category:
    """Category of one transition. ``None`` or NaN is missing, ``inf`` is vanishing."""
    if gain is None or math.isnan(gain):
        return Category.MISSING
    if math.isinf(gain):
        return Category.VANISHING
    if gain > amplifying_threshold:
        return Category.AMPLIFYING
    if gain < damping_threshold:
        return Category.DAMPING
    return Category.HEALTHY


def summarize_gains(
    gains: Sequence[Optional[float]],
    log_gains: Sequence[Optional[float]],
    damping_threshold: float = 0.5,
    amplifying_threshold: float = 2.0,
) -> dict[str, float]:
    """The gain summary (``SUMMARY_KEYS``, as ``GradientGainMonitor.summary_stats()`` gives it). Means,
    minima and maxima use finite gains only
    (NaN when there is none); counts are floats so every value can be logged as a scalar."""
    finite = [g for g in gains if g is not None and math.isfinite(g)]
    finite_logs = [g for g in log_gains if g is not None and math.isfinite(g)]
    counts = dict.fromkeys(Category, 0)
    for gain in gains:
        counts[classify_gain(gain, damping_threshold, amplifying_threshold)] += 1
    return {
        "mean_gain": sum(finite) / len(finite) if finite else math.nan,
        "min_gain": min(finite) if finite else math.nan,
        "max_gain": max(finite) if finite else math.nan,
        "mean_log_gain": sum(finite_logs) / len(finite_logs) if finite_logs else math.nan,
        "num_amplifying": counts[Category.AMPLIFYING],
        "num_damping": counts[Category.DAMPING],
        "num_healthy": counts[Category.HEALTHY],
        "num_vanishing": counts[Category.VANISHING],
        "num_missing": counts[Category.MISSING],
    }


def end_to_end_gain(norms: Sequence[Optional[float]], eps: float = DEFAULT_EPS) -> float:
    """First block's norm over the last block's (the vanishing ratio); NaN if missing."""
    if len(norms) < 2 or norms[0] is None or norms[-1] is None:
        return math.nan
    return compute_gains([norms[0], norms[-1]], eps)[0]  # type: ignore[return-value]


def step_flow(
    norms: Sequence[Optional[float]],
    eps: float = DEFAULT_EPS,
    damping_threshold: float = 0.5,
    amplifying_threshold: float = 2.0,
) -> tuple[list[Optional[float]], list[Optional[float]], dict[str, float]]:
    """The flow of one step from its block norms: gains, log-gains and the gain summary with the
    end-to-end gain (``end_to_end_gain``), as the callback logs them and the report reads them."""
    gains = compute_gains(norms, eps)
    log_gains = compute_log_gains(norms, eps)
    summary = summarize_gains(gains, log_gains, damping_threshold, amplifying_threshold)
    summary[END_TO_END_KEY] = end_to_end_gain(norms, eps)
    return gains, log_gains, summary
