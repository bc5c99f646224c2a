"""The packed vector of one measured step: where each figure sits, the only code that knows the
offsets (everything a step reduces across ranks and copies to the host, in one float64 vector)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lightning_gradwatch.numerics.grad_stats import N_STAT_PARTIALS

__all__ = ["Packing"]


@dataclass(frozen=True)
class Packing:
    """Where each figure sits in the packed vector of one step, the only place that knows.

    ``[block rows (n x 3) | parameter partials (m) | grad-stat partials (8, if stats) | scale (1,
    if scaled) | loss (1, if loss)]``: everything a step copies to the host, in one float64 vector,
    so the copy happens once.
    """

    num_blocks: int
    num_params: int
    stats: bool = False
    scaled: bool = False
    loss: bool = False

    @property
    def blocks(self) -> slice:
        return slice(0, 3 * self.num_blocks)

    @property
    def params(self) -> slice:
        start = self.blocks.stop
        return slice(start, start + self.num_params)

    @property
    def grad_stats(self) -> slice:
        start = self.params.stop
        return slice(start, start + (N_STAT_PARTIALS if self.stats else 0))

    def scale(self, values: Sequence[float]) -> float:
        """The loss scale of the block rows (1 where none was packed or it is not positive)."""
        if not self.scaled:
            return 1.0
        value = values[self.grad_stats.stop]
        return value if value > 0 else 1.0

    def loss_value(self, values: Sequence[float]) -> Optional[float]:
        """The packed loss (``None`` where none was packed)."""
        return values[self.grad_stats.stop + int(self.scaled)] if self.loss else None

    def pack(
        self,
        block_rows: Tensor,
        partials: Tensor,
        stat_partials: Optional[Tensor],
        scale: Optional[Tensor],
        loss: Optional[Tensor] = None,
    ) -> Tensor:
        """One float64 vector on ``block_rows``' device (no host sync)."""
        device = block_rows.device
        parts = [block_rows.reshape(-1).double(), partials.to(device).double()]
        if self.stats and stat_partials is not None:
            parts.append(stat_partials.to(device).double())
        if self.scaled:
            assert scale is not None
            parts.append(scale.detach().reshape(1).to(device=device, dtype=torch.float64))
        if self.loss:
            assert loss is not None
            parts.append(loss.detach().reshape(1).to(device=device, dtype=torch.float64))
        return torch.cat(parts)

    def rows(self, values: Sequence[float]) -> list[Sequence[float]]:
        """The ``[partial, numel, calls]`` row of each block."""
        return [values[3 * i : 3 * i + 3] for i in range(self.num_blocks)]
