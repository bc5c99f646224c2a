"""What one optimizer step did, measured from the parameters themselves: :func:`take_snapshot` copies
the local values of the stepping optimizer's parameters before ``optimizer.step()`` (one copy, on
measured steps only), :func:`measure_update` compares them with the parameters after it.

The per-tensor partials (:mod:`lightning_gradwatch.numerics.updates`) are sums, reduced over the
ranks that hold different shards of each parameter with the same placement-driven reduction as the
gradient norms (:func:`~lightning_gradwatch.measure.reduction.split_over`, one ``all_gather`` per
process group), then copied to the host once. So the figures are those of one process holding the
full tensors, under DDP, FSDP2, HSDP and TP + FSDP2 alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_gradwatch.keys import (
    EPS_FRACTION_KEY,
    MOMENT_NORM_KEY,
    UPDATE_GRAD_COSINE_KEY,
    UPDATE_NORM_TOTAL_KEY,
    UPDATE_RATIO_TOTAL_KEY,
    WEIGHT_NORM_TOTAL_KEY,
    for_optimizer,
    update_ratio_key,
    weight_norm_key,
)
from lightning_gradwatch.measure.reduction import Groups, local_tensor, split_over, sum_over_groups
from lightning_gradwatch.numerics import updates as math_
from lightning_gradwatch.numerics.updates import adam_rows, eps_threshold, update_rows

__all__ = [
    "AdamState",
    "UpdateMeasurement",
    "UpdateSnapshot",
    "adam_state",
    "measure_update",
    "restore",
    "take_snapshot",
]


@dataclass
class UpdateSnapshot:
    """The local values of a step's parameters before the step.

    Attributes:
        step: the optimizer step (``trainer.global_step`` before the update).
        params: the parameters (DTensors as they are).
        before: a copy of each one's local values (this rank's shard).
        groups: the process groups each one's partials are summed over.
    """

    step: int
    params: list[Tensor]
    before: list[Tensor]
    groups: list[Groups]


def take_snapshot(params: Sequence[Tensor], step: int) -> UpdateSnapshot:
    """Copy the local values of ``params`` (one copy of this rank's shards, nothing else)."""
    before: list[Tensor] = []
    groups: list[Groups] = []
    with torch.no_grad():
        for p in params:
            local, over = split_over(p.detach())
            before.append(local.clone())
            groups.append(over)
    return UpdateSnapshot(step, list(params), before, groups)


def restore(snapshot: UpdateSnapshot) -> None:
    """Put the weights of the snapshot back (a halt after the update keeps the last good ones)."""
    with torch.no_grad():
        for p, before in zip(snapshot.params, snapshot.before):
            local = local_tensor(p.detach())
            if local.shape == before.shape:
                local.copy_(before)


@dataclass
class AdamState:
    """Adam-style state of the snapshot's parameters (``None`` where a parameter has none yet):
    ``exp_avg``, ``exp_avg_sq`` (``max_exp_avg_sq`` with AMSGrad: what the denominator uses),
    the value below which ``sqrt(v_hat) < eps``, and the elements they cover."""

    exp_avgs: list[Optional[Tensor]]
    exp_avg_sqs: list[Optional[Tensor]]
    thresholds: list[Union[Tensor, float]]
    numel: int

    def columns(self) -> tuple[list[Any], ...]:
        return self.exp_avgs, self.exp_avg_sqs, self.thresholds


def adam_state(optimizer: Optimizer, params: Sequence[Tensor]) -> Optional[AdamState]:
    """The Adam-style state of ``params`` as ``optimizer`` holds it now; ``None`` when none of them
    has ``exp_avg`` and ``exp_avg_sq`` (SGD, Adagrad, a step that created no state)."""
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    state = AdamState([], [], [], 0)
    for p in params:
        entry: Any = optimizer.state.get(p, {})
        group: Any = group_of.get(id(p), {})
        betas, eps = group.get("betas"), group.get("eps")
        found = "exp_avg" in entry and "exp_avg_sq" in entry and betas and eps is not None
        # Shaped like the parameter (not a factored second moment, as some custom optimizers keep).
        found = found and all(
            getattr(entry[key], "shape", None) == p.shape for key in ("exp_avg", "exp_avg_sq")
        )
        if not found:
            state.exp_avgs.append(None)
            state.exp_avg_sqs.append(None)
            state.thresholds.append(0.0)
            continue
        second = (
            entry["max_exp_avg_sq"] if group.get("amsgrad") and "max_exp_avg_sq" in entry else None
        )
        state.exp_avgs.append(local_tensor(entry["exp_avg"]))
        state.exp_avg_sqs.append(local_tensor(entry["exp_avg_sq"] if second is None else second))
        step = entry.get("step", math.inf)  # a CPU tensor is read on the host (no device sync)
        step = float(step) if isinstance(step, Tensor) and step.device.type == "cpu" else step
        state.thresholds.append(eps_threshold(float(eps), float(betas[1]), step))
        state.numel += p.numel()  # the full tensor's count (a DTensor's global shape)
    return state if state.numel else None


@dataclass
class UpdateMeasurement:
    """One optimizer step's update figures (plain floats).

    Attributes:
        step: the optimizer step.
        optimizer: the stepping optimizer's name with several optimizers (``None`` with one).
        stepped: whether ``optimizer.step()`` ran (``False``: an AMP scaler skipped it, the update
            figures are 0).
        block_names: the blocks with parameters in this step, in forward order.
        update_ratios, weight_norms: per block, ``||update|| / ||weights||`` and ``||weights||``.
        update_ratio, weight_norm, update_norm: the same over all of the step's parameters.
        cosine: between the update and the negative gradient.
        eps_fraction, moment_norm: from Adam-style state (``None``: the optimizer keeps none).
        metrics: the logged keys.
    """

    step: int
    optimizer: Optional[str]
    stepped: bool
    block_names: list[str]
    update_ratios: list[float]
    weight_norms: list[float]
    update_ratio: float
    weight_norm: float
    update_norm: float
    cosine: float
    eps_fraction: Optional[float] = None
    moment_norm: Optional[float] = None
    metrics: dict[str, float] = field(default_factory=dict)


def _partials(
    snapshot: UpdateSnapshot, stepped: bool, state: Optional[AdamState]
) -> list[list[float]]:
    """Every parameter's row of partials, summed over its groups and copied to the host once."""
    by_groups: dict[Groups, list[int]] = {}
    for index, groups in enumerate(snapshot.groups):
        by_groups.setdefault(groups, []).append(index)
    vectors = []
    with torch.no_grad():
        for groups, indices in by_groups.items():
            before = [snapshot.before[i] for i in indices]
            after = (
                [split_over(snapshot.params[i].detach())[0] for i in indices] if stepped else None
            )
            grads = [_local_grad(snapshot.params[i]) for i in indices]
            rows = update_rows(before, after, grads)
            if state is None:
                adam = rows.new_zeros(len(indices), 2)
            else:
                m, v, t = ([values[i] for i in indices] for values in state.columns())
                adam = adam_rows(m, v, t, rows)
            vectors.append((torch.cat([rows, adam], dim=1).reshape(-1), groups))
    summed = sum_over_groups(vectors)
    values = torch.cat(summed).tolist() if summed else []  # the one host copy
    out: list[list[float]] = [[]] * len(snapshot.params)
    start = 0
    for indices in by_groups.values():
        for i in indices:
            out[i] = values[start : start + math_.COLUMNS]
            start += math_.COLUMNS
    return out


def _local_grad(p: Tensor) -> Optional[Tensor]:
    """This rank's part of ``p``'s gradient, laid out like ``p`` (a DTensor gradient placed otherwise,
    e.g. a pending sum, is redistributed first: a collective, on every rank alike)."""
    grad = p.grad
    if grad is None:
        return None
    placements = getattr(p, "placements", None)
    if placements is not None and tuple(getattr(grad, "placements", ())) != tuple(placements):
        grad = grad.redistribute(p.device_mesh, placements)  # type: ignore[attr-defined]
    return split_over(grad)[0] if placements is not None else grad


def measure_update(
    snapshot: UpdateSnapshot,
    *,
    stepped: bool,
    state: Optional[AdamState],
    blocks: Sequence[tuple[str, Sequence[int]]],
    optimizer: Optional[str] = None,
) -> UpdateMeasurement:
    """Compare the snapshot with the parameters now (``stepped=False``: the step did not happen,
    the update is 0) and build the :class:`UpdateMeasurement`.

    Args:
        snapshot: the parameters and their values before the step.
        stepped: whether ``optimizer.step()`` ran.
        state: the optimizer's Adam-style state after the step (:func:`adam_state`), if any.
        blocks: per block, its name and the indices of its parameters in the snapshot.
        optimizer: the stepping optimizer's name with several optimizers (its totals' suffix).
    """
    rows = _partials(snapshot, stepped, state)
    total = [sum(row[c] for row in rows) for c in range(math_.COLUMNS)]
    named = [(name, indices) for name, indices in blocks if indices]
    sums = [[sum(rows[i][c] for i in indices) for c in range(2)] for _, indices in named]
    w, u = math_.WEIGHT_SQ, math_.UPDATE_SQ
    measurement = UpdateMeasurement(
        step=snapshot.step,
        optimizer=optimizer,
        stepped=stepped,
        block_names=[name for name, _ in named],
        update_ratios=[math_.ratio(s[u], s[w]) for s in sums],
        weight_norms=[math.sqrt(s[w]) for s in sums],
        update_ratio=math_.ratio(total[u], total[w]),
        weight_norm=math.sqrt(total[w]),
        update_norm=math.sqrt(total[u]),
        cosine=math_.update_cosine(total[math_.DOT], total[u], total[math_.GRAD_SQ]),
    )
    if state is not None:
        measurement.eps_fraction = total[math_.BELOW_EPS] / state.numel
        measurement.moment_norm = math.sqrt(total[math_.MOMENT_SQ])
    measurement.metrics = update_metrics(measurement)
    return measurement


def update_metrics(measurement: UpdateMeasurement) -> dict[str, float]:
    """The logged keys: per block (a block belongs to one optimizer, as ``grad_norm/<block>``),
    then the totals, which carry the optimizer's name when there are several."""
    metrics: dict[str, float] = {}
    for name, ratio, norm in zip(
        measurement.block_names, measurement.update_ratios, measurement.weight_norms
    ):
        metrics[update_ratio_key(name)] = ratio
        metrics[weight_norm_key(name)] = norm
    totals = {
        UPDATE_RATIO_TOTAL_KEY: measurement.update_ratio,
        WEIGHT_NORM_TOTAL_KEY: measurement.weight_norm,
        UPDATE_NORM_TOTAL_KEY: measurement.update_norm,
        UPDATE_GRAD_COSINE_KEY: measurement.cosine,
        EPS_FRACTION_KEY: measurement.eps_fraction,
        MOMENT_NORM_KEY: measurement.moment_norm,
    }
    for key, value in totals.items():
        if value is not None:
            metrics[for_optimizer(key, measurement.optimizer)] = value
    return metrics
