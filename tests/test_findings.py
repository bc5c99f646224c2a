"""Diagnoses on small models built to show one problem each, trained with a real Trainer on CPU:
each finding appears with its evidence (the numbers, the blocks, the activation class) and its
suggestion, and a healthy Pre-LN residual net gets no finding but the numbers that say so."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from diag_models import WiringNet, dead_relu_net, linear_stack, residual_net
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from models import BlockNet
from reference import trainer
from torch import nn

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch.diagnosis.findings import Finding

pytestmark = [RULE_TRIPS, WIRING_REPORT]


def fit(tmp_path: Path, model: Any, steps: int = 3, **kwargs: Any) -> GradientFlowCallback:
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[])
    trainer(tmp_path, [callback], max_steps=steps, **kwargs).fit(model)
    return callback


def by_name(findings: list[Finding]) -> dict[str, Finding]:
    return {finding.name: finding for finding in findings}


def text(finding: Finding) -> str:
    return "\n".join([*finding.evidence, *finding.suggestions])


def test_sigmoid_mlp_vanishing_flow_names_sigmoid(tmp_path: Path) -> None:
    callback = fit(tmp_path, BlockNet(depth=5, activation="sigmoid"))
    found = by_name(callback.findings)
    assert list(found) == ["vanishing_flow"]
    vanishing = found["vanishing_flow"]
    assert vanishing.confidence == "high"
    assert "Sigmoid" in text(vanishing) and "ReLU or GELU" in vanishing.suggestions[0]
    # The evidence is the measured figures: every transition damps, end to end far below 0.1.
    last = callback.last
    assert last is not None and all(gain < 0.5 for gain in last.gains if gain is not None)
    assert vanishing.figures["end_to_end_gain"] < 1e-2
    assert last.summary["end_to_end_gain"] == pytest.approx(
        vanishing.figures["end_to_end_gain"], rel=1.0
    )
    # Already at step 0: the first-step report lists it.
    report = callback.first_step_report
    assert report is not None and [f.name for f in report.findings] == ["vanishing_flow"]
    assert "Vanishing gradient flow" in report.message()


def test_std5_init_exploding_flow_reports_the_init_ratio(tmp_path: Path) -> None:
    model = linear_stack(std=5.0, width=20)
    layers = [m for m in model.blocks.modules() if isinstance(m, nn.Linear)]
    ratios = [m.weight.std().item() * math.sqrt(m.in_features) for m in layers]
    expected = max(ratios)
    assert expected == pytest.approx(5 * math.sqrt(20), rel=0.15)  # what std 5 means at fan_in 20
    callback = fit(tmp_path, model)
    exploding = by_name(callback.findings)["exploding_flow"]
    assert exploding.figures["init_ratio"] == pytest.approx(expected, rel=1e-5)
    assert exploding.figures["init_layer"] == f"blocks.{ratios.index(expected)}.weight"
    assert exploding.confidence == "high"  # gains of about 20 per block: e2e far above 1e3
    first, norm, clip = exploding.suggestions
    assert "re-initialise" in first and "clip" in clip
    # The plain Linear blocks have no norm: the facts show it, so it is offered for each of them.
    assert norm.startswith("add normalisation") and "blocks.0, blocks.1, blocks.2, blocks.3" in norm
    assert "vanishing_flow" not in by_name(callback.findings)


def test_dead_relu_units(tmp_path: Path) -> None:
    callback = fit(tmp_path, dead_relu_net(shift=-3.0))
    dead = by_name(callback.findings)["dead_units"]
    assert callback.last is not None
    zero_fraction = callback.last.grad_stats["zero_fraction"]
    assert zero_fraction >= 0.5
    assert dead.figures["zero_fraction"] >= 0.5
    assert "ReLU" in text(dead) and "LeakyReLU or GELU" in dead.suggestions[0]
    assert dead.blocks == [f"blocks.{i}" for i in range(4)]


def test_disconnected_and_dead_parameters_told_apart(tmp_path: Path) -> None:
    callback = fit(tmp_path, WiringNet(), steps=1)
    found = by_name(callback.findings)
    assert found["disconnected_parameters"].blocks == ["unused"]  # grad is None
    assert found["dead_parameters"].blocks == ["dead"]  # connected, all-zero gradient
    # The frozen head requires no grad: it is neither.
    assert not any("head" in name for f in found.values() for name in f.blocks)
    message = callback.first_step_report.message()  # type: ignore[union-attr]
    assert "Disconnected parameters" in message and "Dead parameters" in message


def test_post_ln_stack_suggests_pre_ln(tmp_path: Path) -> None:
    callback = fit(tmp_path, residual_net(post=True))
    facts = callback._diagnosis.history.facts
    assert facts is not None and all(block.post_norm for block in facts.blocks)
    post = by_name(callback.findings)["post_norm_gains"]
    assert "LayerNorm" in post.evidence[0]
    assert "Pre-LN" in post.suggestions[0]
    assert post.figures["end_to_end_gain"] < 0.5  # about 0.7 per block, compounded


def test_healthy_pre_ln_net_gets_no_finding_and_the_numbers(tmp_path: Path) -> None:
    callback = fit(tmp_path, residual_net(post=False))
    facts = callback._diagnosis.history.facts
    assert facts is not None and not any(block.post_norm for block in facts.blocks)
    assert callback.findings == []
    history = callback._diagnosis.history
    from lightning_gradwatch.diagnosis.findings import healthy_summary

    summary = healthy_summary(history)
    assert summary.startswith("Gradient flow looks healthy")
    assert "3 measured step(s)" in summary and "4 healthy" in summary
    assert "Median end-to-end gain" in summary and "gradient zero fraction" in summary


def test_clip_bound_below_the_typical_norm(tmp_path: Path) -> None:
    callback = fit(tmp_path, BlockNet(depth=3), steps=5, gradient_clip_val=1e-4)
    clip = by_name(callback.findings)["clipping_always"]
    assert clip.confidence == "high"  # 5 of 5 measured steps
    assert "gradient_clip_val bound 0.0001 on 5 of 5" in clip.evidence[0]
    totals = sorted(row.total_norm for row in callback._diagnosis.history.steps)  # type: ignore[type-var]
    p90 = totals[3] + 0.6 * (totals[4] - totals[3])  # numpy's linear 90th percentile of 5 values
    assert clip.figures["p90_total"] == pytest.approx(p90)
    assert f"{p90:.3g}" in clip.suggestions[0]
