"""``GradientGainMonitor`` (plain PyTorch): constructor, methods, summary keys and report format,
checked against references."""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
from reference import (
    FLOAT32_SUM_REL,
    NORM_TYPES,
    SUMMARY_KEYS,
    RefNet,
    assert_floats_equal,
    close_to,
    hooks_of,
    ref_gains,
    ref_log_gains,
    ref_norm,
    ref_summary,
)
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from lightning_gradwatch import GradientGainMonitor
from lightning_gradwatch.measure.probe import CALLS

OUTPUTS = ("tensor", "tuple", "dict", "model_output")


def _batch(seed: int = 0, n: int = 16) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return x, x.sum(dim=1, keepdim=True).sin()


def _backward(model: RefNet, seed: int = 0) -> None:
    """One forward/backward; the reference gradients stay retained on ``model._outputs``."""
    x, y = _batch(seed)
    nn.functional.mse_loss(model(x), y).backward()


def _ref_norms(model: RefNet, norm_type: str) -> list[Optional[float]]:
    return [
        None if t is None or t.grad is None else ref_norm(t.grad, norm_type) for t in model._outputs
    ]


def _model(output: str = "tensor", **kwargs: Any) -> RefNet:
    torch.manual_seed(0)
    return RefNet(depth=4, width=6, output=output, **kwargs)


