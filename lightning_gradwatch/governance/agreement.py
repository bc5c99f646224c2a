"""Agreeing across ranks on what tripped, so that every rank takes the same decision at the same
step and no rank is left waiting in a collective."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch

from lightning_gradwatch.governance.engine import Check

__all__ = ["Agreement", "agree"]


@dataclass
class Agreement:
    """Per check: whether it tripped on any rank and on which; a value from a tripping rank."""

    tripped: list[bool]
    ranks: list[list[int]]
    peer_values: dict[int, float] = field(default_factory=dict)  # rule index -> value


def agree(trainer: pl.Trainer, checks: Sequence[Check], num_rules: int) -> Agreement:
    """One boolean all-reduce per check step (``reduce_boolean_decision(all=False)``); only when
    something tripped somewhere, one ``all_gather`` of a (rules x 2) vector. Every rank calls the
    same collectives in the same order."""
    local = [check.tripped for check in checks]
    rank = trainer.global_rank
    anywhere = trainer.strategy.reduce_boolean_decision(any(local), all=False)
    if trainer.world_size <= 1 or not anywhere:
        return Agreement(local, [[rank] if t else [] for t in local])
    row = torch.zeros(num_rules, 2, dtype=torch.float64, device=trainer.strategy.root_device)
    for check in checks:
        worst = check.worst
        if worst is not None:
            row[check.index, 0] = 1.0
            row[check.index, 1] = worst.value
    gathered = trainer.strategy.all_gather(row).reshape(-1, num_rules, 2).tolist()
    agreement = Agreement([], [])
    for check in checks:
        on = [r for r, rows in enumerate(gathered) if rows[check.index][0] > 0]
        agreement.tripped.append(bool(on))
        agreement.ranks.append(on)
        if on:
            agreement.peer_values[check.index] = gathered[on[0]][check.index][1]
    return agreement
