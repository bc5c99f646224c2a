"""``GradientFlowCallback`` in a real Trainer: every logged figure against references captured by the
LightningModule itself; hook removal; argument validation; missing blocks; the logger requirement."""

from __future__ import annotations

import ast
import inspect
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from expected_warnings import WIRING_REPORT
from faults import FaultNet, fit_csv
from reference import (
    FLOW_KEYS,
    NORM_TYPES,
    STAT_KEYS,
    RefNet,
    approx_stats,
    assert_metrics_equal,
    close_to,
    csv_metrics,
    hooks_of,
    trainer,
)
from torch import Tensor

from lightning_gradwatch import GradientFlowCallback, GradientMeasurement
from lightning_gradwatch.numerics.norms import Category

pytestmark = WIRING_REPORT

OUTPUTS = ("tensor", "tuple", "dict", "model_output")

ROOT = Path(__file__).resolve().parents[1]


def _fit(model: RefNet, tmp_path: Any, max_steps: int = 3, **kwargs: Any) -> GradientFlowCallback:
    callback = GradientFlowCallback(**{"log_every_n_steps": 1, **kwargs})
    trainer(tmp_path, [callback], max_steps=max_steps).fit(model)
    return callback


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_every_figure_matches_reference(norm_type: str, output: str, tmp_path: Any) -> None:
    torch.manual_seed(0)
    # ReLU and a parameter with an all-zero gradient make zero_fraction non-trivial; a low
    # large_threshold makes large_fraction non-trivial.
    model = RefNet(activation="relu", output=output, dead_param=True)
    callback = _fit(
        model, tmp_path, norm_type=norm_type, large_threshold=0.05, log_param_norms=True
    )
    params = [name for name, p in model.named_parameters()]

    def expected(step: int) -> dict[str, float]:
        return model.expected(step, norm_type, large_threshold=0.05, param_keys=params)

    last = callback.last
    assert isinstance(last, GradientMeasurement)
    assert last.step == 2 and last.norm_type == norm_type
    assert_metrics_equal(last.metrics, expected(2))
    # The structured fields agree with the flat dict.
    ref = expected(2)
    assert last.block_names == model.block_names()
    assert last.block_norms == [close_to(ref[f"grad_norm/{n}"]) for n in last.block_names]
    assert last.total_norm == pytest.approx(ref["grad_norm_total"], rel=1e-5)
    assert last.summary == {k: close_to(ref[f"grad_flow/{k}"], f"grad_flow/{k}") for k in FLOW_KEYS}
    assert last.grad_stats == approx_stats({k: ref[f"grad_stats/{k}"] for k in STAT_KEYS})
    assert last.param_norms == {
        p: pytest.approx(ref[f"grad_param_norm/{p}"], rel=1e-5) for p in params
    }
    assert ref["grad_stats/zero_fraction"] > 0 and 0 < ref["grad_stats/large_fraction"] < 1
    # Every step was measured and logged with its own figures (the probe is reset between steps).
    logged = csv_metrics(callback_log_dir(tmp_path))
    assert sorted(logged) == [0, 1, 2]
    for step in range(3):
        figures = expected(step)
        # The default rule (nonfinite -> halt) adds its counter and, being checked every step, the
        # interval's max and mean of the total norm (one step per interval here: the value itself).
        total = figures["grad_norm_total"]
        governance = {
            "grad_alerts/nonfinite": 0.0,
            "grad_norm_total_max": total,
            "grad_norm_total_mean": total,
        }
        assert_metrics_equal(logged[step], figures | governance)


def callback_log_dir(tmp_path: Any) -> str:
    return str(tmp_path / "csv" / "version_0")


