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
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from models import Block, BlockNet
from reference import assert_metrics_equal, trainer
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch.measure.probe import CALLS

pytestmark = [RULE_TRIPS, WIRING_REPORT]

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

    def on_after_backward(self) -> None:
        # The probe's counts after each micro-batch's backward (the callback clears them once it
        # has measured the step): the last one of a step holds the whole step's.
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


class SegmentCheckpointNet(BlockNet):
    """Checkpoints several blocks at once: ``"sequential"`` (``checkpoint_sequential`` in 2
    segments), ``"pairs"`` (one ``checkpoint`` around blocks 0-1 and one around 2-3), or none."""

    def __init__(self, mode: Any = None, reentrant: bool = True) -> None:
        torch.manual_seed(0)
        super().__init__(depth=4, width=8)
        self.mode, self.reentrant = mode, reentrant
        self.calls: dict[int, list[float]] = {}

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        blocks = self.blocks
        if self.mode == "sequential":
            h = checkpoint_sequential(blocks, 2, h, use_reentrant=self.reentrant)
        elif self.mode == "pairs":
            for i in (0, 2):
                pair = nn.Sequential(blocks[i], blocks[i + 1])
                h = checkpoint(pair, h, use_reentrant=self.reentrant)
        else:
            for block in blocks:
                h = block(h)
        return self.head(h)

    def on_after_backward(self) -> None:  # as CheckpointNet: the last micro-batch's counts
        probe = self.trainer.callbacks[0]._probe  # type: ignore[attr-defined]
        self.calls[self.trainer.global_step] = probe.buffer[:, CALLS].tolist()


def _fit_last(tmp_path: Path, model: SegmentCheckpointNet) -> dict[str, float]:
    callback = GradientFlowCallback(log_every_n_steps=1, log_param_norms=True)
    trainer(tmp_path, [callback], max_steps=2, accumulate_grad_batches=2).fit(model)
    assert callback.last is not None and callback.last.step == 1
    return callback.last.metrics


@pytest.mark.parametrize("mode", ["sequential", "pairs"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_segments_measure_each_block_once(
    tmp_path: Path, mode: str, reentrant: bool
) -> None:
    plain = _fit_last(tmp_path / "plain", SegmentCheckpointNet())
    model = SegmentCheckpointNet(mode, reentrant)
    measured = _fit_last(tmp_path / "checkpointed", model)
    # One tensor-hook call per block and micro-batch (2 per step), not one more per recomputation.
    assert model.calls == {0: [2.0] * 4, 1: [2.0] * 4}
    # A second measurement of any block would change its L2 norm by sqrt(2).
    for key, value in plain.items():
        assert measured[key] == pytest.approx(value, rel=1e-6, abs=1e-12, nan_ok=True), key
