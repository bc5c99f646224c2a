"""Small models for the curvature tests, and the exact Hessian they are compared with."""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset


class TanhNet(pl.LightningModule):
    """An 8-16-4 tanh MLP (212 parameters) with an MSE loss. At every training step it records the
    batch and the weights of its *first* training_step call (the callback calls it again on
    curvature steps), and the optimizer state just before each step."""

    def __init__(
        self,
        optimizer: Callable[[Any], torch.optim.Optimizer],
        n: int = 64,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(n, 8, generator=gen)
        self.y = torch.randn(n, 4, generator=gen)
        self.make_optimizer = optimizer
        self.batch_size = batch_size
        self.seen: dict[int, tuple[Any, dict[str, Tensor]]] = {}
        self.calls: dict[int, int] = {}
        self.states: dict[int, dict[str, Any]] = {}

    def loss(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(functional_call(self, params, (x,)), y)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        step = self.global_step
        self.calls[step] = self.calls.get(step, 0) + 1
        if step not in self.seen:
            weights = {k: v.detach().clone() for k, v in self.named_parameters()}
            self.seen[step] = ([t.clone() for t in batch], weights)
        loss = nn.functional.mse_loss(self(batch[0]), batch[1])
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        state = {}
        for name, p in self.named_parameters():
            s = optimizer.state.get(p, {})
            state[name] = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in s.items()}
        self.states[self.global_step] = state

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make_optimizer(self.parameters())

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)


def exact_hessian(module: TanhNet, step: int) -> tuple[Tensor, list[str], list[torch.Size]]:
    """The Hessian of ``module``'s loss on the batch of ``step`` at the weights of that step, over
    the flat parameters, in float64 (``torch.autograd.functional.hessian``)."""
    batch, weights = module.seen[step]
    names = list(weights)
    shapes = [weights[n].shape for n in names]
    flat = torch.cat([weights[n].reshape(-1) for n in names]).double()
    batch64 = [t.double() for t in batch]
    module64 = module.double()

    def f(theta: Tensor) -> Tensor:
        parts = theta.split([s.numel() for s in shapes])
        params = {n: p.view(s) for n, p, s in zip(names, parts, shapes)}
        return module64.loss(params, batch64)

    hessian = torch.autograd.functional.hessian(f, flat)
    module.float()
    return hessian, names, shapes


def hutchinson_stderr(hessian: Tensor, probes: int) -> float:
    """The exact standard error of Hutchinson's trace over ``probes`` Rademacher vectors:
    ``Var(z^T H z) = 2 sum_{i != j} H_ij^2``."""
    off = (hessian**2).sum() - (torch.diagonal(hessian) ** 2).sum()
    return float((2 * off / probes).sqrt())


class SharpeningNet(pl.LightningModule):
    """Full-batch gradient descent (SGD, lr 0.05) on a 4-32-32-1 tanh net and 100 regression samples:
    its sharpness rises from ~0.13 of 2/lr to 2/lr (Cohen et al. 2021, figure 1). Records the loss
    of every step."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        torch.manual_seed(0)
        x = torch.randn(100, 4)
        self.x, self.y = x, (x[:, :1] * x[:, 1:2]).tanh() * 2 + torch.sin(3 * x[:, 2:3])
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
        )
        self.lr = lr
        self.losses: dict[int, float] = {}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.losses.setdefault(
            self.global_step, float(loss.detach())
        )  # the first call, not the re-run
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=len(self.x))
