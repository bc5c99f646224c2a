"""Combining one step's figures across ranks.

Block-output gradients differ per rank (each rank back-propagates its own micro-batch): their partials
are combined over ranks (L2: the sum of squares; L1 and mean: sums of absolute values and of element
counts; L-inf: the maximum). Dividing by the number of data-parallel ranks, so that the figures are
those of the objective the strategy optimizes (see :mod:`lightning_gradwatch.strategies`), happens on
the host in :func:`lightning_gradwatch.measurement.build_measurement`.

Parameter gradients are either replicated (DDP: already all-reduced, so every rank holds the same
values and the local figures are taken) or sharded (FSDP2 DTensor: each rank holds a shard, and the
partials are combined like block partials, giving the norms of the full gradients).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gradwatch.grad_stats import combine_stat_partials, grad_stat_partials
from lightning_gradwatch.norms import (
    NormType,
    combine_partials,
    foreach_partial_norms,
)

__all__ = [
    "ReductionPlan",
    "is_distributed",
    "local_tensor",
    "param_partials",
    "plan_reduction",
    "reduce_block_rows",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def local_tensor(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


@dataclass(frozen=True)
class ReductionPlan:
    """How this run's figures combine across ranks, decided once at fit start.

    Attributes:
        data_parallel_size: ranks whose gradients the strategy averages (block norms are divided
            by it); 1 outside a multi-process run.
        distributed: whether figures are combined across ranks at all.
    """

    data_parallel_size: int = 1
    distributed: bool = False


def plan_reduction(trainer: Any) -> ReductionPlan:
    """The :class:`ReductionPlan` of ``trainer``'s strategy."""
    if not is_distributed():
        return ReductionPlan()
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None)
    replicas = kwargs.get("num_replicas") if isinstance(kwargs, dict) else None
    size = int(replicas) if isinstance(replicas, int) and replicas > 0 else 1
    return ReductionPlan(data_parallel_size=size, distributed=True)


def reduce_block_rows(rows: Tensor, norm_type: NormType, plan: ReductionPlan) -> Tensor:
    """Combine the probe's ``(n, 3)`` block rows ``[partial, numel, calls]`` over the ranks."""
    if not plan.distributed or rows.numel() == 0:
        return rows
    stacked = _all_gather_stacked(rows)  # (world, n, 3)
    combined = stacked.sum(dim=0)
    combined[:, 0] = combine_partials(stacked[:, :, 0], norm_type, dim=0)
    return combined


def param_partials(
    grads: Sequence[Tensor],
    norm_type: NormType,
    plan: ReductionPlan,
    *,
    stats: bool = False,
    large_threshold: float = 1.0,
    assume_finite: bool = False,
) -> tuple[Tensor, Optional[Tensor]]:
    """The norm partials of every gradient in ``grads`` and, with ``stats``, the
    :func:`~lightning_gradwatch.grad_stats.grad_stat_partials` row over all of them, both for the full
    gradients (sharded ones combined across ranks). No host sync."""
    local = [local_tensor(grad) for grad in grads]
    partials = foreach_partial_norms(local, norm_type)
    row = grad_stat_partials(local, large_threshold, assume_finite=assume_finite) if stats else None
    if not (plan.distributed and any(hasattr(grad, "to_local") for grad in grads)):
        return partials, row
    partials = combine_partials(_all_gather_stacked(partials), norm_type, dim=0)
    if row is not None:
        row = combine_stat_partials(_all_gather_stacked(row))
    return partials, row


def _all_gather_stacked(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` stacked along a new first dimension (one ``all_gather``)."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.stack(gathered)
