"""Acceptance checks of the documented names, defaults, files and behaviours, checked the way a
reader of the documentation alone would check them (real Trainer, real loggers)."""

from __future__ import annotations

import ast
import inspect
import math
import re
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from expected_warnings import RULE_TRIPS
from faults import FaultNet, same_weights, snapshot
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from reference import csv_metrics, hooks_of, ref_norm
from torch import Tensor, nn

from lightning_gradwatch import GradientFlowCallback, GradientGainMonitor, Rule
from lightning_gradwatch.alerts import read_alerts

pytestmark = RULE_TRIPS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_gradwatch"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None


def fit(
    tmp_path: Path, model: pl.LightningModule, callbacks: list[Any], **kwargs: Any
) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "max_steps": 4,
        "logger": CSVLogger(str(tmp_path), name="csv", version=0),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(tmp_path),
    }
    options.update(kwargs)
    trainer = pl.Trainer(callbacks=callbacks, **options)
    trainer.fit(model)
    return trainer


# -- layout and set-up -----------------------------------------------------------------------------


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_package_layout_and_two_command_setup() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta = project["project"]
    assert meta["name"] == "lightning-gradwatch"
    deps = " ".join(meta["dependencies"])
    for requirement in ("torch>=", "lightning>=", "tensorboard>="):
        assert requirement in deps
    assert "matplotlib" not in deps  # an optional extra only
    assert any("matplotlib" in d for d in meta["optional-dependencies"]["plots"])
    assert (PACKAGE / "py.typed").exists()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["lightning_gradwatch"]

    makefile = (ROOT / "Makefile").read_text()
    for step in ("venv", "pip install", "-e .", "ruff check", "ruff format --check", "mypy"):
        assert step in makefile
    assert "pytest" in makefile and "examples/demo.py" in makefile
    assert re.search(r"^torch==", (ROOT / "requirements" / "test.txt").read_text(), re.MULTILINE)
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1].strip() == "make test"
    assert not any(line.strip().startswith(("pytest", "python", "pip")) for line in ci)
    first_block = (ROOT / "README.md").read_text().split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line]
    assert sorted(commands) == ["make demo", "make test"]


def test_no_pytorch_lightning_and_matplotlib_imported_lazily() -> None:
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "pytorch_lightning" for n in names), path
        # matplotlib (the `plots` extra) only inside functions, never at import time.
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                assert not any(n.split(".")[0] == "matplotlib" for n in names), path


# -- GradientGainMonitor ---------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, output: str) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 5)
        self.output = output

    def forward(self, x: Any) -> Any:
        if isinstance(x, list):
            x = x[0]
        elif isinstance(x, dict):
            x = x["hidden_states"]
        h = torch.tanh(self.linear(x))
        if self.output == "list":
            return [h, 7]
        return {"attentions": None, "hidden_states": h}


@pytest.mark.parametrize("output", ["list", "hidden_states"])
def test_monitor_report_contract(output: str) -> None:
    defaults = {
        name: p.default for name, p in inspect.signature(GradientGainMonitor).parameters.items()
    }
    assert list(defaults)[:4] == ["blocks", "norm_type", "strict_single_backward", "eps"]
    assert (defaults["norm_type"], defaults["strict_single_backward"], defaults["eps"]) == (
        "l2",
        True,
        1e-30,
    )
    torch.manual_seed(0)
    blocks = nn.ModuleList(_Block(output) for _ in range(4))
    with torch.no_grad():
        blocks[2].linear.weight.mul_(30.0)  # saturates tanh: a damping transition
    with GradientGainMonitor(blocks) as monitor:
        # A forward hook per block, never a full backward hook.
        assert all(len(b._forward_hooks) == 1 and not b._backward_hooks for b in blocks)
        h: Any = torch.randn(3, 5)
        outputs = []
        for block in blocks:
            h = block(h)
            tensor = h[0] if output == "list" else h["hidden_states"]
            tensor.retain_grad()
            outputs.append(tensor)
        outputs[-1].pow(2).sum().backward()
        reference = [ref_norm(t.grad, "l2") for t in outputs]  # type: ignore[arg-type]
        assert monitor.norms() == pytest.approx(reference, rel=1e-6)
        gains = monitor.gains()
        assert len(gains) == 3
        assert gains == pytest.approx([reference[i - 1] / reference[i] for i in range(1, 4)])
        stats = monitor.summary_stats()
        assert set(stats) == {
            "mean_gain",
            "min_gain",
            "max_gain",
            "mean_log_gain",
            "num_amplifying",
            "num_damping",
            "num_healthy",
            "num_vanishing",
            "num_missing",
        }
        counts = [stats[k] for k in stats if k.startswith("num_")]
        assert all(isinstance(c, int) for c in counts) and sum(counts) == 3
        report = monitor.report()
        for i, (gain, log_gain) in enumerate(zip(gains, monitor.log_gains())):
            assert (
                f"Transition {i:2d} to {i + 1:2d}: gamma={gain:.4f}, log_gamma={log_gain:.4f} ["
                in (report)
            )
        assert f"Healthy (0.5 <= gamma <= 2.0): {stats['num_healthy']}" in report
        assert f"Damping (gamma < 0.5): {stats['num_damping']}" in report
        assert f"Amplifying (gamma > 2.0): {stats['num_amplifying']}" in report
        assert f"Mean gain: {stats['mean_gain']:.4f}" in report
        with pytest.raises(RuntimeError, match="reset"):
            h = torch.randn(3, 5)
            for block in blocks:
                h = block(h)
            (h[0] if output == "list" else h["hidden_states"]).sum().backward()
    assert not any(b._forward_hooks for b in blocks)


