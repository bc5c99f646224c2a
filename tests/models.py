"""Small real models shared by the tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class Block(nn.Module):
    """Linear + activation; ``output`` chooses the output container (tensor, tuple, dict, model_output)."""

    def __init__(self, width: int, activation: str = "tanh", output: str = "tensor") -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.act = {"tanh": nn.Tanh(), "relu": nn.ReLU(), "sigmoid": nn.Sigmoid()}[activation]
        self.output = output

    def forward(self, x: Any) -> Any:
        x = unwrap(x)
        h = self.act(self.linear(x))
        if self.output == "tuple":
            return (h, h.detach().sum())
        if self.output == "dict":
            return {"hidden": h, "aux": 0}
        if self.output == "model_output":
            return ModelOutput(last_hidden_state=h, logits=h.sum(-1))
        return h


class MLPBlock(nn.Module):
    """Residual MLP block ``norm(x + down(tanh(up(x))))``: ``up``/``down`` take column-/row-wise
    tensor parallelism, while the LayerNorm and ``down``'s bias stay replicated on the TP ranks."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.down(torch.tanh(self.up(x))))


class ModelOutput(dict):
    """A HuggingFace-style output: an ordered mapping whose fields are also attributes."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


def unwrap(x: Any) -> Tensor:
    if isinstance(x, Tensor):
        return x
    if isinstance(x, dict):
        return x.get("last_hidden_state", x.get("hidden"))
    return x[0]


class BlockNet(pl.LightningModule):
    """``stem -> blocks -> head`` regression net with a ModuleList of identical blocks
    (:class:`Block`, or :class:`MLPBlock` with ``block="mlp"``)."""

    def __init__(
        self,
        depth: int = 4,
        width: int = 8,
        activation: str = "tanh",
        output: str = "tensor",
        lr: float = 0.05,
        n_samples: int = 64,
        batch_size: int = 16,
        block: str = "linear",
    ) -> None:
        super().__init__()
        self.stem = nn.Linear(4, width)
        self.blocks = nn.ModuleList(
            MLPBlock(width) if block == "mlp" else Block(width, activation, output)
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 1)
        self.lr = lr
        self.n_samples = n_samples
        self.batch_size = batch_size

    def forward(self, x: Tensor) -> Tensor:
        h: Any = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(unwrap(h))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(self.n_samples, 4, generator=generator)
        y = x.sum(dim=1, keepdim=True).sin()
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)


def fully_shard_blocks(module: pl.LightningModule) -> None:
    """FSDP2 in ``configure_model``: shard every block of ``module.blocks``, then the root."""
    from torch.distributed.fsdp import fully_shard

    mesh = module.device_mesh["data_parallel"]
    for block in module.blocks:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