class Scale(nn.Module):
    """``y = c * x``: the backward gain through it is exactly ``c``."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: Tensor) -> Tensor:
        return x * self.c


def _scaled(scales: list[float], **kwargs: Any) -> GradientGainMonitor:
    """Blocks with known gains: block i scales by ``scales[i]`` so gamma_i = scales[i]."""
    blocks = nn.ModuleList(Scale(c) for c in scales)
    monitor = GradientGainMonitor(blocks, **kwargs)
    h = torch.randn(8, 3, requires_grad=True)
    for block in blocks:
        h = block(h)
    h.sum().backward()  # dL/d(last output) = 1 everywhere
    return monitor


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_norms_gains_log_gains_match_reference(norm_type: str, output: str) -> None:
    model = _model(output)
    with GradientGainMonitor(model.blocks, norm_type=norm_type) as monitor:
        _backward(model)
        norms = monitor.norms()
        expected = _ref_norms(model, norm_type)
        assert all(n is not None and n > 0 for n in expected)
        assert_floats_equal(norms, expected, rel=1e-5)
        gains, log_gains = monitor.gains(), monitor.log_gains()
        assert len(gains) == len(log_gains) == len(model.blocks) - 1
        assert_floats_equal(gains, ref_gains(expected), rel=1e-5)
        assert_floats_equal(log_gains, ref_log_gains(expected), rel=1e-5, key="grad_log_gain/")
        stats = monitor.summary_stats()
        assert tuple(stats) == SUMMARY_KEYS
        want = ref_summary(expected)
        for key in SUMMARY_KEYS:
            assert stats[key] == close_to(want[key], f"grad_flow/{key}"), key


def test_known_gains_summary_and_report() -> None:
    monitor = _scaled([1.0, 0.9, 0.25, 3.0, 1.5])
    # Gains of float32 norms: each norm within FLOAT32_SUM_REL, a gain within twice that, a
    # log-gain within twice that absolutely (close_to derives it from the key).
    assert_floats_equal(monitor.gains(), [0.9, 0.25, 3.0, 1.5], key="grad_gain/")
    logs = [math.log(g) for g in (0.9, 0.25, 3.0, 1.5)]
    assert_floats_equal(monitor.log_gains(), logs, key="grad_log_gain/")
    stats = monitor.summary_stats()
    assert stats == {
        "mean_gain": close_to((0.9 + 0.25 + 3.0 + 1.5) / 4, "grad_flow/mean_gain"),
        "min_gain": close_to(0.25, "grad_flow/min_gain"),
        "max_gain": close_to(3.0, "grad_flow/max_gain"),
        "mean_log_gain": close_to(sum(logs) / 4, "grad_flow/mean_log_gain"),
        "num_amplifying": 1,
        "num_damping": 1,
        "num_healthy": 2,
        "num_vanishing": 0,
        "num_missing": 0,
    }
    report = monitor.report()
    for line in (
        "  Transition  0 to  1: gamma=0.9000, log_gamma=-0.1054 [Healthy]",
        "  Transition  1 to  2: gamma=0.2500, log_gamma=-1.3863 [DAMPING]",
        "  Transition  2 to  3: gamma=3.0000, log_gamma=1.0986 [AMPLIFYING]",
        "  Transition  3 to  4: gamma=1.5000, log_gamma=0.4055 [Healthy]",
    ):
        assert line in report.splitlines()
    assert "Gradient Gains (ratio of consecutive norms):" in report
    assert "Summary Statistics:" in report
    assert re.search(r"Mean gain: 1\.4125", report)
    assert "Healthy (0.5 <= gamma <= 2.0): 2" in report
    assert "Damping (gamma < 0.5): 1" in report
    assert "Amplifying (gamma > 2.0): 1" in report
    monitor.close()


def test_vanishing_and_missing_in_report() -> None:
    # Block 2 multiplies by 0: the outputs of blocks 0 and 1 get all-zero gradients.
    monitor = _scaled([1.0, 1.0, 0.0, 1.0])
    assert_floats_equal(monitor.norms(), [0.0, 0.0, math.sqrt(24), math.sqrt(24)], rel=1e-6)
    assert monitor.gains() == [math.inf, 0.0, pytest.approx(1.0)]
    assert monitor.log_gains() == [math.inf, -math.inf, pytest.approx(0.0, abs=1e-6)]
    stats = monitor.summary_stats()
    assert stats["num_vanishing"] == 1 and stats["num_damping"] == 1
    assert stats["num_healthy"] == 1 and stats["num_missing"] == 0
    assert stats["min_gain"] == 0.0 and stats["max_gain"] == pytest.approx(1.0)
    report = monitor.report()
    assert "  Transition  0 to  1: gamma=inf, log_gamma=inf [VANISHING]" in report
    assert "  Transition  1 to  2: gamma=0.0000, log_gamma=-inf [DAMPING]" in report
    monitor.close()


def test_thresholds_are_configurable() -> None:
    monitor = _scaled([1.0, 0.9, 3.0], damping_threshold=0.95, amplifying_threshold=4.0)
    stats = monitor.summary_stats()
    assert (stats["num_damping"], stats["num_healthy"], stats["num_amplifying"]) == (1, 1, 0)
    assert "[DAMPING]" in monitor.report() and "[AMPLIFYING]" not in monitor.report()
    assert "Healthy (0.95 <= gamma <= 4.0): 1" in monitor.report()
    monitor.close()


def test_eps_is_configurable() -> None:
    monitor = _scaled([1.0, 1.0, 1e-6], eps=1e-3)
    # norm[1] = 1e-6 * norm[2] ~ 5e-6 <= eps: gamma_1 = norm0 / norm1 counts as vanishing.
    assert monitor.gains()[0] == math.inf and monitor.gains()[1] == close_to(1e-6, "grad_gain/")
    assert monitor.summary_stats()["num_vanishing"] == 1
    monitor.close()


def test_frozen_and_skipped_blocks_are_missing() -> None:
    model = _model(skip=[2])
    model.stem.requires_grad_(False)
    model.blocks[0].requires_grad_(False)  # nothing before block 1 needs a gradient
    with GradientGainMonitor(model.blocks) as monitor:
        _backward(model)
        norms = monitor.norms()
        assert norms[0] is None and norms[2] is None
        assert norms[1] == pytest.approx(ref_norm(model._outputs[1].grad, "l2"), rel=1e-5)
        assert monitor.gains() == [None, None, None]
        stats = monitor.summary_stats()
        assert stats["num_missing"] == 3 and math.isnan(stats["mean_gain"])
        assert "None (no gradient)" in monitor.report()
        assert "[MISSING]" in monitor.report()


def test_strict_mode_raises_on_second_backward() -> None:
    model = _model()
    with GradientGainMonitor(model.blocks) as monitor:
        _backward(model, seed=0)
        with pytest.raises(RuntimeError, match=r"reset\(\)"):
            _backward(model, seed=1)
        monitor.reset()
        assert monitor.norms() == [None] * 4
        _backward(model, seed=2)  # fine after reset
        assert_floats_equal(monitor.norms(), _ref_norms(model, "l2"), rel=1e-5)


def test_non_strict_mode_overwrites() -> None:
    model = _model()
    with GradientGainMonitor(model.blocks, strict_single_backward=False) as monitor:
        _backward(model, seed=0)
        first = monitor.norms()
        model.zero_grad()
        _backward(model, seed=1)
        second = _ref_norms(model, "l2")
        assert_floats_equal(monitor.norms(), second, rel=1e-5)
        assert first[0] != pytest.approx(second[0], rel=1e-3)


def test_close_and_context_manager_remove_hooks() -> None:
    model = _model()
    assert hooks_of(model) == 0
    monitor = GradientGainMonitor(model.blocks)
    assert all(len(block._forward_hooks) == 1 for block in model.blocks)
    monitor.close()
    assert hooks_of(model) == 0
    _backward(model)
    assert monitor.norms() == [None] * 4  # nothing measured once closed
    with GradientGainMonitor(model.blocks, strict_single_backward=False) as monitor:
        assert hooks_of(model) == 4
    assert hooks_of(model) == 0
    monitor.close()  # closing twice is harmless


class InplaceChain(nn.Module):
    """Linear blocks whose outputs are modified in place (``inplace=True``) or out of place."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(5, 5) for _ in range(3))
        self.inplace = inplace
        self.outputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.outputs = []
        for block in self.blocks:
            x = block(x)
            if not self.inplace:
                x.retain_grad()
                self.outputs.append(x)
                x = x * 2.0
            else:
                x.mul_(2.0)
        return x.pow(2).sum()


