"""``gradwatch report`` on runs trained in the test (real Trainer, TensorBoard and CSV loggers),
checked against an independent reading of the event file (tensorboard's EventAccumulator) and
the per-step categories of ``classify_gain``."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import BlockNet
from reference import logger_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch.diagnosis.flow_arrays import category_masks, gains_array, log_gains_array
from lightning_gradwatch.numerics.norms import (
    Category,
    classify_gain,
    compute_gains,
    compute_log_gains,
)
from lightning_gradwatch.report.cli import main
from lightning_gradwatch.report.reader import read_logdir

pytestmark = [RULE_TRIPS, WIRING_REPORT]

DEPTH = 5
BLOCKS = [f"blocks.{i}" for i in range(DEPTH)]
MEASURED = [0, 2, 4, 6, 8]
LABELS = {
    "amplifying": "AMPLIFYING",
    "damping": "DAMPING",
    "healthy": "Healthy",
    "vanishing": "VANISHING",
    "missing": "MISSING",
}
ALERTS = [
    {"time": 1.0, "step": 2, "epoch": 0, "rank": 0, "rule": "grad_norm_total>0.001",
     "metric": "grad_norm_total", "value": 0.5, "threshold": 0.001, "action": "clip"},
    {"time": 2.0, "step": 8, "epoch": 1, "rank": 0, "rule": "nonfinite", "metric":
     "grad_stats/nonfinite_count", "value": 3.0, "threshold": 0.0, "action": "halt",
     "blocks": ["blocks.4"], "checkpoint": "halt-step8.ckpt"},
]  # fmt: skip


def _train(root: Path, name: str, activation: str, **kwargs: Any) -> tuple[Path, Path]:
    tb = TensorBoardLogger(root, name=name, version="tb", default_hp_metric=False)
    csv = CSVLogger(root, name=name, version="csv")
    trainer = pl.Trainer(
        max_steps=10,
        logger=[tb, csv],
        callbacks=[GradientFlowCallback(log_every_n_steps=2, **kwargs)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        log_every_n_steps=1,
    )
    trainer.fit(BlockNet(depth=DEPTH, activation=activation, n_samples=64, batch_size=16))
    return Path(tb.log_dir), Path(csv.log_dir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    sigmoid_tb, sigmoid_csv = _train(root, "sigmoid", "sigmoid")
    relu_tb, _ = _train(root, "relu", "relu", norm_type="l1", damping_threshold=0.9)
    with (sigmoid_tb / "gradwatch_alerts.jsonl").open("w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in ALERTS)
    return {"sigmoid": sigmoid_tb, "sigmoid_csv": sigmoid_csv, "relu": relu_tb, "root": root}


def _reference(run_dir: Path) -> dict[str, dict[int, float]]:
    """``tag -> {step: value}`` straight from tensorboard's EventAccumulator."""
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: {event.step: event.value for event in accumulator.Scalars(tag)}
        for tag in accumulator.Tags()["scalars"]
    }


def _norms_at(reference: dict[str, dict[int, float]], step: int) -> list[float]:
    return [reference[f"grad_norm/{block}"][step] for block in BLOCKS]


def _run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["report", *argv, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_text_report_lists_every_block_and_the_reference_categories(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(runs["sigmoid"])]) == 0
    out = capsys.readouterr().out
    reference = _reference(runs["sigmoid"])
    gains = compute_gains(_norms_at(reference, MEASURED[-1]))
    labels = [LABELS[classify_gain(g).value] for g in gains]
    assert "DAMPING" in labels  # a sigmoid stack damps: the check below is not vacuous
    lines = out.splitlines()
    for i, block in enumerate(BLOCKS):
        assert any(line.startswith(f"  Block {i:2d} ({block}): ") for line in lines), block
    for i, label in enumerate(labels):
        (line,) = [x for x in lines if x.startswith(f"  Transition {i:2d} to {i + 1:2d}: gamma=")]
        assert f"[{label}]" in line
    assert f"reported step: {MEASURED[-1]}" in out
    assert "Alert timeline:" in out
    assert "step 2 (epoch 0): CLIP grad_norm_total=0.5" in out
    assert "HALT" in out and "checkpoint=halt-step8.ckpt" in out


