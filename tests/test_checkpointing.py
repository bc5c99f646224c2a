"""Activation checkpointing: exactly one measurement per block per backward, equal to no checkpointing.

Checkpointing re-runs forward code during backward. With ``use_reentrant=True`` the first forward runs
without grad and the recomputation with it; with ``use_reentrant=False`` the recomputation builds a
graph that is never back-propagated. Both are checked with checkpointing *inside* each block (around
its body) and *around* each block (the block's forward hook then fires during recomputation too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from models import Block, BlockNet
from reference import assert_metrics_equal, trainer
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch.probe import CALLS

ACCUMULATE = 2


class InnerCheckpointBlock(Block):
    """A block whose own forward checkpoints its body."""

    reentrant = True

    def forward(self, x: Any) -> Any:
        return checkpoint(super().forward, x, use_reentrant=self.reentrant)


class CheckpointNet(BlockNet):
    """``BlockNet`` with checkpointing ``"inside"`` or ``"around"`` each block (``None``: off)."""

    def __init__(self, where: Any = None, reentrant: bool = True) -> None:
        torch.manual_seed(0)
        super().__init__(depth=4, width=8)
        self.where, self.reentrant = where, reentrant
        if where == "inside":
            for block in self.blocks:
                block.__class__ = InnerCheckpointBlock  # same weights, checkpointed body
                block.reentrant = reentrant
        self.calls: dict[int, list[float]] = {}

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            if self.where == "around":
                h = checkpoint(block, h, use_reentrant=self.reentrant)
            else:
                h = block(h)
        return self.head(h)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        watcher = self.trainer.callbacks[0]  # type: ignore[attr-defined]
        self.calls[self.trainer.global_step] = watcher._probe.buffer[:, CALLS].tolist()


def fit(tmp_path: Path, where: Any, reentrant: bool) -> tuple[CheckpointNet, dict[str, float]]:
    model = CheckpointNet(where, reentrant)
    callback = GradientFlowCallback(log_every_n_steps=1, log_param_norms=True, rules=[])
    trainer(tmp_path, [callback], max_steps=2, accumulate_grad_batches=ACCUMULATE).fit(model)
    assert callback.last is not None and callback.last.step == 1
    return model, callback.last.metrics


@pytest.mark.parametrize("where", ["inside", "around"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_one_measurement_per_block_and_backward(
    tmp_path: Path, where: str, reentrant: bool
) -> None:
    _, plain = fit(tmp_path / "plain", None, reentrant)
    model, measured = fit(tmp_path / "checkpointed", where, reentrant)
    # One tensor-hook call per block and micro-batch, at both measured steps.
    assert model.calls == {0: [float(ACCUMULATE)] * 4, 1: [float(ACCUMULATE)] * 4}
    assert_metrics_equal(measured, plain, rel=1e-6)
