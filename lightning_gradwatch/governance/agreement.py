"""Agreeing across ranks on what tripped, so that every rank takes the same decision at the same
step and no rank is left waiting in a collective."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gradwatch.governance.engine import Check

__all__ = ["Agreement", "agree"]


@dataclass
class Agreement:
    """Per check: whether it tripped on any rank and on which; a value from a tripping rank; and
    each rank's ``extra`` floats (rank order) when something tripped and ``agree`` was given one."""

    tripped: list[bool]
    ranks: list[list[int]]
    peer_values: dict[int, float] = field(default_factory=dict)  # rule index -> value
    extras: Optional[list[list[float]]] = None


def agree(
    trainer: pl.Trainer,
    checks: Sequence[Check],
    num_rules: int,
    extra: Optional[Callable[[], Tensor]] = None,
) -> Agreement:
    """One boolean all-reduce per check step (``reduce_boolean_decision(all=False)``); only when
    something tripped somewhere, one ``all_gather`` of a (rules x 2) vector. Every rank calls the
    same collectives in the same order.

    With several ranks, ``extra`` (called on every rank, and only when something tripped
    somewhere) gives a float64 vector of the same length on every rank, e.g. the forensic evidence
    of :mod:`~lightning_gradwatch.governance.forensics`: it rides in the same ``all_gather``. In one
    process there is nothing to gather and it is not called.
    """
    local = [check.tripped for check in checks]
    rank = trainer.global_rank
    anywhere = trainer.strategy.reduce_boolean_decision(any(local), all=False)
    if trainer.world_size <= 1 or not anywhere:
        return Agreement(local, [[rank] if t else [] for t in local])
    payload = extra() if extra is not None else None
    device = trainer.strategy.root_device
    row = torch.zeros(num_rules, 2, dtype=torch.float64, device=device)
    for check in checks:
        worst = check.worst
        if worst is not None:
            row[check.index, 0] = 1.0
            row[check.index, 1] = worst.value
    width = 2 * num_rules
    sent = row.reshape(-1) if payload is None else torch.cat([row.reshape(-1), payload.to(device)])
    gathered_all = trainer.strategy.all_gather(sent).reshape(trainer.world_size, -1).tolist()
    gathered = [[values[2 * i : 2 * i + 2] for i in range(num_rules)] for values in gathered_all]
    agreement = Agreement([], [])
    if payload is not None:
        agreement.extras = [values[width:] for values in gathered_all]
    for check in checks:
        on = [r for r, rows in enumerate(gathered) if rows[check.index][0] > 0]
        agreement.tripped.append(bool(on))
        agreement.ranks.append(on)
        if on:
            agreement.peer_values[check.index] = gathered[on[0]][check.index][1]
    return agreement
