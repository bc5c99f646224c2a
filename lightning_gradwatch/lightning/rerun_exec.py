"""Executing a step's forward and backward a second time without changing the run: the mechanics
behind :mod:`.rerun` (RNG states, module buffers, the callback's probe and ``self.log`` are put back
as they were; gradients go to temporary buffers, never to ``.grad``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn

from lightning_gradwatch.lightning.batches import StepBatches, capture_rng, restore_rng
from lightning_gradwatch.measure.probe import GradientProbe
from lightning_gradwatch.numerics.norms import (
    NormType,
    combine_partials,
    finalize_norm,
    foreach_partial_norms,
)

__all__ = ["execute_again"]


class NoLoss(RuntimeError):
    """``training_step`` gave no loss tensor to back-propagate."""


def execute_again(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    batches: StepBatches,
    probe: Optional[GradientProbe],
    blocks: Sequence[tuple[str, nn.Module]],
    params: Sequence[tuple[str, nn.Parameter]],
    norm_type: NormType,
    scale: Optional[Tensor],
) -> tuple[float, Tensor, Optional[float]]:
    """Run the step's micro-batches again from their RNG states; return this rank's loss (summed
    over the micro-batches, each divided by ``accumulate_grad_batches`` as Lightning does), the
    temporary probe's block rows (they carry ``scale``, as the first execution's do) and the
    total norm of the parameter gradients (unscaled). Everything the run keeps is put back."""
    tensors = [p for _, p in params if p.requires_grad]
    accumulate = trainer.accumulate_grad_batches
    sums: list[Optional[Tensor]] = [None] * len(tensors)
    total = 0.0
    spare = GradientProbe(list(blocks), norm_type, device=_device_of(pl_module))
    with _restored(pl_module, probe), torch.enable_grad():
        try:
            spare.arm()
            for batch, batch_idx, rng in zip(batches.batches, batches.indices, batches.rng):
                restore_rng(rng)
                loss = _training_loss(trainer, pl_module, batch, batch_idx) / accumulate
                total += float(loss.detach())
                scaled = loss if scale is None else loss * scale.to(loss.dtype)
                grads = torch.autograd.grad(scaled, tensors, allow_unused=True) if tensors else ()
                sums = [_add(s, g) for s, g in zip(sums, grads)]
        finally:
            spare.remove()
    rows = spare.buffer.detach().cpu()
    return total, rows, _param_norm(sums, norm_type, scale)


@contextmanager
def _restored(pl_module: pl.LightningModule, probe: Optional[GradientProbe]) -> Iterator[None]:
    """Put back what a forward may change: the RNG state, module buffers (BatchNorm running
    statistics, ``num_batches_tracked``), the callback's probe (disarmed meanwhile, so the rerun
    adds nothing to the step's figures) and ``self.log`` (silenced: nothing is logged twice)."""
    rng = capture_rng()
    buffers = [(buffer, buffer.detach().clone()) for buffer in pl_module.buffers()]
    armed = probe is not None and probe.armed
    if probe is not None:
        probe.disarm()
    own = {name: vars(pl_module)[name] for name in ("log", "log_dict") if name in vars(pl_module)}
    for name in ("log", "log_dict"):
        object.__setattr__(pl_module, name, _ignore)
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in own:
                object.__setattr__(pl_module, name, own[name])
            else:
                object.__delattr__(pl_module, name)
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        restore_rng(rng)
        if armed and probe is not None:
            probe.arm()


def _ignore(*args: Any, **kwargs: Any) -> None:
    return None


def _training_loss(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
) -> Tensor:
    """``training_step``'s loss, called as Lightning calls it (precision context, ``batch_idx``
    only where the signature takes it) on the bare module: no DDP wrapper, no collective."""
    step = pl_module.training_step
    with trainer.precision_plugin.train_step_context():
        if is_param_in_hook_signature(step, "batch_idx", min_args=2):
            output = step(batch, batch_idx)
        else:
            output = step(batch)
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, Tensor) or not loss.requires_grad:
        raise NoLoss("training_step returned no loss tensor that requires grad")
    return loss


def _add(total: Optional[Tensor], grad: Optional[Tensor]) -> Optional[Tensor]:
    if grad is None:
        return total
    return grad.detach() if total is None else total + grad.detach()


def _param_norm(
    grads: Sequence[Optional[Tensor]], norm_type: NormType, scale: Optional[Tensor]
) -> Optional[float]:
    present = [g for g in grads if g is not None]
    if not present:
        return None
    partials = foreach_partial_norms(present, norm_type)
    combined = float(combine_partials(partials, norm_type))
    numel = float(sum(g.numel() for g in present))
    return finalize_norm(combined, numel, norm_type, 1.0 if scale is None else float(scale))


def _device_of(module: nn.Module) -> torch.device:
    for param in module.parameters():
        return param.device
    return torch.device("cpu")
