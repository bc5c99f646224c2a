"""How figures combine across ranks, layout by layout: each figure is reduced over exactly the ranks
that hold different parts of it, never over ranks that hold copies.

**Parameter figures** (:func:`param_partials`) follow the gradients' DTensor placements. A plain
tensor gradient (single device, DDP: already all-reduced) is complete on every rank and stays local.
A DTensor gradient is split over the mesh dims on which torch's own norm of it is partial
(``_NormPartial`` / ``Partial(max)``: ``Shard`` and ``_StridedShard``) and copied over the others
(``Replicate``): its partials are combined over the first kind only. Under TP + FSDP2 a weight that
TP splits is reduced over the data-parallel *and* the TP dim, a LayerNorm or bias that TP leaves
replicated over the data-parallel dim only; under HSDP every gradient over the shard dim only. A
``Partial`` (pending-sum) gradient, or a placement whose norm torch cannot keep partial, is first
redistributed to ``Replicate`` on those dims (one collective per such gradient, with a warning), so
its figures are exact too.

**Block outputs** (:func:`reduce_block_rows`): a block's output gradient differs only between ranks
that hold different samples, so rows are combined over the data-parallel ranks. Under tensor
parallelism the rows of the TP ranks of one data-parallel rank are gathered in the same collective
(one ``all_gather`` over the world, read as a ``(data parallel, tensor parallel)`` grid): a block
whose row is identical on every TP rank holds a replicated activation and is counted once; otherwise
its activation is split over the TP ranks (sequence parallelism) and the rows are summed (shards
giving bit-identical rows would count once). DTensor block outputs are measured from their local
values by the probe and go through the same rule. Dividing by the number of data-parallel replicas
happens on the host (:func:`lightning_gradwatch.measure.record.build_measurement`).

**Cost**, collectives per measured step (blocks + parameters) and per every-step rule check
(parameters only), each a small ``all_gather``; no per-parameter or per-block collective, no host
sync here (the caller copies the result to the host once):

=======================  =================  ================
layout                   measured step      every-step check
=======================  =================  ================
single process           0                  0
DDP (any node count)     1 (world)          0
FSDP2 (1-D)              1 (dp)             1 (dp)
HSDP (replicate, shard)  2 (shard, dp)      1 (shard)
TP + FSDP2               3 (dp, tp, world)  2 (dp, tp)
=======================  =================  ================

One ``all_gather`` per distinct process group over which some gradient is split (parameters whose
gradients are split over several dims are reduced one dim after the other), plus one for the block
rows unless they ride in a parameter gather over the same group (:func:`reduce_step`: no TP), of
``group size x payload`` floats. A step whose gradients hold a NaN/Inf repeats the parameter
gathers once (the exact ``grad_stats`` recount).

Why not ``.full_tensor()`` norms or ``get_total_norm`` per mesh: a collective per parameter or mesh,
and nothing for the ``grad_stats`` mix of sums, minima and maxima. So torch decides *where* (the
placements of its norm, asked once per layout), and this module batches *how* (for the update
figures too: :func:`split_over`, then :func:`sum_over_groups`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_gradwatch._compat import replicate_placement
from lightning_gradwatch.measure.probe import PARTIAL
from lightning_gradwatch.numerics.grad_stats import combine_stat_partials, grad_stat_partials
from lightning_gradwatch.numerics.norms import NormType, combine_partials, foreach_partial_norms

__all__ = [
    "ReductionPlan",
    "is_distributed",
    "local_tensor",
    "param_partials",
    "plan_reduction",
    "reduce_block_rows",
    "reduce_step",
    "split_over",
    "sum_over_groups",
]

#: ``_Part.kind`` prefix of block rows riding in a parameter gather (the norm type follows).
_ROWS = "rows:"
#: The process groups a gradient's partials are combined over, in mesh-dim order (empty: local).
Groups = tuple[Any, ...]


def local_tensor(tensor: Tensor) -> Tensor:
    """The local values of a DTensor (this rank's shard), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def is_distributed() -> bool:
    """Whether this is a multi-process run with an initialized default process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class ReductionPlan:
    """Where block-output rows are combined, decided once at fit start (see :func:`plan_reduction`).

    Attributes:
        group: the process group the rows are gathered over (``None``: nothing to reduce).
        data_parallel_size: ranks holding different samples (what the figures are divided by).
        tensor_parallel_size: ranks of one data-parallel rank holding one model (1: no TP).
        grid: gather index of each ``(data parallel, tensor parallel)`` cell, row-major, when the
            mesh is not laid out in rank order (``None``: rank order).
    """

    group: Optional[Any] = None
    data_parallel_size: int = 1
    tensor_parallel_size: int = 1
    grid: Optional[Tensor] = field(default=None, compare=False)


def plan_reduction(trainer: pl.Trainer) -> ReductionPlan:
    """The :class:`ReductionPlan` of ``trainer``'s strategy (a plan that does nothing in one process).

    ``ModelParallelStrategy``: the rows are combined over its ``data_parallel`` mesh dim and, when
    ``tensor_parallel`` has several ranks, deduplicated over that dim. Every other strategy (DDP on
    any number of nodes, FSDP1, DeepSpeed) treats every rank as data-parallel.
    """
    if not is_distributed():
        return ReductionPlan()
    world = dist.get_world_size()
    try:  # ModelParallelStrategy's (data_parallel, tensor_parallel) mesh; other strategies: none
        mesh = trainer.strategy.device_mesh  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        mesh = None
    names = getattr(mesh, "mesh_dim_names", None) or ()
    if "data_parallel" not in names or "tensor_parallel" not in names:
        return ReductionPlan(group=dist.group.WORLD, data_parallel_size=world)
    data, tensor = mesh["data_parallel"].size(), mesh["tensor_parallel"].size()
    if tensor == 1:
        return ReductionPlan(group=mesh["data_parallel"].get_group(), data_parallel_size=data)
    cells = mesh.mesh.flatten()  # the global rank of each (dp, tp) cell
    in_order = cells.tolist() == list(range(world))
    grid = None if in_order else cells.to(device=trainer.strategy.root_device, dtype=torch.long)
    return ReductionPlan(dist.group.WORLD, data, tensor, grid)


def reduce_step(
    block_rows: Tensor,
    grads: Sequence[Tensor],
    norm_type: NormType,
    plan: ReductionPlan,
    *,
    stats: bool,
    large_threshold: float,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """One measured step's block rows (:func:`reduce_block_rows`) and parameter figures
    (:func:`param_partials`, the cheap statistics pass) with the fewest gathers: without tensor
    parallelism the rows ride in the gather of a parameter group that is the same process group
    (1-D FSDP2: one gather for everything; DDP: one, for the rows)."""
    if plan.group is None or plan.tensor_parallel_size > 1 or block_rows.numel() == 0:
        rows = reduce_block_rows(block_rows, norm_type, plan)
        partials, stat_row = param_partials(
            grads, norm_type, stats=stats, large_threshold=large_threshold, assume_finite=True
        )
        return rows, partials, stat_row
    rider = _Part(block_rows.double().reshape(-1), _ROWS + norm_type, (plan.group,))
    partials, stat_row = param_partials(
        grads, norm_type, stats=stats, large_threshold=large_threshold, assume_finite=True,
        riders=[rider],
    )  # fmt: skip
    return rider.value.reshape(block_rows.shape), partials, stat_row


def reduce_block_rows(rows: Tensor, norm_type: NormType, plan: ReductionPlan) -> Tensor:
    """Combine the probe's ``(n, 3)`` rows ``[partial, numel, calls]`` over the data-parallel ranks,
    counting a block replicated on the TP ranks once (one ``all_gather``; float64 result)."""
    rows = rows.double()
    if plan.group is None or rows.numel() == 0:  # no blocks (the same on every rank): no gather
        return rows
    gathered = _all_gather(rows, plan.group)  # (ranks, n, 3)
    tensor = plan.tensor_parallel_size
    if tensor > 1:
        if plan.grid is not None:
            gathered = gathered.index_select(0, plan.grid)
        grid = gathered.reshape(-1, tensor, *rows.shape)  # (dp, tp, n, 3)
        # Replicated on the TP ranks: every TP rank holds the very same row (partial and numel).
        same = (grid == grid[:, :1]).all(dim=-1).all(dim=1)  # (dp, n)
        gathered = torch.where(same.unsqueeze(-1), grid[:, 0], _combine_rows(grid, norm_type, 1))
    return _combine_rows(gathered, norm_type, 0)


def _combine_rows(rows: Tensor, norm_type: NormType, dim: int) -> Tensor:
    """Sum rows along ``dim``, the partial column by its own rule (sum, or max for L-inf)."""
    out = rows.sum(dim=dim)
    out[..., PARTIAL] = combine_partials(rows.select(-1, PARTIAL), norm_type, dim=dim)
    return out


def param_partials(
    grads: Sequence[Tensor],
    norm_type: NormType,
    *,
    stats: bool,
    large_threshold: float,
    assume_finite: bool,
    riders: Sequence[_Part] = (),
) -> tuple[Tensor, Optional[Tensor]]:
    """The partials of the *full* gradients, combined over exactly the dims they are split on.

    Returns the per-gradient partial norms (``foreach_partial_norms``; float64, in the order of
    ``grads``) and, when ``stats``, the ``grad_stat_partials`` row over every full gradient. Plain tensors are taken as they are (complete on every rank). One
    ``all_gather`` per process group some gradient is split over; no host sync. ``grads`` must list
    the same parameters on every rank, as FSDP2 gives every rank a shard (possibly empty) of each
    gradient: the collectives follow from their placements. ``riders`` are combined in the same
    gathers (see :func:`reduce_step`).
    """
    split = [split_over(grad) for grad in grads]
    by_groups: dict[Groups, list[int]] = {}
    for index, (_, groups) in enumerate(split):
        by_groups.setdefault(groups, []).append(index)
    parts: list[_Part] = []
    for groups, indices in by_groups.items():
        local = [split[i][0] for i in indices]
        parts.append(_Part(foreach_partial_norms(local, norm_type).double(), norm_type, groups))
        if stats:
            row = grad_stat_partials(local, large_threshold, assume_finite=assume_finite)
            parts.append(_Part(row, "stats", groups))
    _reduce_parts([*parts, *riders])
    norms, rows = parts[:: 2 if stats else 1], parts[1::2] if stats else []
    if len(norms) == 1:
        partials = norms[0].value
    elif not norms:  # no gradient at all
        partials = torch.zeros(0, dtype=torch.float64)
    else:  # back in the caller's order, without an index tensor (a host-to-device copy)
        scalars: list[Tensor] = [torch.zeros(())] * len(grads)
        for part, indices in zip(norms, by_groups.values()):
            for index, value in zip(indices, part.value.unbind()):
                scalars[index] = value
        partials = torch.stack(scalars)
    if not stats:
        return partials, None
    if not rows:
        return partials, grad_stat_partials([], large_threshold)
    stat_row = (
        rows[0].value
        if len(rows) == 1
        else combine_stat_partials(torch.stack([part.value for part in rows]))
    )
    return partials, stat_row


@dataclass
class _Part:
    """A vector to combine over ``groups``; ``kind`` is a norm type or ``"stats"``."""

    value: Tensor
    kind: str
    groups: Groups


def _combiner(kind: str) -> Callable[[Tensor], Tensor]:
    if kind == "stats":  # torch has no reduction for this mix of sums, minima and maxima
        return combine_stat_partials
    if kind.startswith(_ROWS):  # block rows, flattened: (ranks, n * 3)
        norm_type: Any = kind[len(_ROWS) :]
        return lambda s: _combine_rows(s.reshape(len(s), -1, 3), norm_type, 0).reshape(-1)
    return lambda stacked: combine_partials(stacked, kind, dim=0)  # type: ignore[arg-type]


def _reduce_parts(parts: Sequence[_Part]) -> None:
    """Combine every part over each of its groups in place: one ``all_gather`` per distinct group,
    in the order the groups first appear (the same on every rank: the same parameters, the same
    placements), so every rank calls the same collectives in the same order."""
    order: list[Any] = []
    for part in parts:
        order.extend(group for group in part.groups if group not in order)
    for group in order:
        members = [part for part in parts if group in part.groups]
        stacked = _all_gather(torch.cat([part.value for part in members]), group)
        start = 0
        for part in members:
            width = part.value.numel()
            part.value = _combiner(part.kind)(stacked[:, start : start + width])
            start += width


def sum_over_groups(vectors: Sequence[tuple[Tensor, Groups]]) -> list[Tensor]:
    """Each float64 vector summed over its groups (:func:`split_over`'s), one gather per group."""
    parts = [_Part(vector, "l1", groups) for vector, groups in vectors]  # "l1" partials: sums
    _reduce_parts(parts)
    return [part.value for part in parts]


def _all_gather(tensor: Tensor, group: Any) -> Tensor:
    """Every rank's ``tensor`` in ``group``, stacked along a new first dim (group rank order)."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor.contiguous(), group=group)
    return torch.stack(gathered)


@dataclass(frozen=True)
class _Placement:
    """One DTensor placement: the groups of the mesh dims its norm is partial on, the placements to
    redistribute to first (``None``: the local values do), and its mesh, kept alive (its ``id``
    keys the cache)."""

    mesh: Any
    groups: Groups
    redistribute: Optional[tuple[Any, ...]]


#: One entry per (mesh, placements) seen: a few per model. Keyed by the mesh's identity, not its
#: equality: two meshes over the same ranks may hold different process groups.
_PLACEMENTS: dict[tuple[int, tuple[Any, ...]], _Placement] = {}


def split_over(grad: Tensor) -> tuple[Tensor, Groups]:
    """The local values of ``grad`` (or of a parameter) and the groups to combine its partials over."""
    placements = getattr(grad, "placements", None)
    if placements is None:  # a plain tensor: the whole gradient (DDP already all-reduced it)
        return grad, ()
    placement = _PLACEMENTS.get((id(grad.device_mesh), placements))  # type: ignore[attr-defined]
    if placement is None:
        placement = _placement(grad)
    if placement.redistribute is not None:
        grad = grad.redistribute(placement.mesh, placement.redistribute)  # type: ignore[attr-defined]
    return grad.to_local(), placement.groups  # type: ignore[attr-defined]


def _placement(grad: Any) -> _Placement:
    """Ask torch, once per placement, where the norm of such a DTensor is partial: its sharding rules
    (``Shard``, ``_StridedShard``, ... -> ``_NormPartial``) rather than a copy of them here."""
    mesh, placements = grad.device_mesh, tuple(grad.placements)
    # A pending sum has no local norm: make it a copy first (a collective, on every rank alike).
    target = tuple(replicate_placement() if p.is_partial() else p for p in placements)
    probe = grad if target == placements else grad.redistribute(mesh, target)
    norm = torch.linalg.vector_norm(probe.detach())
    dims = [i for i, p in enumerate(norm.placements) if p.is_partial()]
    # Split, yet torch gathered it to take the norm: the local values alone are not enough either.
    target = tuple(
        p if p.is_replicate() or i in dims else replicate_placement() for i, p in enumerate(target)
    )
    groups = tuple(mesh.get_group(dim) for dim in dims if mesh.size(dim) > 1)
    placement = _Placement(mesh, groups, None if target == placements else target)
    if placement.redistribute is not None:
        rank_zero_warn(
            f"GradientFlowCallback: a gradient with placements {placements} cannot be measured "
            f"from its local values; it is redistributed to {target} first (one collective per "
            "such gradient each time the figures are taken)."
        )
    _PLACEMENTS[(id(mesh), grad.placements)] = placement
    return placement