def test_inplace_op_on_block_output() -> None:
    x = torch.randn(4, 5, requires_grad=True)
    reference = InplaceChain(inplace=False)
    reference(x).backward()
    model = InplaceChain(inplace=True)
    with GradientGainMonitor(model.blocks) as monitor:
        model(x).backward()
        expected = [ref_norm(t.grad, "l2") for t in reference.outputs]  # type: ignore[arg-type]
        assert_floats_equal(monitor.norms(), expected, rel=1e-5)


class CheckpointedNet(nn.Module):
    def __init__(self, mode: Optional[str]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(4, 6)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(3))
        self.mode = mode
        self.outputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        self.outputs = []
        for block in self.blocks:
            if self.mode is None:
                h = block(h)
                h.retain_grad()
                self.outputs.append(h)
            else:
                h = checkpoint(block, h, use_reentrant=self.mode == "reentrant")
        return h.pow(2).mean()


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant", "no_early_stop"])
def test_activation_checkpointing_measures_once(mode: str) -> None:
    x = torch.randn(8, 4)
    reference = CheckpointedNet(None)
    reference(x).backward()
    expected = [ref_norm(t.grad, "l2") for t in reference.outputs]  # type: ignore[arg-type]
    model = CheckpointedNet(mode)
    # Strict mode raises if any block's gradient arrives twice (e.g. once more in the recompute).
    with GradientGainMonitor(model.blocks, strict_single_backward=True) as monitor:
        if mode == "no_early_stop":
            with set_checkpoint_early_stop(False):
                model(x).backward()
        else:
            model(x).backward()
        assert_floats_equal(monitor.norms(), expected, rel=1e-5)
        assert monitor._probe.buffer[:, CALLS].tolist() == [1.0, 1.0, 1.0]  # one hook call each


def test_accepts_sequential_and_list() -> None:
    blocks = nn.Sequential(Scale(2.0), Scale(0.5), Scale(1.0))
    with GradientGainMonitor(blocks, norm_type="linf") as monitor:
        h = torch.ones(2, 2, requires_grad=True)
        blocks(h).sum().backward()
        assert_floats_equal(monitor.gains(), [0.5, 1.0], rel=1e-6)
    with GradientGainMonitor(list(blocks), norm_type="mean") as monitor:
        blocks(h).sum().backward()
        assert_floats_equal(monitor.norms(), [0.5, 1.0, 1.0], rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"norm_type": "l3"}, ValueError, r"`norm_type` must be one of .*'mean'.*got 'l3'"),
        ({"eps": 0.0}, ValueError, r"`eps` must be a finite number > 0, got 0\.0"),
        ({"eps": "tiny"}, TypeError, r"`eps` must be a positive number, got str: 'tiny'"),
        ({"strict_single_backward": "yes"}, TypeError, r"`strict_single_backward` must be a bool"),
        ({"damping_threshold": -1.0}, ValueError, r"`damping_threshold` must be .*got -1\.0"),
        ({"amplifying_threshold": math.inf}, ValueError, r"`amplifying_threshold`.*got inf"),
        (
            {"damping_threshold": 3.0, "amplifying_threshold": 2.0},
            ValueError,
            r"`damping_threshold` \(3\.0\) must not exceed `amplifying_threshold` \(2\.0\)",
        ),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type, pattern: str) -> None:
    blocks = nn.ModuleList(Scale(1.0) for _ in range(2))
    with pytest.raises(error, match=pattern):
        GradientGainMonitor(blocks, **kwargs)
    assert hooks_of(blocks) == 0  # a failed constructor leaves no hook behind


def test_bad_blocks_raise() -> None:
    block = Scale(1.0)
    with pytest.raises(
        TypeError, match=r"`blocks` must be a list, nn\.ModuleList .*got a single Scale"
    ):
        GradientGainMonitor(block)
    with pytest.raises(ValueError, match=r"`blocks` must contain at least one module"):
        GradientGainMonitor([])
    with pytest.raises(TypeError, match=r"`blocks\[1\]` must be an nn\.Module, got int"):
        GradientGainMonitor([block, 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"`blocks` must be separate nn\.Module instances"):
        GradientGainMonitor([block, block])


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
        assert monitor.norms() == pytest.approx(reference, rel=FLOAT32_SUM_REL)
        gains = monitor.gains()
        assert len(gains) == 3
        ratios = [reference[i - 1] / reference[i] for i in range(1, 4)]
        assert_floats_equal(gains, ratios, key="grad_gain/")
        stats = monitor.summary_stats()
        assert set(stats) == set(SUMMARY_KEYS)
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
        assert monitor.norms() == pytest.approx(reference, rel=FLOAT32_SUM_REL)
        ratios = [reference[0] / reference[1], reference[1] / reference[2]]
        assert_floats_equal(monitor.gains(), ratios, key="grad_gain/")
