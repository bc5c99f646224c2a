"""Block discovery and report checks that the other files leave open: ``"auto"`` discovery on models
whose blocks hold same-class containers themselves, ModelOutput-like dataclass outputs, the heatmap
size per block count read back from the event file, our event reader against tensorboard's
``EventAccumulator``, and ``gradwatch report`` as a real subprocess (console script and
``python -m``), including clean failures on corrupt input."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from models import BlockNet
from reference import trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientFlowCallback, GradientGainMonitor
from lightning_gradwatch.figures import HEATMAP_TAG, heatmap_size_px
from lightning_gradwatch.report.reader import read_logdir

GRADWATCH = Path(sys.executable).with_name("gradwatch")


def _trainer(
    logger: TensorBoardLogger, callback: GradientFlowCallback, max_steps: int
) -> pl.Trainer:
    return trainer(logger.root_dir, [callback], max_steps=max_steps, logger=[logger])


# -- "auto" with same-class containers inside the blocks --------------------------------------------


class HeadedBlock(nn.Module):
    """A GPT-2-like block whose attention is a ModuleList of four same-class heads."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(width, width // 4) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.Linear(width, width))

    def forward(self, h: Tensor) -> Tensor:
        h = h + torch.cat([head(h) for head in self.heads], dim=-1)
        return h + torch.tanh(self.mlp(h))


