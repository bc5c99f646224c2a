"""Example 3, normalisation and residuals: Pre-LN vs Post-LN transformer blocks, compared with
``gradwatch report --compare``.

Post-LN (``x = LN(x + f(x))``) puts a LayerNorm on the residual path, so the gradient is rescaled at
every block on its way back; Pre-LN (``x = x + f(LN(x))``) leaves the identity path untouched and the
gradient reaches the first block nearly intact. The comparison table and the heatmaps show the
difference block by block.

Run: ``python examples/ex03_normalisation.py [--root runs] [--fast]``
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from common import example_args, report, run_dir, tensorboard_logger, train
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientFlowCallback


class TransformerBlock(nn.Module):
    """Self-attention + MLP with residuals; ``pre_ln`` chooses where the LayerNorms sit."""

    def __init__(self, dim: int, heads: int, pre_ln: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.pre_ln = pre_ln

    def _attend(self, x: Tensor) -> Tensor:
        return self.attn(x, x, x, need_weights=False)[0]

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_ln:
            x = x + self._attend(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self._attend(x))
        return self.ln2(x + self.mlp(x))


class TinyTransformer(pl.LightningModule):
    """Classify a token sequence by whether its first token is in the upper half of the vocabulary."""

    def __init__(self, pre_ln: bool, depth: int = 8, dim: int = 32, vocab: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, 4, pre_ln) for _ in range(depth))
        self.norm = nn.LayerNorm(dim) if pre_ln else nn.Identity()
        self.head = nn.Linear(dim, 2)
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, vocab, (512, 16), generator=generator)
        self.data = TensorDataset(tokens, (tokens[:, 0] >= vocab // 2).long())

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(dim=1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tokens, labels = batch
        return nn.functional.cross_entropy(self(tokens), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32, shuffle=True)


def main() -> int:
    args = example_args(__doc__.splitlines()[0], default_root="runs")
    steps = 6 if args.fast else 120
    dirs: list[Path] = []
    for name, pre_ln in (("pre_ln", True), ("post_ln", False)):
        torch.manual_seed(0)
        logger = tensorboard_logger(args.root, "ex03_normalisation", name)
        callback = GradientFlowCallback(log_every_n_steps=3, rules=[])
        train(TinyTransformer(pre_ln), callback, logger, max_steps=steps)
        dirs.append(run_dir(logger))
        assert callback.last is not None
        print(
            f"[ex03] {name}: end-to-end gain {callback.last.summary['end_to_end_gain']:.3g}, "
            f"mean log-gain {callback.last.summary['mean_log_gain']:.3g}"
        )
    print(f"[ex03] same from a shell: gradwatch report {dirs[0]} --compare {dirs[1]}")
    return report(dirs, args.root, "ex03_normalisation")


if __name__ == "__main__":
    sys.exit(main())
