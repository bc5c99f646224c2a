"""Small models, data and a training helper shared by the examples (CPU, seconds per run).

Every model keeps its repeated blocks in one ``nn.ModuleList`` of same-class modules named
``blocks``, so ``GradientFlowCallback(blocks="auto")`` finds them without configuration.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch.report.cli import main as gradwatch

# Tiny models: handing a 64x32 matmul to several threads costs more than doing it (10x slower on a
# busy 2-core machine), so the examples compute on one thread.
torch.set_num_threads(1)

ACTIVATIONS = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "identity": nn.Identity,
}


def fast_mode(argv: Optional[Sequence[str]] = None) -> bool:
    """``--fast`` on the command line or ``GRADWATCH_EXAMPLES_FAST=1``: a few steps only (CI)."""
    flag = "--fast" in (argv if argv is not None else [])
    return flag or os.environ.get("GRADWATCH_EXAMPLES_FAST", "") not in ("", "0")


def example_args(description: str, default_root: str) -> argparse.Namespace:
    """The command line every example shares: ``--root DIR`` for the logs and ``--fast``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--root", default=default_root, help="where the logs go")
    parser.add_argument("--fast", action="store_true", help="a few steps only (smoke test)")
    args = parser.parse_args()
    args.fast = fast_mode(["--fast"] if args.fast else [])
    return args


class MLPBlock(nn.Module):
    """``Linear -> activation`` with an optional residual connection (``x + act(Wx)``)."""

    def __init__(self, width: int, activation: str, residual: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.act = ACTIVATIONS[activation]()
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.linear(x))
        return x + h if self.residual else h


def init_linear(module: nn.Module, init: str, std: float = 0.01) -> None:
    """Initialise every ``nn.Linear`` of ``module``: ``default`` (PyTorch's), ``normal`` (N(0, std)),
    ``xavier`` (Glorot normal) or ``he`` (Kaiming normal, fan-in, ReLU)."""
    if init == "default":
        return
    for layer in module.modules():
        if not isinstance(layer, nn.Linear):
            continue
        if init == "normal":
            nn.init.normal_(layer.weight, std=std)
        elif init == "xavier":
            nn.init.xavier_normal_(layer.weight)
        elif init == "he":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        else:
            raise ValueError(f"`init` must be default/normal/xavier/he, got {init!r}.")
        nn.init.zeros_(layer.bias)


def make_classification(
    n_samples: int = 1024,
    n_features: int = 16,
    positive_fraction: float = 0.5,
    feature_scales: Optional[Tensor] = None,
    seed: int = 0,
) -> TensorDataset:
    """Binary labels from a random linear rule; ``positive_fraction`` sets the class balance and
    ``feature_scales`` multiplies the features (unscaled inputs, like raw sensor readings)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n_samples, n_features, generator=generator)
    score = x @ torch.randn(n_features, generator=generator)
    threshold = torch.quantile(score, 1.0 - positive_fraction)
    y = (score > threshold).float().unsqueeze(1)
    if feature_scales is not None:
        x = x * feature_scales
    return TensorDataset(x, y)


class MLPClassifier(pl.LightningModule):
    """``stem -> blocks (ModuleList of MLPBlock) -> head`` binary classifier (BCE with logits)."""

    def __init__(
        self,
        depth: int = 10,
        width: int = 32,
        n_features: int = 16,
        activation: str = "relu",
        residual: bool = False,
        init: str = "default",
        init_std: float = 0.01,
        lr: float = 0.05,
        optimizer: str = "sgd",
        dataset: Optional[TensorDataset] = None,
        batch_size: int = 64,
    ) -> None:
        super().__init__()
        self.stem = nn.Linear(n_features, width)
        self.blocks = nn.ModuleList(MLPBlock(width, activation, residual) for _ in range(depth))
        self.head = nn.Linear(width, 1)
        init_linear(self.blocks, init, init_std)
        self.lr = lr
        self.optimizer_name = optimizer
        self.dataset = (
            dataset if dataset is not None else make_classification(n_features=n_features)
        )
        self.batch_size = batch_size

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.binary_cross_entropy_with_logits(self(x), y)
        self.log("train_loss", loss, on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)


def tensorboard_logger(root: str, experiment: str, run: str) -> TensorBoardLogger:
    """Logs of one run in ``root/experiment/run`` (no version sub-folder, no hp_metric).

    A previous run's folder is removed first, so that re-running an example does not mix two runs'
    events and alerts in one folder."""
    shutil.rmtree(Path(root) / experiment / run, ignore_errors=True)
    return TensorBoardLogger(root, name=experiment, version=run, default_hp_metric=False)


def train(
    model: pl.LightningModule,
    callback: GradientFlowCallback,
    logger: Logger,
    max_steps: int,
    **trainer_kwargs: Any,
) -> pl.Trainer:
    """Fit ``model`` on CPU for ``max_steps`` optimizer steps with the callback and the logger."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
        **trainer_kwargs,
    )
    trainer.fit(model)
    return trainer


def run_dir(logger: TensorBoardLogger) -> Path:
    """The folder the logger wrote its event files to."""
    return Path(logger.log_dir)


def report(dirs: Sequence[Path], root: str, experiment: str) -> int:
    """``gradwatch report`` on the runs (side by side with ``--compare``), PNGs and HTML into
    ``root/experiment/report``; prints where they are. Returns the report's exit code."""
    out = Path(root) / experiment / "report"
    compare = ["--compare", *map(str, dirs[1:])] if len(dirs) > 1 else []
    code = gradwatch(["report", str(dirs[0]), *compare, "--out", str(out)])
    print(f"[{experiment}] HTML report: {out / 'report.html'}")
    print(f"[{experiment}] TensorBoard: tensorboard --logdir {Path(root) / experiment}")
    return code
