"""A reference that shares nothing with the callback or the other strategy tests, for DDP and FSDP2
runs: a plain PyTorch loop (``retain_grad`` on every block output, a hand-written SGD update) on the
*global* batch of each optimizer step, fp32, one process.

Each rank of a run reads its own interleaved share of the data (``use_distributed_sampler=False``,
``ShardedDataNet``), so the global batch is known here; runs use ``accumulate_grad_batches=2`` and
``log_every_n_steps=2``, the callback's defaults besides (so the default ``nonfinite`` rule and its
per-step check run too), ``log_param_norms=True`` and one callback per norm type; the figures
compared are those the loggers received (``metrics.csv``).

Also the FSDP2 launcher script: ``python tests/global_batch.py fsdp2 OUT`` (Lightning's launcher
runs it again for rank 1).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from dist_worker import ACCUMULATE, DEPTH, LOG_EVERY, MAX_STEPS, NORM_TYPES, WIDTH
from lightning.pytorch.loggers import CSVLogger
from models import BlockNet, fully_shard_blocks
from parallel import assert_figures_equal
from reference import ref_metrics
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientFlowCallback

LR, MICRO = 0.05, 4
MEASURED = (0, 2)
BLOCKS = [f"blocks.{i}" for i in range(DEPTH)]
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(__file__).resolve()


def dataset() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(96, 4, generator=generator)
    return x, x.sum(dim=1, keepdim=True).sin()


class ShardedDataNet(BlockNet):
    """``BlockNet`` whose rank ``r`` of ``W`` trains on samples ``r, r + W, ...`` in order."""

    def __init__(self, fsdp: bool = False) -> None:
        super().__init__(depth=DEPTH, width=WIDTH, lr=LR, batch_size=MICRO)
        self.fsdp = fsdp
        self.record: dict[str, Any] = {"weights": None, "grads": {}, "shapes": {}}

    def train_dataloader(self) -> DataLoader:
        x, y = dataset()
        rank, world = self.global_rank, self.trainer.world_size
        return DataLoader(TensorDataset(x[rank::world], y[rank::world]), batch_size=MICRO)

    def configure_model(self) -> None:
        if self.fsdp:
            fully_shard_blocks(self)

    def on_train_start(self) -> None:
        self.record["weights"] = {n: _full(p) for n, p in self.named_parameters()}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = self.trainer.global_step
        if step in MEASURED:
            grads = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
            self.record["grads"][step] = {n: _full(g) for n, g in grads}
            self.record["shapes"][step] = {n: (_local(g).shape, g.shape) for n, g in grads}


def _full(tensor: Tensor) -> Tensor:
    full_tensor = getattr(tensor, "full_tensor", None)
    return (full_tensor() if callable(full_tensor) else tensor).detach().clone()


def _local(tensor: Tensor) -> Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def watchers(**kwargs: Any) -> list[GradientFlowCallback]:
    return [
        GradientFlowCallback(
            log_every_n_steps=LOG_EVERY, norm_type=norm_type, log_param_norms=True, **kwargs
        )
        for norm_type in NORM_TYPES
    ]


def fit_kwargs(out: Path) -> dict[str, Any]:
    return {
        "accelerator": "cpu",
        "devices": 2,
        "max_steps": MAX_STEPS,
        "accumulate_grad_batches": ACCUMULATE,
        "use_distributed_sampler": False,
        "logger": CSVLogger(str(out), name="csv", version=0),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(out),
    }


def logged_rows(out: Path) -> list[tuple[int, dict[str, float]]]:
    """Every ``log_metrics`` call that carried block figures, in order: ``(step, metrics)``."""
    with open(out / "csv" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("grad_norm/blocks.0")]
    return [
        (int(row.pop("step")), {k: float(v) for k, v in row.items() if v != ""}) for row in rows
    ]


def plain_reference(
    weights: dict[str, Tensor], world: int
) -> dict[int, tuple[list[Tensor], dict[str, Tensor]]]:
    """Block-output and parameter gradients of one fp32 process on each measured step's global
    batch (every micro-batch of every rank), following the same SGD updates."""
    model = BlockNet(depth=DEPTH, width=WIDTH)
    model.load_state_dict(weights)
    x, y = dataset()
    shards = [(x[r::world], y[r::world]) for r in range(world)]
    found: dict[int, tuple[list[Tensor], dict[str, Tensor]]] = {}
    for step in range(max(MEASURED) + 1):
        start = step * ACCUMULATE * MICRO
        xb = torch.cat([sx[start : start + ACCUMULATE * MICRO] for sx, _ in shards])
        yb = torch.cat([sy[start : start + ACCUMULATE * MICRO] for _, sy in shards])
        model.zero_grad()
        h, outputs = model.stem(xb), []
        for block in model.blocks:
            h = block(h)
            h.retain_grad()
            outputs.append(h)
        nn.functional.mse_loss(model.head(h), yb).backward()
        if step in MEASURED:
            found[step] = (
                [o.grad.clone() for o in outputs],  # type: ignore[union-attr]
                {n: p.grad.clone() for n, p in model.named_parameters()},  # type: ignore[union-attr]
            )
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad  # type: ignore[operator]
    return found


DEFAULT_RULE_KEYS = ("grad_alerts/nonfinite", "grad_norm_total_max", "grad_norm_total_mean")


def assert_logged_like_reference(out: Path, weights: dict[str, Tensor], world: int) -> None:
    rows = logged_rows(out)
    # Rank 0 alone wrote, once per callback (in order) and measured optimizer step.
    assert [step for step, _ in rows] == [step for step in MEASURED for _ in NORM_TYPES]
    reference = plain_reference(weights, world)
    for index, (step, logged) in enumerate(rows):
        # The default rule's own keys (its counter; the interval's max and mean of the total norm,
        # which test_governance_adaptive.py checks against a reference) sit beside the figures.
        governance = {key: logged.pop(key) for key in DEFAULT_RULE_KEYS}
        assert governance["grad_alerts/nonfinite"] == 0.0
        assert governance["grad_norm_total_max"] >= logged["grad_norm_total"] * (1 - 1e-6)
        block_grads, param_grads = reference[step]
        norm_type = NORM_TYPES[index % len(NORM_TYPES)]
        expected = ref_metrics(
            BLOCKS, block_grads, param_grads, norm_type, param_keys=list(param_grads)
        )
        assert_figures_equal(logged, expected, rel=1e-4)


def fsdp2_worker(out: Path) -> None:
    """Run by the FSDP2 test (``python tests/global_batch.py fsdp2 OUT``) and, through Lightning's
    launcher, again for rank 1."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.manual_seed(0)
    model = ShardedDataNet(fsdp=True)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    fit = pl.Trainer(callbacks=watchers(), strategy=strategy, **fit_kwargs(out))
    fit.fit(model)
    record = {**model.record, "global_step": fit.global_step}
    torch.save(record, out / f"rank{fit.global_rank}.pt")


if __name__ == "__main__":
    if sys.argv[1] == "fsdp2":
        fsdp2_worker(Path(sys.argv[2]))
