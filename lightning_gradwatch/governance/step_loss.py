"""The training loss of the optimizer step, as governance reads it: summed on the device over the
step's micro-batches (Lightning hands ``on_before_backward`` each loss already divided by
``accumulate_grad_batches``, so the sum is their mean), unscaled where an AMP GradScaler scaled it, and
under data parallelism averaged over the ranks as Lightning averages a value logged with
``sync_dist=True``. It reaches the host in the step's one copy of figures, never on its own."""

from __future__ import annotations

import math
from typing import Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gradwatch._compat import loss_scale

__all__ = ["StepLoss"]


class StepLoss:
    """Accumulates this step's loss on the device; :meth:`take` hands it over once per step.

    Args:
        combine: average the loss over the ranks (``strategy.reduce(..., "mean")``) in :meth:`take`;
            one all-reduce per step it is taken at.
    """

    def __init__(self, combine: bool) -> None:
        self.combine = combine
        self._sum: Optional[Tensor] = None
        self._sum_step = -1
        self._taken: Optional[Tensor] = None
        self._taken_step = -1

    def add(self, trainer: pl.Trainer, loss: Tensor) -> None:
        """One micro-batch's loss, as ``on_before_backward`` sees it (no host sync)."""
        value = loss.detach().double().sum()
        scale = loss_scale(trainer)
        if scale is not None:  # the hook sees the loss after the scaler multiplied it
            value = value / scale.to(value.dtype)
        step = trainer.global_step
        if self._sum is None or self._sum_step != step:  # the first micro-batch of a step
            self._sum, self._sum_step = value, step
        else:
            self._sum = self._sum + value

    def local(self, trainer: pl.Trainer) -> Optional[Tensor]:
        """This rank's own loss of the current step (a device scalar; never averaged), if any."""
        return self._sum if self._sum_step == trainer.global_step else None

    def take(self, trainer: pl.Trainer) -> Optional[Tensor]:
        """This step's loss as a device scalar (``None`` if no backward passed a loss tensor).

        The same tensor on every call within a step, so the averaging collective runs once; every
        rank calls it at the same steps.
        """
        step = trainer.global_step
        if self._taken_step != step:
            self._taken_step = step
            value = self._sum if self._sum_step == step else None
            if self.combine and trainer.world_size > 1:
                value = self._mean_over_ranks(trainer, value)
            self._taken = value
        return self._taken

    @staticmethod
    def _mean_over_ranks(trainer: pl.Trainer, value: Optional[Tensor]) -> Optional[Tensor]:
        # A rank without a loss still joins the collective (no rank is left waiting) with a NaN,
        # which makes the others' mean NaN: a loss missing on some ranks only is not hidden.
        device = trainer.strategy.root_device
        sent = (
            torch.full((), math.nan, dtype=torch.float64, device=device) if value is None else value
        )
        reduced = trainer.strategy.reduce(sent.clone(), reduce_op="mean")
        return None if value is None else reduced