def test_categories_and_gain_keys(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = RefNet(activation="sigmoid", depth=5)  # sigmoid: every transition damps (gain <= 1/4)
    callback = _fit(model, tmp_path, max_steps=1, damping_threshold=0.3)
    last = callback.last
    assert last is not None
    metrics = last.metrics
    assert "grad_gain/blocks.0" not in metrics and "grad_log_gain/blocks.0" not in metrics
    for i in range(1, 5):
        gain = metrics[f"grad_gain/blocks.{i}"]
        assert gain == pytest.approx(
            metrics[f"grad_norm/blocks.{i - 1}"] / metrics[f"grad_norm/blocks.{i}"], rel=1e-9
        )
        # log(a) - log(b) against log(a / b): float64 rounding, absolute (the value may be ~0).
        assert metrics[f"grad_log_gain/blocks.{i}"] == pytest.approx(math.log(gain), abs=1e-12)
        assert last.categories[i - 1] is (Category.DAMPING if gain < 0.3 else Category.HEALTHY)
    assert metrics["grad_flow/num_damping"] + metrics["grad_flow/num_healthy"] == 4
    assert metrics["grad_flow/num_damping"] == sum(c is Category.DAMPING for c in last.categories)
    assert metrics["grad_flow/end_to_end_gain"] == pytest.approx(
        metrics["grad_norm/blocks.0"] / metrics["grad_norm/blocks.4"], rel=1e-9
    )
    assert metrics["grad_flow/end_to_end_gain"] < 0.3**4  # the gradient vanishes backward


@pytest.mark.parametrize(
    ("log_param_norms", "keys"),
    [
        (False, []),
        (True, None),
        (
            "*.weight",
            ["stem.weight", "head.weight", *(f"blocks.{i}.linear.weight" for i in range(4))],
        ),
        (["stem.*", "head.bias"], ["stem.weight", "stem.bias", "head.bias"]),
    ],
)
def test_param_norm_filter(log_param_norms: Any, keys: Any, tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = RefNet()
    callback = _fit(model, tmp_path, max_steps=1, log_param_norms=log_param_norms, norm_type="l1")
    params = [name for name, _ in model.named_parameters()]
    keys = params if keys is None else keys
    last = callback.last
    assert last is not None
    expected = model.expected(0, "l1", param_keys=keys)
    assert_metrics_equal(last.metrics, expected)
    # The record holds what was asked for and nothing more (issue 19, item 5) ...
    assert last.param_norms == {
        key: pytest.approx(expected[f"grad_param_norm/{key}"], rel=1e-5) for key in keys
    }
    # ... while the checks that need every parameter still see all of them.
    assert last.grads_measured == len(params) and last.nonfinite_params == []


def test_grad_stats_can_be_turned_off(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = RefNet()
    callback = _fit(model, tmp_path, max_steps=1, log_grad_stats=False)
    assert callback.last is not None and callback.last.grad_stats == {}
    assert_metrics_equal(callback.last.metrics, model.expected(0, grad_stats=False))


class InfGradNet(RefNet):
    """One parameter's gradient is replaced by +inf (a real non-finite gradient, not a mock)."""

    def __init__(self) -> None:
        super().__init__(dead_param=True)
        assert self.dead is not None
        self.dead.register_hook(lambda grad: torch.full_like(grad, math.inf))


def test_non_finite_gradients_are_counted(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = InfGradNet()
    # rules=[]: measure only (the default rule would halt on the non-finite gradient).
    callback = _fit(model, tmp_path, max_steps=1, rules=[])
    assert callback.last is not None
    metrics = callback.last.metrics
    assert metrics["grad_stats/nonfinite_count"] == 5
    assert metrics["grad_norm_total"] == math.inf
    assert_metrics_equal(metrics, model.expected(0))
    # Found among every parameter, though no parameter norm was asked for.
    assert callback.last.nonfinite_params == ["dead"] and callback.last.param_norms == {}


def test_measured_steps_follow_the_interval(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = RefNet()
    callback = _fit(model, tmp_path, max_steps=10, log_every_n_steps=3)
    assert callback.last is not None and callback.last.step == 9
    assert_metrics_equal(callback.last.metrics, model.expected(9))
    # Tensor hooks are registered on block outputs only in the forward of a measured step.
    hooked_steps = [step for step, counts in enumerate(model.tensor_hooks) if any(counts)]
    assert hooked_steps == [0, 3, 6, 9]
    assert all(counts == [1, 1, 1, 1] for counts in (model.tensor_hooks[s] for s in hooked_steps))


def _assert_no_hooks(model: RefNet) -> None:
    assert all(len(block._forward_hooks) == 0 for block in model.blocks)
    assert hooks_of(model) == 0


def test_hooks_removed_after_fit(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = RefNet()
    callback = GradientFlowCallback(log_every_n_steps=1)
    fit_trainer = trainer(tmp_path, [callback], max_steps=2)
    fit_trainer.fit(model)
    _assert_no_hooks(model)
    # A forward/backward after fit is not measured any more.
    last = callback.last
    x = torch.randn(3, 4)
    model(x).sum().backward()
    assert callback.last is last and [t._backward_hooks for t in model._outputs] == [None] * 4
    # A second fit with the same callback attaches again and cleans up again.
    fit_trainer = trainer(tmp_path, [callback], max_steps=3)
    fit_trainer.fit(model)
    assert callback.last is not last and callback.last is not None and callback.last.step == 2
    _assert_no_hooks(model)


class Explodes(RefNet):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.global_step == 2:
            raise RuntimeError("boom in training_step")
        return super().training_step(batch, batch_idx)


def test_hooks_removed_after_exception_in_training_step(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = Explodes()
    callback = GradientFlowCallback(log_every_n_steps=1)
    with pytest.raises(RuntimeError, match="boom in training_step"):
        trainer(tmp_path, [callback], max_steps=5).fit(model)
    assert callback.last is not None and callback.last.step == 1
    _assert_no_hooks(model)


def test_skipped_block_is_missing(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = RefNet(skip=[2])  # blocks.2 never runs
    callback = _fit(model, tmp_path, max_steps=2)
    last = callback.last
    assert last is not None
    metrics = last.metrics
    assert last.block_norms[2] is None
    assert "grad_norm/blocks.2" not in metrics
    assert "grad_gain/blocks.2" not in metrics and "grad_gain/blocks.3" not in metrics
    assert metrics["grad_flow/num_missing"] == 2
    assert last.categories[1] is Category.MISSING and last.categories[2] is Category.MISSING
    assert_metrics_equal(metrics, model.expected(1))
    assert sorted(csv_metrics(callback_log_dir(tmp_path))) == [0, 1]


def test_frozen_blocks_are_missing(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = RefNet()
    model.stem.requires_grad_(False)
    model.blocks[0].requires_grad_(False)
    callback = _fit(model, tmp_path, max_steps=2, log_param_norms=True)
    assert callback.last is not None
    metrics = callback.last.metrics
    assert "grad_norm/blocks.0" not in metrics and metrics["grad_flow/num_missing"] == 1
    assert not any(key.startswith("grad_param_norm/stem") for key in metrics)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    # grad_stats and grad_norm_total cover the trainable parameters only.
    assert_metrics_equal(metrics, model.expected(1, param_keys=trainable))


def test_no_logger_is_an_error_unless_allowed(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = RefNet()
    with pytest.raises(ValueError, match=r"needs a logger.*require_logger=False"):
        trainer(tmp_path, [GradientFlowCallback()], logger=False).fit(model)
    assert model.refs == {}  # raised at fit start, before any step
    _assert_no_hooks(model)
    callback = GradientFlowCallback(log_every_n_steps=1, require_logger=False)
    trainer(tmp_path, [callback], logger=False, max_steps=1).fit(model)
    assert callback.last is not None
    assert_metrics_equal(callback.last.metrics, model.expected(0))


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        (
            {"log_every_n_steps": 0},
            ValueError,
            r"`log_every_n_steps` must be a positive integer \(>= 1\), got 0",
        ),
        (
            {"log_every_n_steps": 2.5},
            TypeError,
            r"`log_every_n_steps` must be an int, got float: 2\.5",
        ),
        ({"log_every_n_steps": True}, TypeError, r"`log_every_n_steps` must be an int, got bool"),
        (
            {"norm_type": "L2"},
            ValueError,
            r"`norm_type` must be one of \['l2', 'l1', 'linf', 'mean'\], got 'L2'",
        ),
        (
            {"log_param_norms": 3},
            TypeError,
            r"`log_param_norms` must be a bool, a glob pattern .*got int: 3",
        ),
        ({"log_param_norms": ["a", 1]}, TypeError, r"`log_param_norms` .*got list"),
        ({"log_grad_stats": "yes"}, TypeError, r"`log_grad_stats` must be a bool, got str: 'yes'"),
        ({"log_histograms": 1}, TypeError, r"`log_histograms` must be a bool, got int: 1"),
        (
            {"large_threshold": -1},
            ValueError,
            r"`large_threshold` must be a finite number > 0, got -1",
        ),
        ({"eps": 0}, ValueError, r"`eps` must be a finite number > 0, got 0"),
        ({"eps": None}, TypeError, r"`eps` must be a positive number, got NoneType: None"),
        (
            {"damping_threshold": math.nan},
            ValueError,
            r"`damping_threshold` must be a finite number > 0, got nan",
        ),
        (
            {"amplifying_threshold": "2"},
            TypeError,
            r"`amplifying_threshold` must be a positive number, got str",
        ),
        (
            {"damping_threshold": 2.5},
            ValueError,
            r"`damping_threshold` \(2\.5\) must not exceed `amplifying_threshold` \(2\.0\)",
        ),
        ({"require_logger": "no"}, TypeError, r"`require_logger` must be a bool, got str: 'no'"),
        ({"blocks": 7}, TypeError, r"`blocks` must be 'auto', an attribute path .*got int: 7"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        GradientFlowCallback(**kwargs)


def test_defaults() -> None:
    callback = GradientFlowCallback()
    assert callback.blocks == "auto" and callback.log_every_n_steps == 50
    assert callback.spec.norm_type == "l2" and callback.spec.log_param_norms is False
    assert callback.spec.large_threshold == 1.0 and callback.spec.grad_stats is True
    assert (callback.spec.damping_threshold, callback.spec.amplifying_threshold) == (0.5, 2.0)
    assert callback.require_logger is True and callback.log_histograms is False
    assert callback.last is None


def _readme_row(readme: str, key: str) -> list[str]:
    [row] = [line for line in readme.splitlines() if line.startswith(f"| `{key}`")]
    meaning = row.split("|")[2]
    return [t for t in re.findall(r"`([^`]+)`", meaning) if re.fullmatch(r"[a-z_]+", t)]


def test_readme_table_and_arguments_match_the_code(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    model = FaultNet(depth=3)
    callback = GradientFlowCallback(log_every_n_steps=1, log_param_norms=True, norm_type="l1")
    assert callback.norm_type == "l1" and GradientFlowCallback().norm_type == "l2"
    trainer = fit_csv(tmp_path, model, [callback], max_steps=1, log_every_n_steps=1000)
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
    # The default rule's own keys (its counter; the interval's max and mean of the total norm it
    # checks every step) are described in the README's governance section.
    governance = {"grad_alerts/nonfinite", "grad_norm_total_max", "grad_norm_total_mean"}
    section = readme.split("## Governance", 1)[1]
    assert all(f"`{key.split('/')[0]}" in section for key in governance)
    assert logged == expected | governance
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
