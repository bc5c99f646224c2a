"""Small models built to show one gradient-flow problem each (for the diagnosis tests).

All are :class:`models.BlockNet` (``stem -> blocks -> head``, the same data and training step) with
their own ``blocks``; the tests train them with a real Trainer and check what the diagnosis says.
"""

from __future__ import annotations

from typing import Any

import torch
from models import BlockNet
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

WIDTH = 16


class StackNet(BlockNet):
    """A :class:`BlockNet` whose blocks are ``blocks`` (any modules mapping width -> width)."""

    def __init__(self, blocks: list[nn.Module], width: int = WIDTH, **kwargs: Any) -> None:
        super().__init__(depth=1, width=width, **kwargs)
        self.blocks = nn.ModuleList(blocks)


class Residual(nn.Module):
    """``norm(x + f(x))`` (Post-LN) or ``x + f(norm(x))`` (Pre-LN), ``f`` a 2-layer GELU MLP whose
    output bias has std ``bias_std``: a branch with a large constant part makes the Post-LN norm
    divide the gradient by the std of the sum at every block (gain about 0.7 with std 1), while the
    Pre-LN residual path carries it unchanged (gain about 1)."""

    def __init__(self, width: int, post: bool, bias_std: float = 1.0) -> None:
        super().__init__()
        self.post = post
        self.norm = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        nn.init.normal_(self.ff[2].bias, std=bias_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.ff(x)) if self.post else x + self.ff(self.norm(x))


def residual_net(post: bool, depth: int = 5) -> StackNet:
    """Five :class:`Residual` blocks; the learning rate is small enough for the Pre-LN net to
    train without diverging (at 0.05 its total norm runs to inf within 4 steps)."""
    torch.manual_seed(0)
    return StackNet([Residual(WIDTH, post) for _ in range(depth)], lr=0.005)


def linear_stack(depth: int = 4, std: float = 5.0, width: int = 20) -> StackNet:
    """Linear layers without activations, weights drawn with std ``std`` (the seed exercise's
    unstable network); a tiny learning rate keeps the few test steps finite."""
    torch.manual_seed(0)
    layers = [nn.Linear(width, width) for _ in range(depth)]
    for layer in layers:
        nn.init.normal_(layer.weight, std=std)
    return StackNet(list(layers), width=width, lr=1e-12)


def dead_relu_net(depth: int = 4, shift: float = -3.0) -> StackNet:
    """ReLU blocks whose biases are shifted to ``shift``: most units never fire."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()) for _ in range(depth)]
    for block in blocks:
        nn.init.constant_(block[0].bias, shift)
    return StackNet(list(blocks))


class WiringNet(BlockNet):
    """A tanh :class:`BlockNet` with a frozen head, a parameter the forward never uses and one it
    multiplies by zero."""

    def __init__(self) -> None:
        super().__init__(depth=3, width=8)
        self.head.requires_grad_(False)
        self.unused = nn.Parameter(torch.ones(3))
        self.dead = nn.Parameter(torch.ones(5))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + 0.0 * self.dead.sum()


class TransformerNet(StackNet):
    """``depth`` of torch's own ``nn.TransformerEncoderLayer`` (Post-LN unless ``norm_first``,
    ReLU held as ``F.relu``, no dropout) over sequences of 6 tokens, every weight matrix
    Xavier-initialised as ``nn.Transformer`` does: the blocks have residual connections,
    LayerNorm and a variance-scaled init. At ``lr=0.05`` the Post-LN stack's gradient collapses
    toward the first blocks within a few steps (end-to-end gain about 0.01 by step 5)."""

    def __init__(self, depth: int = 12, width: int = WIDTH, norm_first: bool = False) -> None:
        torch.manual_seed(0)
        layers = [
            nn.TransformerEncoderLayer(
                width, 2, 2 * width, dropout=0.0, batch_first=True, norm_first=norm_first
            )
            for _ in range(depth)
        ]
        super().__init__(layers, width=width, lr=0.05)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(dim=1))

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(self.n_samples, 6, 4, generator=generator)
        y = x.sum(dim=-1).mean(dim=-1, keepdim=True).sin()
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size)
