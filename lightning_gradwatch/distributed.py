"""Combining one step's packed figures across ranks in a single collective.

Block-output gradients differ per rank (each rank back-propagates its own micro-batch): their partials
are combined over ranks (L2: the sum of squares, so the global norm is the square root of the sum of
every rank's squared norm; L1 and mean: sums of absolute values and of element counts; L-inf: the
maximum). Dividing by the number of data-parallel ranks, so that the figures are those of the
objective the strategy optimizes (see :mod:`lightning_gradwatch.strategies`), happens on the host in
:func:`lightning_gradwatch.measurement.unpack`.

Parameter gradients are either replicated (DDP: already all-reduced, so every rank holds the same
values and the local figures are taken) or sharded (FSDP2 DTensor: each rank holds a shard, and the
partials are combined like block partials, giving the norms of the full gradients).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gradwatch.norms import (
    N_STAT_PARTIALS,
    NormType,
    combine_partials,
    combine_stat_partials,
)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_packed(
    packed: Tensor,
    *,
    num_blocks: int,
    num_params: int,
    norm_type: NormType,
    sharded_params: bool,
    grad_stats: bool,
) -> Tensor:
    """Gather ``packed`` (see :func:`lightning_gradwatch.measurement.pack`) from every rank with one
    ``all_gather`` and combine it. Returns ``packed`` unchanged outside a multi-process run."""
    if not is_distributed():
        return packed
    stacked = _all_gather_stacked(packed)  # (world, length)
    out = packed.clone()
    blocks = stacked[:, : 3 * num_blocks].reshape(stacked.shape[0], num_blocks, 3)
    combined_blocks = blocks.sum(dim=0)
    combined_blocks[:, 0] = combine_partials(blocks[:, :, 0], norm_type, dim=0)
    out[: 3 * num_blocks] = combined_blocks.reshape(-1)
    if sharded_params:
        start = 3 * num_blocks
        out[start : start + num_params] = combine_partials(
            stacked[:, start : start + num_params], norm_type, dim=0
        )
        if grad_stats:
            start += num_params
            out[start : start + N_STAT_PARTIALS] = combine_stat_partials(
                stacked[:, start : start + N_STAT_PARTIALS]
            )
    return out


def reduce_stat_partials(row: Tensor) -> Tensor:
    """Combine one :func:`~lightning_gradwatch.norms.grad_stat_partials` row over every rank (each
    holding a shard of the gradients) with one ``all_gather``; unchanged outside a multi-process
    run."""
    if not is_distributed():
        return row
    return combine_stat_partials(_all_gather_stacked(row))


def _all_gather_stacked(tensor: Tensor) -> Tensor:
    """Every rank's ``tensor`` stacked along a new first dimension (one ``all_gather``)."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.stack(gathered)
