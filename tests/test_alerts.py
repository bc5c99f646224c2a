"""The alert record and the JSONL audit trail: strict JSON per line (NaN/Inf as strings), appending,
and no record lost when the process is killed with SIGKILL mid-run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from expected_warnings import RULE_TRIPS
from faults import FaultNet, fit_csv
from governance_worker import KILL_STEP
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.governance.alerts import Alert
from lightning_gradwatch.governance.trail import JsonlAlertSink, read_alerts

WORKER = Path(__file__).with_name("governance_worker.py")


def test_records_are_strict_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "trail.jsonl"
    sink = JsonlAlertSink(str(path))
    first = Alert(
        step=3,
        rule="nonfinite",
        metric="nonfinite",
        value=math.nan,
        action="halt",
        keys={"grad_norm/blocks.1": math.inf},
        ranks=[1],
        block="blocks.1",
    )
    second = Alert(
        step=4,
        rule="spike",
        metric="grad_norm_total",
        value=7.5,
        action="skip",
        threshold=6.0,
        zscore=-math.inf,
    )
    sink.write(first)
    sink.write(second)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    parsed = [json.loads(line) for line in lines]  # strict: no bare NaN / Infinity tokens
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]
    assert parsed[0]["value"] == "nan" and parsed[0]["keys"] == {"grad_norm/blocks.1": "inf"}
    assert parsed[1]["zscore"] == "-inf" and parsed[1]["value"] == 7.5
    assert parsed[0]["ranks"] == [1] and parsed[0]["block"] == "blocks.1"
    assert datetime.fromisoformat(parsed[0]["time"]).utcoffset().total_seconds() == 0
    assert set(parsed[0]) >= {
        "time",
        "step",
        "epoch",
        "rank",
        "rule",
        "metric",
        "value",
        "threshold",
        "action",
        "block",
        "params",
        "checkpoint",
    }
    # Appending: a new sink on the same file keeps what is there.
    JsonlAlertSink(str(path)).write(second)
    assert [r["step"] for r in read_alerts(str(path))] == [3, 4, 4]


def test_torn_last_line_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / "trail.jsonl"
    JsonlAlertSink(str(path)).write(Alert(step=1, rule="r", metric="m", value=1.0, action="warn"))
    with open(path, "a") as handle:
        handle.write('{"step": 2, "ru')
    assert [r["step"] for r in read_alerts(str(path))] == [1]


def test_alerts_survive_sigkill_mid_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(WORKER), "kill", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    lines = (tmp_path / "alerts.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line written before the kill parses
    assert [r["step"] for r in records] == list(range(KILL_STEP))
    assert all(r["rule"] == "always" and r["action"] == "warn" for r in records)


@RULE_TRIPS
def test_alerts_name_where_and_read_like_jsonl_records(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FaultNet(depth=3)
    callback = GradientFlowCallback(
        log_every_n_steps=1,
        log_param_norms="*.weight",
        rules=[
            Rule("grad_param_norm/*", max=1e-12, action="warn", name="params"),
            Rule("grad_norm/*", max=1e-12, action="warn"),
        ],
    )
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    fit_csv(tmp_path, model, [callback], max_steps=1, logger=logger)

    weights = sorted(n for n, _ in model.named_parameters() if n.endswith(".weight"))
    blocks = [f"blocks.{i}" for i in range(3)]
    by_rule = {a.rule: a for a in callback.alerts}
    assert set(by_rule) == {"params", "grad_norm/*"}
    params, block = by_rule["params"], by_rule["grad_norm/*"]
    assert sorted(params.params) == weights and sorted(params.where) == weights
    assert params.blocks == [] and params.block is None
    assert block.blocks == blocks and block.where == blocks and block.params == []
    # The same records in the audit trail inside the logger's log_dir, dict-like in Python too.
    records = read_alerts(str(Path(logger.log_dir) / "gradwatch_alerts.jsonl"))
    assert [r["rule"] for r in records] == [a.rule for a in callback.alerts]
    for alert, record in zip(callback.alerts, records):
        assert set(record) == set(alert.to_dict())
        for key in ("time", "step", "epoch", "rank", "rule", "metric", "action", "where"):
            assert alert[key] == record[key] == getattr(alert, key)
        assert alert["value"] == pytest.approx(record["value"]) and record["threshold"] == 1e-12
    with pytest.raises(KeyError):
        callback.alerts[0]["nope"]
