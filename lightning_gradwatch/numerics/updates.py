"""Pure math of what an optimizer step did: per tensor, combinable partials of the weights, the
update, the gradient and Adam's moments; on the host, the ratios and the cosine they give.

Every partial is a *sum* (of squares, of products, of counts), so the partials of the shards of a
tensor add up to those of the whole tensor, and those of several tensors add up to those of a block:
:mod:`lightning_gradwatch.measure.updates` reduces them over the ranks that hold different shards.

The update is ``after - before`` of each tensor, a temporary of one tensor at a time (never a second
copy of every parameter). Its figures use the L2 norm whatever the gradient figures' ``norm_type``:
a ratio of norms of the same tensor is what the rule of thumb (about 1e-3 per step) is about.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from lightning_gradwatch.numerics.norms import (
    accumulation_dtype,
    foreach_partial_norms,
    partial_norm,
)

__all__ = [
    "BELOW_EPS",
    "COLUMNS",
    "DOT",
    "GRAD_SQ",
    "MOMENT_SQ",
    "UPDATE_SQ",
    "WEIGHT_SQ",
    "adam_rows",
    "eps_threshold",
    "ratio",
    "update_cosine",
    "update_rows",
]

#: Columns of one tensor's row of partials: ||before||^2, ||before - after||^2, <after - before,
#: -grad>, ||grad||^2 (:func:`update_rows`), then ||exp_avg||^2 and the count of elements whose
#: bias-corrected sqrt(v_hat) is below eps (:func:`adam_rows`).
WEIGHT_SQ, UPDATE_SQ, DOT, GRAD_SQ, MOMENT_SQ, BELOW_EPS = range(6)
COLUMNS = 6


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``<a, b>`` accumulated as the norms are (:func:`accumulation_dtype`)."""
    dtype = accumulation_dtype(a.dtype, b.dtype)
    return torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype))


def _sq_norms(tensors: Sequence[Optional[Tensor]], like: Tensor) -> list[Tensor]:
    """Per tensor its squared L2 norm (a batched pass over those present), 0 for ``None``."""
    zero = like.new_zeros((), dtype=torch.float64)
    out: list[Tensor] = [zero] * len(tensors)
    present = [i for i, t in enumerate(tensors) if t is not None]
    if present:
        norms = foreach_partial_norms([tensors[i] for i in present], "l2")  # type: ignore[misc]
        for i, value in zip(present, norms.unbind()):
            out[i] = value
    return out


def update_rows(
    before: Sequence[Tensor], after: Optional[Sequence[Tensor]], grads: Sequence[Optional[Tensor]]
) -> Tensor:
    """Per tensor ``i``: ``[||before||^2, ||before - after||^2, <before - after, grad>,
    ||grad||^2]`` as a float64 ``(n, 4)`` matrix on the tensors' device (no host sync).

    ``<before - after, grad>`` is ``<update, -grad>``. ``after=None``: the step did not happen (an
    AMP scaler skipped it), every update partial is 0. A ``None`` gradient counts as zeros.
    """
    if not before:
        return torch.zeros(0, 4, dtype=torch.float64)
    like = before[0]
    weight = _sq_norms(before, like)
    zero = weight[0].new_zeros((), dtype=torch.float64)
    update_sq: list[Tensor] = [zero] * len(before)
    dot: list[Tensor] = [zero] * len(before)
    if after is not None:
        for i, (b, a) in enumerate(zip(before, after)):
            delta = torch.sub(b, a)  # one tensor's temporary, freed at the next iteration
            update_sq[i] = partial_norm(delta, "l2")
            grad = grads[i]
            if grad is not None and grad.shape == delta.shape:
                dot[i] = _dot(delta, grad)
    columns = (weight, update_sq, dot, _sq_norms(grads, like))
    return torch.stack([torch.stack(c).to(torch.float64) for c in columns], dim=1)


def eps_threshold(eps: float, beta2: float, step: Union[Tensor, float]) -> Union[Tensor, float]:
    """The ``exp_avg_sq`` value below which Adam's bias-corrected ``sqrt(v_hat)`` is below ``eps``:
    ``sqrt(v / (1 - beta2**t)) < eps``  <=>  ``v < eps**2 * (1 - beta2**t)`` (``step`` = t, a host
    number or the optimizer's step tensor, kept on its device)."""
    return eps * eps * (1.0 - beta2**step)


def adam_rows(
    exp_avgs: Sequence[Optional[Tensor]],
    exp_avg_sqs: Sequence[Optional[Tensor]],
    thresholds: Sequence[Union[Tensor, float]],
    like: Tensor,
) -> Tensor:
    """Per tensor: ``[||exp_avg||^2, count(exp_avg_sq < threshold)]`` as a float64 ``(n, 2)``
    matrix on ``like``'s device (one batched norm pass, one comparison per tensor; no host sync);
    zeros where the state is ``None`` (a tensor without Adam-style state)."""
    moments = _sq_norms(exp_avgs, like)
    zero = like.new_zeros((), dtype=torch.float64)
    counts = [
        zero if v is None else torch.count_nonzero(v < t) for v, t in zip(exp_avg_sqs, thresholds)
    ]
    if not counts:
        return torch.zeros(0, 2, dtype=torch.float64, device=like.device)
    return torch.stack([torch.stack(moments), torch.stack(counts)], dim=1).to(torch.float64)


# --------------------------------------------------------------------------------------------------
# Host side: plain floats after the single transfer
# --------------------------------------------------------------------------------------------------


def ratio(update_sq: float, weight_sq: float) -> float:
    """``||update|| / ||weights||``: 0 without an update, ``inf`` for an update of zero weights."""
    if update_sq == 0.0:
        return 0.0
    if weight_sq <= 0.0:
        return math.inf if update_sq > 0.0 else math.nan
    return math.sqrt(update_sq / weight_sq) if update_sq > 0.0 else math.nan


def update_cosine(dot: float, update_sq: float, grad_sq: float) -> float:
    """The cosine between the update and the negative gradient (``dot`` = ``<update, -grad>``):
    1 for plain SGD, near -1 when momentum fights the gradient; 0 where either is zero (no update
    applied, or no gradient)."""
    if update_sq == 0.0 or grad_sq == 0.0:
        return 0.0
    if not (update_sq > 0.0 and grad_sq > 0.0):
        return math.nan
    return max(-1.0, min(1.0, dot / math.sqrt(update_sq * grad_sq)))
