"""Where users see the diagnoses: ``gradwatch report`` (text, JSON, HTML) puts the Diagnosis first
and, from the logs and ``gradwatch_model_facts.json`` alone, reaches the callback's findings; the
TensorBoard TEXT tab holds them after fit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from diag_models import residual_net
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import BlockNet
from reference import trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch.diagnosis.run_history import FACTS_FILENAME
from lightning_gradwatch.lightning.diagnosis import DIAGNOSIS_TAG
from lightning_gradwatch.report.cli import main

pytestmark = [RULE_TRIPS, WIRING_REPORT]


def _train(root: Path, name: str, model: Any) -> dict[str, Any]:
    tb = TensorBoardLogger(root, name=name, version="tb", default_hp_metric=False)
    csv = CSVLogger(root, name=name, version="csv")
    callback = GradientFlowCallback(log_every_n_steps=2, rules=[])
    trainer(root, [callback], max_steps=8, logger=[tb, csv]).fit(model)
    return {"tb": Path(tb.log_dir), "csv": Path(csv.log_dir), "findings": callback.findings}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("diagnosed")
    return {
        "sigmoid": _train(root, "sigmoid", BlockNet(depth=5, activation="sigmoid")),
        "healthy": _train(root, "healthy", residual_net(post=False)),
    }


def _json(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, Any]:
    assert main(["report", str(path), "--format", "json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    return run  # type: ignore[no-any-return]


def _summary(findings: list[Any]) -> list[tuple[str, str, list[str]]]:
    return [(f["name"], f["confidence"], f["blocks"]) for f in findings]


@pytest.mark.parametrize("logger", ["tb", "csv"])
def test_report_on_logs_alone_reaches_the_callbacks_findings(
    runs: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str], logger: str
) -> None:
    sigmoid = runs["sigmoid"]
    assert (sigmoid[logger] / FACTS_FILENAME).is_file()  # written beside each logger's logs
    run = _json(capsys, sigmoid[logger])
    assert next(iter(run)) == "diagnosis"  # the first key
    diagnosis = run["diagnosis"]
    assert diagnosis["model_facts"] and diagnosis["measured_steps"] == 4
    expected = _summary([f.to_dict() for f in sigmoid["findings"]])
    assert (
        _summary(diagnosis["findings"])
        == expected
        == [("vanishing_flow", "high", ["blocks.1", "blocks.2", "blocks.3", "blocks.4"])]
    )
    (finding,) = diagnosis["findings"]
    (mine,) = sigmoid["findings"]
    assert any("Sigmoid" in line for line in finding["evidence"])
    assert finding["suggestions"] == mine.suggestions
    # TensorBoard stores float32: the numbers agree to its precision.
    assert finding["figures"]["end_to_end_gain"] == pytest.approx(
        mine.figures["end_to_end_gain"], rel=1e-5
    )


def test_text_report_puts_the_diagnosis_first(
    runs: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(runs["sigmoid"]["tb"])]) == 0
    out = capsys.readouterr().out
    assert out.index("Diagnosis (over 4 measured steps):") < out.index("Gradient Flow Report")
    assert "[high] Vanishing gradient flow" in out
    assert "saturating activation Sigmoid" in out


def test_healthy_run_says_so_with_numbers(
    runs: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    assert runs["healthy"]["findings"] == []
    run = _json(capsys, runs["healthy"]["csv"])
    assert run["diagnosis"]["healthy"] and run["diagnosis"]["findings"] == []
    summary = run["diagnosis"]["summary"]
    assert summary.startswith("Gradient flow looks healthy") and "4 healthy" in summary


def test_html_report_shows_the_diagnosis_above_the_pictures(
    runs: dict[str, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(runs["sigmoid"]["tb"]), "--out", str(tmp_path)]) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.index("<h3>Diagnosis</h3>") < page.index("<figure>")
    assert page.count("Vanishing gradient flow") == 1  # not repeated in the text report below


def test_report_without_the_facts_file_claims_less(
    runs: dict[str, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "csv"
    shutil.copytree(runs["sigmoid"]["csv"], copy)
    (copy / FACTS_FILENAME).unlink()
    run = _json(capsys, copy)
    assert not run["diagnosis"]["model_facts"]
    (finding,) = run["diagnosis"]["findings"]
    assert finding["name"] == "vanishing_flow"
    assert not any("Sigmoid" in line for line in finding["evidence"])  # unknown without facts
    assert main(["report", str(copy)]) == 0
    assert f"no {FACTS_FILENAME} beside the logs" in capsys.readouterr().out


def test_tensorboard_text_tab_holds_the_findings(runs: dict[str, dict[str, Any]]) -> None:
    accumulator = EventAccumulator(str(runs["sigmoid"]["tb"]), size_guidance={"tensors": 0})
    accumulator.Reload()
    (event,) = accumulator.Tensors(f"{DIAGNOSIS_TAG}/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert "**Vanishing gradient flow" in text and "confidence: high" in text
    assert event.step == 8
