"""Fault injection for the governance tests: a backward that returns NaN in one block at one step, a
loss spike, a per-rank gradient fault, a module that records its weights and gradients, and (for the
forensics tests) poisoned batches at known indices and an output corrupted once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from models import BlockNet
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

if TYPE_CHECKING:
    from lightning_gradwatch import GradientFlowCallback


class NaNBackward(torch.autograd.Function):
    """Identity forward; the backward returns NaN everywhere."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return torch.full_like(grad, float("nan"))


class FaultNet(BlockNet):
    """``BlockNet`` whose block ``poison_block`` back-propagates NaN at the steps in ``poison_steps``.

    ``placement="inside"`` poisons inside the block (after its linear layer, so the block's own
    parameters get NaN gradients but its output gradient is finite); ``"output"`` poisons the gradient
    arriving at the block's output. ``spike_step`` multiplies the loss by ``spike`` at that step.
    Records the weights at the start of every step (``weights[step]``), the gradients after backward
    (``grads_after_backward``) and those the optimizer sees (``grads_at_step``: the module's own
    ``on_before_optimizer_step`` runs after the callbacks').
    """

    def __init__(
        self,
        poison_block: int = 2,
        poison_steps: tuple[int, ...] = (),
        placement: str = "inside",
        spike_step: Optional[int] = None,
        spike: float = 1000.0,
        optimizer: str = "sgd",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.poison_block = poison_block
        self.poison_steps = set(poison_steps)
        self.placement = placement
        self.spike_step = spike_step
        self.spike = spike
        self.optimizer_name = optimizer
        self.weights: dict[int, dict[str, Tensor]] = {}
        self.grads_after_backward: dict[int, dict[str, Tensor]] = {}
        self.grads_at_step: dict[int, dict[str, Tensor]] = {}
        self.record = True
        # Through a forward hook on the block's linear layer, so the block's forward (and the
        # probe's hook on its output) runs as usual.
        self.blocks[poison_block].linear.register_forward_hook(self._poison_inside)

    def _poison_inside(self, module: nn.Module, inputs: Any, output: Tensor) -> Optional[Tensor]:
        if self.placement == "inside" and self._poisoned():
            return NaNBackward.apply(output)
        return None

    def _poisoned(self) -> bool:
        return self.trainer.global_step in self.poison_steps

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == self.poison_block and self.placement == "output" and self._poisoned():
                h = NaNBackward.apply(h)
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.trainer.global_step == self.spike_step:
            loss = loss * self.spike
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.record:
            self.weights[self.trainer.global_step] = snapshot(self)

    def on_after_backward(self) -> None:
        if self.record:
            self.grads_after_backward[self.trainer.global_step] = grads_of(self)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.record:
            self.grads_at_step[self.trainer.global_step] = grads_of(self)


class EpochData(Dataset):
    """Regression pairs whose targets are out of range (``+ POISON``) in the batches ``poison`` names
    as ``(epoch, batch index)``, for the epoch ``epoch()`` says when a sample is read (a resumed
    Lightning run may not call ``on_train_epoch_start``), so a poisoned batch is poisoned in one
    epoch only. ``seed`` picks the data (one per rank for DDP)."""

    POISON = 100.0

    def __init__(
        self,
        n: int,
        batch_size: int,
        poison: set[tuple[int, int]],
        seed: int = 0,
        epoch: Callable[[], int] = lambda: 0,
    ) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=generator)
        self.y = self.x.sum(dim=1, keepdim=True).sin()
        self.batch_size = batch_size
        self.poison = poison
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        poisoned = (self.epoch(), index // self.batch_size) in self.poison
        return self.x[index], self.y[index] + (self.POISON if poisoned else 0.0)


class PoisonNet(FaultNet):
    """``FaultNet`` trained on :class:`EpochData` (``poison``: ``(epoch, batch)`` pairs, on ``rank``
    only under DDP, where each rank has its own data: use ``use_distributed_sampler=False``).

    ``corrupt`` holds ``(step, rank)`` pairs where the model's output is multiplied by
    ``CORRUPTION`` in the first forward of that step only (a transient fault: a second execution of
    the same batch is clean). ``shuffle`` shuffles the data with a fixed seed."""

    CORRUPTION = 1000.0

    def __init__(
        self,
        poison: tuple[tuple[int, int], ...] = (),
        rank: Optional[int] = None,
        corrupt: tuple[tuple[int, int], ...] = (),
        shuffle: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.poison, self.poison_rank, self.shuffle = set(poison), rank, shuffle
        self.corrupt = set(corrupt)
        self.corrupted: set[int] = set()
        self.seen: list[tuple[int, int, int]] = []  # (step, epoch, batch_idx) of every batch

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.seen.append((self.trainer.global_step, self.current_epoch, batch_idx))

    def train_dataloader(self) -> DataLoader:
        rank = self.global_rank
        poison = self.poison if self.poison_rank in (None, rank) else set()
        epoch = lambda: self.trainer.current_epoch  # noqa: E731
        data = EpochData(self.n_samples, self.batch_size, poison, seed=rank, epoch=epoch)
        generator = torch.Generator().manual_seed(1234) if self.shuffle else None
        return DataLoader(
            data, batch_size=self.batch_size, shuffle=self.shuffle, generator=generator
        )

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        step = self.trainer.global_step
        if (step, self.global_rank) in self.corrupt and step not in self.corrupted:
            self.corrupted.add(step)
            out = out * self.CORRUPTION
        return out


def snapshot(module: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def grads_of(module: nn.Module) -> dict[str, Tensor]:
    return {
        name: p.grad.detach().clone() for name, p in module.named_parameters() if p.grad is not None
    }


def same_weights(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class RankFault(Callback):
    """Puts an Inf into one parameter gradient on rank ``rank`` only, at ``step``, after the DDP
    all-reduce and before the gradient-flow callback looks (callbacks run in list order)."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank = rank
        self.step = step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            grad = pl_module.blocks[1].linear.weight.grad  # type: ignore[index,union-attr]
            grad[0, 0] = float("inf")


def ddp_trainer(
    out_dir: str, callbacks: list[Callback], max_steps: int, **options: Any
) -> pl.Trainer:
    """A 2-process CPU DDP Trainer (gloo) logging to CSV under ``out_dir`` (``options``: more
    Trainer arguments)."""
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=CSVLogger(out_dir, name="csv", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out_dir,
        **options,
    )


def make_trainer(tmp_path: Any, callbacks: list[Any], max_steps: int, **kwargs: Any) -> pl.Trainer:
    """A one-process CPU Trainer logging to ``tmp_path/csv/version_0/metrics.csv``."""
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=CSVLogger(str(tmp_path), name="csv", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1000,
        default_root_dir=str(tmp_path),
        **kwargs,
    )


def fit_csv(
    tmp_path: Path, model: pl.LightningModule, callbacks: list[Any], **kwargs: Any
) -> pl.Trainer:
    """Fit ``model`` on one CPU process with ``callbacks``, a CSVLogger writing
    ``tmp_path/csv/version_0/metrics.csv`` and 4 steps, any Trainer option overridable."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "max_steps": 4,
        "logger": CSVLogger(str(tmp_path), name="csv", version=0),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(tmp_path),
    }
    options.update(kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    trainer.fit(model)
    return trainer


def fit_steps(
    tmp_path: Path, model: pl.LightningModule, callback: GradientFlowCallback, steps: int
) -> Any:
    """Fit ``model`` for ``steps`` steps in a :func:`make_trainer` Trainer with ``callback``."""
    trainer = make_trainer(tmp_path, [callback], max_steps=steps)
    trainer.fit(model)
    return trainer
