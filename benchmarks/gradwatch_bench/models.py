"""The benchmarked models: an MLP, a small pre-LN GPT and two stress models (many tiny blocks, many
parameter tensors), each wrapped in one ``LightningModule`` that trains on a repeated batch."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import grad_norm
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset

from gradwatch_bench.timing import OWN


class Repeat(IterableDataset):
    """The same batch forever: no epoch boundaries, no data cost."""

    def __init__(self, batch: tuple[Tensor, Tensor]) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self.batch


class GPTBlock(nn.Module):
    """Pre-LN transformer block (causal self-attention + GELU MLP)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, n_blocks: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(GPTBlock(d, heads) for _ in range(n_blocks))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class Stack(nn.Module):
    """``blocks`` (a ModuleList) applied in order."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class BenchModule(pl.LightningModule):
    """Wraps a network; ``builtin`` switches Lightning's documented ``grad_norm`` recipe on."""

    def __init__(self, net: nn.Module, batch: tuple[Tensor, Tensor], loss: str) -> None:
        super().__init__()
        self.net = net
        self.batch = batch
        self.loss = loss
        self.builtin = False
        self.optimizer = "sgd"  # or "adamw" (benchmarks/updates.py: Adam's state is read too)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        out = self.net(x)
        if self.loss == "ce":
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.mse_loss(out, y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.builtin:
            start = time.perf_counter()
            self.log_dict(grad_norm(self, norm_type=2))
            OWN.total += time.perf_counter() - start

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=1e-4)
        return torch.optim.SGD(self.parameters(), lr=1e-4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Repeat(self.batch), batch_size=None)


@dataclass
class ModelSpec:
    name: str
    label: str
    build: Callable[[], BenchModule]
    rounds: int


def mlp(width: int, depth: int, batch: int) -> BenchModule:
    net = Stack([nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])
    data = (torch.randn(batch, width), torch.randn(batch, width))
    return BenchModule(net, data, "mse")


def gpt(d: int, n_blocks: int, seq: int, batch: int, vocab: int = 1024) -> BenchModule:
    net = GPT(vocab, d, n_blocks, heads=max(1, d // 64), seq=seq)
    tokens = torch.randint(0, vocab, (batch, seq))
    return BenchModule(net, (tokens, torch.roll(tokens, -1, dims=1)), "ce")


def stress(n_blocks: int, width: int, batch: int) -> BenchModule:
    net = Stack([nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(n_blocks)])
    return BenchModule(net, (torch.randn(batch, width), torch.randn(batch, width)), "mse")


def many_params(n_blocks: int, linears: int, width: int, batch: int) -> BenchModule:
    # Each block: `linears` Linear layers (2 tensors each) -> n_blocks * linears * 2 tensors.
    net = Stack(
        [
            nn.Sequential(
                *[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(linears)]
            )
            for _ in range(n_blocks)
        ]
    )
    return BenchModule(net, (torch.randn(batch, width), torch.randn(batch, width)), "mse")


def model_specs(quick: bool, rounds: Optional[int]) -> list[ModelSpec]:
    if quick:
        specs = [
            ModelSpec("mlp", "MLP 4 x Linear(32)+ReLU, batch 8", lambda: mlp(32, 4, 8), 2),
            ModelSpec("gpt", "GPT 2 blocks d 32 seq 8 batch 2", lambda: gpt(32, 2, 8, 2, 64), 2),
            ModelSpec("stress", "20 tiny blocks", lambda: stress(20, 4, 4), 2),
            ModelSpec(
                "params", "5 blocks x 4 Linear (40 tensors)", lambda: many_params(5, 4, 4, 4), 2
            ),
        ]
    else:
        specs = [
            ModelSpec("mlp", "24 x Linear(512)+ReLU MLP, batch 256", lambda: mlp(512, 24, 256), 40),
            ModelSpec(
                "gpt",
                "12-block pre-LN GPT, d 256, seq 128, batch 8",
                lambda: gpt(256, 12, 128, 8),
                12,
            ),
            ModelSpec(
                "stress",
                "500 tiny blocks (Linear(8)+Tanh), batch 16",
                lambda: stress(500, 8, 16),
                30,
            ),
            ModelSpec(
                "params",
                "2,000 parameter tensors (100 blocks x 10 Linear(16)), batch 16",
                lambda: many_params(100, 10, 16, 16),
                20,
            ),
        ]
    if rounds is not None:
        for spec in specs:
            spec.rounds = rounds
    return specs