# -- README table and signature match the code -----------------------------------------------------


def _readme_row(readme: str, key: str) -> list[str]:
    [row] = [line for line in readme.splitlines() if line.startswith(f"| `{key}`")]
    meaning = row.split("|")[2]
    return [t for t in re.findall(r"`([^`]+)`", meaning) if re.fullmatch(r"[a-z_]+", t)]


def test_readme_table_and_arguments_match_the_code(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    model = FaultNet(depth=3)
    callback = GradientFlowCallback(log_every_n_steps=1, log_param_norms=True, norm_type="l1")
    assert callback.norm_type == "l1" and GradientFlowCallback().norm_type == "l2"
    trainer = fit(tmp_path, model, [callback], max_steps=1, log_every_n_steps=1000)
    logged = set(csv_metrics(str(trainer.logger.log_dir))[0])  # type: ignore[union-attr]
    blocks = [f"blocks.{i}" for i in range(3)]
    params = [name for name, _ in model.named_parameters()]
    expected = {"grad_norm_total"}
    expected |= {f"grad_norm/{b}" for b in blocks}
    expected |= {f"grad_{kind}/{b}" for kind in ("gain", "log_gain") for b in blocks[1:]}
    expected |= {f"grad_param_norm/{p}" for p in params}
    expected |= {f"grad_flow/{s}" for s in _readme_row(readme, "grad_flow/<stat>")}
    expected |= {f"grad_stats/{s}" for s in _readme_row(readme, "grad_stats/<stat>")}
    assert "grad_flow/end_to_end_gain" in expected and "grad_stats/nonfinite_count" in expected
    assert logged == expected
    # The README's categories are the code's, and categories read as their names.
    section = readme.split("### Categories", 1)[1].split("\n\n")[1]
    documented = {row.split("|")[1].strip() for row in section.splitlines()[2:]}
    assert documented == {"healthy", "damping", "amplifying", "vanishing", "missing"}
    assert callback.last is not None and len(callback.last.categories) == 2
    assert {str(c) for c in callback.last.categories} <= documented
    for key in ("grad_norm/<block>", "grad_gain/<block>", "grad_log_gain/<block>"):
        assert key in readme and key in (GradientFlowCallback.__doc__ or "")

    # The README's argument list is the constructor's, defaults included.
    match = re.search(r"`GradientFlowCallback\((blocks=.*?)\)`", readme, re.S)
    assert match is not None
    call = ast.parse("f(" + " ".join(match.group(1).split()) + ")").body[0].value  # type: ignore[attr-defined]
    documented = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    signature = inspect.signature(GradientFlowCallback).parameters
    assert documented == {name: p.default for name, p in signature.items()}


# -- the documented example rules, together ---------------------------------------------------------


def test_documented_example_rules_work_together(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spike = 24
    model = FaultNet(spike_step=spike, spike=1000.0)
    rules = [
        Rule("grad_norm_total", max=5.0, action="clip", clip_to=1.0),
        Rule("grad_gain/*", max=2.0, patience=3, action="warn"),  # wildcard over blocks
        Rule("grad_norm_total", zscore=6.0, window=200, action="skip"),  # adaptive spike detection
        Rule("nonfinite", action="halt"),
    ]
    callback = GradientFlowCallback(log_every_n_steps=4, rules=rules)  # no name= needed
    assert callback.rules == rules
    trainer = fit(tmp_path, model, [callback], max_steps=spike + 3, log_every_n_steps=1000)

    assert not callback.halted
    at_spike = [a for a in callback.alerts if a.step == spike]
    assert {(a.rule, a.action) for a in at_spike} == {
        ("grad_norm_total", "clip"),
        ("grad_norm_total#2", "skip"),
    }
    assert not [a for a in callback.alerts if a.metric == "grad_norm_total" and a.step != spike]
    # Skip beats clip: the spiked step changed no weight, training went on afterwards.
    assert same_weights(model.weights[spike + 1], model.weights[spike])
    assert not same_weights(model.weights[spike + 2], model.weights[spike + 1])
    spiked = model.grads_after_backward[spike]
    value = float(torch.cat([g.reshape(-1) for g in spiked.values()]).norm())
    for alert in at_spike:
        assert alert.value == pytest.approx(value, rel=1e-5)
    # One counter per rule, each under its own name.
    logged = csv_metrics(str(trainer.logger.log_dir))  # type: ignore[union-attr]
    labels = ["grad_norm_total", "grad_gain/*", "grad_norm_total#2", "nonfinite"]
    counters = {k: v for k, v in logged[spike].items() if k.startswith("grad_alerts/")}
    assert set(counters) == {f"grad_alerts/{label}" for label in labels}
    assert counters["grad_alerts/grad_norm_total"] == counters["grad_alerts/grad_norm_total#2"] == 1
    assert set(callback.state_dict()["governance"]["rules"]) == set(labels)


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
    fit(tmp_path, model, [callback], max_steps=1, logger=logger)

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


# -- default rules, a halt that keeps the last good weights, a pathlib alerts_path -----------------


def test_default_rules_halt_on_nan_with_a_pathlib_alerts_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    s = 3
    model = FaultNet(poison_block=2, poison_steps=(s,))
    trail = tmp_path / "audit" / "trail.jsonl"
    callback = GradientFlowCallback(log_every_n_steps=2, alerts_path=trail)  # rules=None
    assert callback.rules == [Rule("nonfinite", action="halt")]
    with pytest.raises(TypeError, match=r"`alerts_path` must be a path .*got int: 3"):
        GradientFlowCallback(alerts_path=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`alerts_path` must be a non-empty path"):
        GradientFlowCallback(alerts_path="")
    trainer = fit(tmp_path, model, [callback], max_steps=10)

    assert callback.halted is True and "blocks.2" in (callback.halt_reason or "")
    assert trainer.should_stop and max(model.weights) == s
    assert same_weights(snapshot(model), model.weights[s])  # the last good weights
    assert hooks_of(model) == 1  # only FaultNet's own poisoning hook: ours are gone
    [record] = read_alerts(str(trail))
    assert (record["step"], record["action"], record["block"]) == (s, "halt", "blocks.2")
    assert "blocks.2" in record["where"]
    checkpoint = Path(record["checkpoint"])
    assert checkpoint.parent == trail.parent and checkpoint.exists()
    restored = FaultNet.load_from_checkpoint(str(checkpoint))
    assert same_weights(snapshot(restored), model.weights[s])


# -- skip / halt with the Trainer's own value clipping ----------------------------------------------


class _ClipValueSeen(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seen.append(trainer.gradient_clip_val)


def test_skip_with_trainer_value_clipping(tmp_path: Path) -> None:
    # torch's clip_grad_value_ raises when no parameter has a gradient: a skipped step must not
    # hand Lightning's value clipping an empty list, and clipping must work again afterwards.
    torch.manual_seed(0)
    s, clip = 2, 0.01
    model = FaultNet(poison_block=1, poison_steps=(s,))
    seen = _ClipValueSeen()
    callback = GradientFlowCallback(log_every_n_steps=3, rules=[Rule("nonfinite", action="skip")])
    trainer = fit(
        tmp_path,
        model,
        [callback, seen],
        max_steps=5,
        gradient_clip_val=clip,
        gradient_clip_algorithm="value",
    )
    assert [(a.step, a.action) for a in callback.alerts] == [(s, "skip")]
    assert same_weights(model.weights[s + 1], model.weights[s])
    assert trainer.gradient_clip_val == clip and seen.seen == [clip] * 5
    # After the skip the optimizer sees clamped gradients again: w' = w - lr * clamp(g).
    step = s + 1
    grads: dict[str, Tensor] = model.grads_at_step[step]
    for name, before in model.weights[step].items():
        expected = before - model.lr * grads[name].clamp(-clip, clip)
        assert torch.allclose(model.weights[step + 1][name], expected, atol=1e-7)
    assert any(g.abs().max() > clip for g in grads.values())  # the clamp did bind
    assert all(math.isfinite(float(w.sum())) for w in snapshot(model).values())