class HeadedGPT(pl.LightningModule):
    """``transformer.h`` holds 3 blocks; each block holds a longer (4) ModuleList of heads."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Linear(4, 8)
        self.transformer.h = nn.ModuleList(HeadedBlock() for _ in range(3))
        self.lm_head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.transformer.wte(x)
        for block in self.transformer.h:
            h = block(h)
        return self.lm_head(h)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.zeros(16, 1)), 8)


def test_auto_picks_the_block_container_not_the_heads_inside_a_block(tmp_path: Path) -> None:
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="tb", version="", default_hp_metric=False)
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[])
    _trainer(logger, callback, max_steps=2).fit(HeadedGPT())
    blocks = ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert callback.block_names == blocks
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {f"grad_norm/{b}" for b in blocks} <= scalars
    assert {f"grad_gain/{b}" for b in blocks[1:]} <= scalars
    assert not any("heads" in tag for tag in scalars)


# -- ModelOutput-like dataclass outputs ------------------------------------------------------------


@dataclass
class DataclassOutput:
    """A ModelOutput look-alike that is not a mapping (``last_hidden_state`` is not first)."""

    attentions: Optional[Tensor]
    last_hidden_state: Tensor


class DataclassBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 6)

    def forward(self, h: Tensor) -> DataclassOutput:
        out = torch.tanh(self.linear(h))
        return DataclassOutput(attentions=out * 2.0, last_hidden_state=out)


def test_monitor_measures_last_hidden_state_of_a_dataclass_output() -> None:
    torch.manual_seed(0)
    blocks = nn.ModuleList(DataclassBlock() for _ in range(3))
    outputs = []
    with GradientGainMonitor(blocks) as monitor:
        h = torch.randn(5, 6)
        for block in blocks:
            out = block(h)
            out.last_hidden_state.retain_grad()
            outputs.append(out.last_hidden_state)
            h = out.last_hidden_state
        (h.pow(2).sum() + outputs[0].sum()).backward()
        reference = [float(t.grad.norm()) for t in outputs]  # type: ignore[union-attr]
        assert monitor.norms() == pytest.approx(reference, rel=1e-6)
        assert monitor.gains() == pytest.approx(
            [reference[0] / reference[1], reference[1] / reference[2]], rel=1e-6
        )


# -- heatmap size per block count, read back from the event file ------------------------------------


def test_heatmap_in_event_file_grows_with_every_block(tmp_path: Path) -> None:
    heights = {}
    for depth in (2, 3):
        logger = TensorBoardLogger(tmp_path, name=f"d{depth}", version="", default_hp_metric=False)
        callback = GradientFlowCallback(log_every_n_steps=1, figure_every_n_steps=1, rules=[])
        _trainer(logger, callback, max_steps=1).fit(BlockNet(depth=depth, n_samples=16))
        accumulator = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
        accumulator.Reload()
        (image,) = accumulator.Images(HEATMAP_TAG)
        assert (image.width, image.height) == heatmap_size_px(depth)
        heights[depth] = image.height
    assert heights[2] < heights[3]
    # One more row per block all the way to 100 blocks, and bounded beyond.
    sizes = [heatmap_size_px(n) for n in range(2, 101)]
    assert all(a[1] < b[1] for a, b in zip(sizes, sizes[1:]))
    assert heatmap_size_px(1000)[1] <= 3000


# -- gradwatch report as a subprocess on a real run ---------------------------------------------------


@pytest.fixture(scope="module")
def sigmoid_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """A 5-block sigmoid net (every transition damps) trained 6 steps, measured every 2."""
    root = tmp_path_factory.mktemp("sigmoid_run")
    torch.manual_seed(0)
    logger = TensorBoardLogger(root, name="tb", default_hp_metric=False)
    callback = GradientFlowCallback(log_every_n_steps=2, rules=[])
    _trainer(logger, callback, max_steps=6).fit(BlockNet(depth=5, activation="sigmoid"))
    return root, Path(logger.log_dir), callback.block_names


def _gradwatch(*args: str, module: bool = False) -> subprocess.CompletedProcess[str]:
    command = (
        [sys.executable, "-m", "lightning_gradwatch.report", *args]
        if module
        else [str(GRADWATCH), *args]
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def test_reader_agrees_with_event_accumulator(sigmoid_run: tuple[Path, Path, list[str]]) -> None:
    _, log_dir, blocks = sigmoid_run
    (run,) = read_logdir(log_dir)
    assert run.block_names == blocks
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    tags = [t for t in accumulator.Tags()["scalars"] if t.startswith(("grad_", "grad_flow/"))]
    assert set(tags) == set(run.scalars)
    for tag in tags:
        events = accumulator.Scalars(tag)
        assert run.scalars[tag].steps.tolist() == [e.step for e in events] == [0, 2, 4]
        assert run.scalars[tag].values.tolist() == pytest.approx([e.value for e in events])


def test_console_script_on_the_logger_root(sigmoid_run: tuple[Path, Path, list[str]]) -> None:
    root, _, blocks = sigmoid_run
    text = _gradwatch("report", str(root))
    assert text.returncode == 0, text.stderr
    for block in blocks:
        assert block in text.stdout
    assert text.stdout.count("[DAMPING]") == len(blocks) - 1
    assert "[Healthy]" not in text.stdout
    as_json = _gradwatch("report", str(root), "--format", "json", "--step", "2", module=True)
    assert as_json.returncode == 0, as_json.stderr
    (run,) = json.loads(as_json.stdout)["runs"]
    assert run["step"] == 2 and [b["name"] for b in run["blocks"]] == blocks
    assert {t["category"] for t in run["transitions"]} == {"damping"}


def test_corrupt_inputs_fail_with_one_line(tmp_path: Path) -> None:
    events = tmp_path / "events" / "events.out.tfevents.1.host"
    events.parent.mkdir()
    payload = b"\xff" * 5  # framed like a record, but not an Event protobuf
    events.write_bytes(struct.pack("<Q", len(payload)) + b"\0" * 4 + payload + b"\0" * 4)
    ragged = tmp_path / "csv" / "metrics.csv"
    ragged.parent.mkdir()
    ragged.write_text("step,grad_norm/blocks.0\n0,1.0,7\n1\n")
    for folder in (events.parent, ragged.parent):
        result = _gradwatch("report", str(folder))
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gradwatch: error:"), result.stderr
        assert result.stdout == ""