def test_json_report_matches_event_file(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (run,) = _run_json(capsys, str(runs["sigmoid"]))["runs"]
    reference = _reference(runs["sigmoid"])
    assert [b["name"] for b in run["blocks"]] == BLOCKS
    assert run["measured_steps"] == {"count": 5, "first": 0, "last": 8}
    for block in run["blocks"]:
        values = [reference[f"grad_norm/{block['name']}"][s] for s in MEASURED]
        assert block["last_norm"] == pytest.approx(values[-1], rel=1e-12)
        assert block["median_norm"] == pytest.approx(float(np.median(values)), rel=1e-12)
        assert block["max_norm"] == pytest.approx(max(values), rel=1e-12)
    # Category counts per transition over all measured steps, from classify_gain step by step.
    for i, transition in enumerate(run["transitions"]):
        expected = dict.fromkeys(LABELS, 0)
        step_gains = []
        for step in MEASURED:
            gain = compute_gains(_norms_at(reference, step))[i]
            expected[classify_gain(gain).value] += 1
            step_gains.append(gain)
        assert transition["categories"] == expected
        assert transition["median_gain"] == pytest.approx(float(np.median(step_gains)))
        assert run["blocks"][i + 1]["categories"] == expected
    assert run["blocks"][0]["median_gain"] is None
    assert [a["action"] for a in run["alerts"]] == ["clip", "halt"]


def test_step_option_reports_that_step(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (run,) = _run_json(capsys, str(runs["sigmoid"]), "--step", "4")["runs"]
    reference = _reference(runs["sigmoid"])
    norms = _norms_at(reference, 4)
    assert run["step"] == 4
    assert [b["norm"] for b in run["blocks"]] == pytest.approx(norms, rel=1e-12)
    assert [t["gain"] for t in run["transitions"]] == pytest.approx(compute_gains(norms))
    assert run["alerts"] == []  # alerts at steps 2 and 8 only
    assert main(["report", str(runs["sigmoid"]), "--step", "3"]) == 2
    err = capsys.readouterr().err
    assert "step 3 was not measured" in err and "2, 4" in err


def test_csv_gives_the_same_report(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (tb,) = _run_json(capsys, str(runs["sigmoid"]))["runs"]
    (csv,) = _run_json(capsys, str(runs["sigmoid_csv"]))["runs"]
    assert csv["source"] == "csv" and tb["source"] == "tensorboard"
    assert [b["name"] for b in csv["blocks"]] == BLOCKS
    for a, b in zip(tb["blocks"], csv["blocks"]):
        # TensorBoard stores float32, the CSV float64.
        assert a["median_norm"] == pytest.approx(b["median_norm"], rel=1e-6)
        assert a["categories"] == b["categories"]


def test_out_writes_pictures_and_html(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "report"
    assert main(["report", str(runs["sigmoid"]), "--out", str(out)]) == 0
    pictures = sorted(p.name for p in out.glob("*.png"))
    assert pictures == ["gains.png", "norms.png", "total_norm.png"]
    for picture in out.glob("*.png"):
        data = picture.read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    assert all(block in page for block in BLOCKS)
    assert "gradwatch: wrote" in capsys.readouterr().err


def test_compare_puts_runs_side_by_side(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "compare"
    argv = ["report", str(runs["sigmoid"]), "--compare", str(runs["relu"]), "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    table = text[text.index("Comparison") :]
    assert "sigmoid" in table and "relu" in table
    assert len(list(out.rglob("*.png"))) == 6
    assert (out / "report.html").read_text().count('class="run"') == 2
    data = _run_json(capsys, str(runs["sigmoid"]), "--compare", str(runs["relu"]))
    assert len(data["runs"]) == 2


def test_parent_folder_reports_each_run(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data = _run_json(capsys, str(runs["root"] / "sigmoid"))
    assert sorted(run["name"] for run in data["runs"]) == ["csv", "tb"]


def test_settings_come_from_the_logs_unless_overridden(
    runs: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    (run,) = _run_json(capsys, str(runs["relu"]))["runs"]
    assert run["norm_type"] == "l1"
    assert run["thresholds"] == {"damping": 0.9, "amplifying": 2.0}
    reference = _reference(runs["relu"])
    gains = compute_gains(_norms_at(reference, MEASURED[-1]))
    assert [t["category"] for t in run["transitions"]] == [
        classify_gain(g, 0.9, 2.0).value for g in gains
    ]
    (overridden,) = _run_json(capsys, str(runs["relu"]), "--damping-threshold", "0.1")["runs"]
    assert overridden["thresholds"]["damping"] == 0.1
    assert [t["category"] for t in overridden["transitions"]] == [
        classify_gain(g, 0.1, 2.0).value for g in gains
    ]
    assert main(["report", str(runs["relu"]), "--damping-threshold", "3"]) == 2
    assert "damping threshold" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["empty", "missing", "no_gradwatch"])
def test_bad_input_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    target = tmp_path / "logs"
    if case == "empty":
        target.mkdir()
    elif case == "no_gradwatch":
        logger = TensorBoardLogger(target, name="", version="")
        logger.log_metrics({"loss": 1.0}, step=0)
        logger.finalize("success")
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("gradwatch: error: ") and "Traceback" not in err
    expected = {"empty": "no TensorBoard event files", "missing": "no such directory"}
    assert expected.get(case, "no gradwatch metrics") in err


def test_vectorised_gains_agree_with_norms_helpers() -> None:
    eps = 1e-30
    rows = [
        [1.0, 0.5, 0.25, 4.0],
        [1.0, math.nan, 2.0, 0.0],
        [0.0, 1.0, 1e-31, 3.0],
        [2.0, 2.0, 0.9, 0.3],
    ]
    norms = np.array(rows)
    gains, log_gains = gains_array(norms, eps), log_gains_array(norms, eps)
    masks = category_masks(gains)
    for r, row in enumerate(rows):
        as_list = [None if math.isnan(v) else v for v in row]
        for i, (gain, log_gain) in enumerate(
            zip(compute_gains(as_list, eps), compute_log_gains(as_list, eps))
        ):
            assert (math.isnan(gains[r, i]) and gain is None) or gains[r, i] == gain
            assert (math.isnan(log_gains[r, i]) and log_gain is None) or log_gains[
                r, i
            ] == pytest.approx(log_gain, abs=1e-12)  # np.log and math.log: an ulp; ~0 values
            category = classify_gain(gain)
            assert [c for c in Category if masks[c][r, i]] == [category]


def _write_big_csv(path: Path, n_steps: int, n_blocks: int) -> None:
    """A CSVLogger-shaped metrics.csv (sorted header, a train_loss row between logged rows)."""
    rng = np.random.default_rng(0)
    names = [f"blocks.{i}" for i in range(n_blocks)]
    norms = np.exp(rng.normal(-3, 1, (n_steps, n_blocks)))
    columns = {f"grad_norm/{n}": norms[:, j] for j, n in enumerate(names)}
    gains = gains_array(norms)
    for j, n in enumerate(names[1:]):
        columns[f"grad_gain/{n}"] = gains[:, j]
        columns[f"grad_log_gain/{n}"] = np.log(gains[:, j])
    columns["grad_norm_total"] = norms.sum(axis=1)
    columns["step"] = np.arange(n_steps, dtype=np.float64)
    header = sorted(columns)
    table = np.column_stack([columns[h] for h in header])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savetxt(path, table, fmt="%.6g", delimiter=",", header=",".join(header), comments="")


@pytest.mark.slow
def test_large_run_reads_fast_enough(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """100k steps x 100 blocks (~300 MB of CSV); prints the time of reading + reporting."""
    run = tmp_path / "big" / "metrics.csv"
    _write_big_csv(run, n_steps=100_000, n_blocks=100)
    started = time.perf_counter()
    (log,) = read_logdir(run.parent)
    read_s = time.perf_counter() - started
    assert len(log.block_names) == 100 and log.block_names[10] == "blocks.10"
    assert main(["report", str(run.parent), "--format", "json"]) == 0
    total_s = time.perf_counter() - started
    (report,) = json.loads(capsys.readouterr().out)["runs"]
    assert report["measured_steps"]["count"] == 100_000
    with capsys.disabled():
        print(f"\n[large run] read {read_s:.1f} s, read twice + report {total_s:.1f} s")


GRADWATCH = Path(sys.executable).with_name("gradwatch")


@pytest.fixture(scope="module")
def sigmoid_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """A 5-block sigmoid net (every transition damps) trained 6 steps, measured every 2."""
    root = tmp_path_factory.mktemp("sigmoid_run")
    torch.manual_seed(0)
    logger = TensorBoardLogger(root, name="tb", default_hp_metric=False)
    callback = GradientFlowCallback(log_every_n_steps=2, rules=[])
    logger_trainer(logger, callback, max_steps=6).fit(BlockNet(depth=5, activation="sigmoid"))
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
