"""What governance does to the gradients and the Trainer: clip, skip an update (drop every gradient,
pausing Lightning's own value clipping for that step), save the halt checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable, Optional, Union

import lightning.pytorch as pl
import torch
from torch import nn
from torch.optim import Optimizer

from lightning_gradwatch._compat import foreach_mul_
from lightning_gradwatch.files import join
from lightning_gradwatch.governance.engine import Decision
from lightning_gradwatch.measure.record import MeasurementSpec, measure_params

__all__ = [
    "GradientActions",
    "NamedParams",
    "clip_gradients",
    "clip_to_decisions",
    "drop_gradients",
    "save_halt_checkpoint",
]

NamedParams = Sequence[tuple[str, nn.Parameter]]


def drop_gradients(optimizer: Optimizer, params: NamedParams) -> None:
    """``grad = None`` everywhere: SGD, Adam(W) (foreach, fused) then leave weights and state as
    they are. Zeros would not do: Adam still moves weights with zero gradients."""
    for _, p in params:
        p.grad = None
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def clip_gradients(
    params: NamedParams,
    *,
    by_norm: Optional[float],
    by_value: Optional[float],
    total: float,
    measure_total: Callable[[], float],
) -> float:
    """Clip the gradients in place (by value first, then by total norm) and return the total norm
    after it.

    ``total`` is the finite total norm before clipping (already on the host); ``measure_total``
    measures it again, needed only after a value clip changed it (one more host copy then).
    """
    with_grad = [p for _, p in params if p.grad is not None]
    if not with_grad:
        return total
    if by_value is not None:
        torch.nn.utils.clip_grad_value_(with_grad, by_value)
        total = measure_total()
    if by_norm is not None:
        # The same coefficient as clip_grad_norm_, from the total already on the host.
        coef = by_norm / (total + 1e-6)
        if coef < 1.0:
            foreach_mul_([p.grad for p in with_grad], coef)  # type: ignore[misc]
            return total * coef
    return total


def clip_to_decisions(
    params: NamedParams, decisions: Sequence[Decision], total: float, spec: MeasurementSpec
) -> float:
    """Clip by the tightest acting target of ``decisions`` per mode (``total``: the finite total
    norm before clipping, measured with ``spec``); the total norm after it."""
    acting = [d for d in decisions if d.action == "clip" and d.clip_to is not None]
    by_norm = [d.clip_to for d in acting if d.rule.clip_mode == "norm"]
    by_value = [d.clip_to for d in acting if d.rule.clip_mode == "value"]

    def measure_total() -> float:  # the total norm of the gradients as they are now
        named_grads = [(name, p.grad) for name, p in params if p.grad is not None]
        return measure_params(named_grads, spec, step=-1).total_norm  # type: ignore[arg-type]

    return clip_gradients(
        params,
        by_norm=min(by_norm, default=None),  # type: ignore[type-var]
        by_value=min(by_value, default=None),  # type: ignore[type-var]
        total=total,
        measure_total=measure_total,
    )


def save_halt_checkpoint(trainer: pl.Trainer, directory: str, step: int) -> str:
    """Save the weights before the bad update as ``gradwatch_halt_step<step>.ckpt`` in ``directory``
    (a local path or a URL: the Trainer's checkpoint IO writes through fsspec); called on every rank
    (rank 0 writes)."""
    path = trainer.strategy.broadcast(join(directory, f"gradwatch_halt_step{step}.ckpt"))
    trainer.save_checkpoint(path)
    return path


class GradientActions:
    """Skipping updates, with Lightning's ``gradient_clip_algorithm="value"`` paused for the
    skipped step: torch's ``clip_grad_value_`` raises on a list without any gradient, and
    Lightning's clipping runs after the callbacks' ``on_before_optimizer_step``."""

    def __init__(self) -> None:
        self._paused_clip_val: Optional[Union[int, float]] = None

    def skip(self, trainer: pl.Trainer, optimizer: Optimizer, params: NamedParams) -> None:
        """Drop every gradient, so the optimizer step changes no weight and no state."""
        drop_gradients(optimizer, params)
        # Norm clipping copes with no gradients; value clipping does not.
        if (
            self._paused_clip_val is None
            and trainer.gradient_clip_val
            and trainer.gradient_clip_algorithm == "value"
        ):
            self._paused_clip_val = trainer.gradient_clip_val
            trainer.gradient_clip_val = None

    def end_step(self, trainer: pl.Trainer) -> None:
        """After the optimizer step: give back a ``gradient_clip_val`` paused by a skipped step."""
        if self._paused_clip_val is not None:
            trainer.gradient_clip_val, self._paused_clip_val = self._paused_clip_val, None
