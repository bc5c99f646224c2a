"""Independent reference figures for the tests: computed straight from gradients with plain torch ops
in float64, sharing no code with ``lightning_gradwatch`` (so a bug there cannot hide in both)."""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from models import BlockNet, unwrap
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

NORM_TYPES = ("l2", "l1", "linf", "mean")
SUMMARY_KEYS = (
    "mean_gain",
    "min_gain",
    "max_gain",
    "mean_log_gain",
    "num_amplifying",
    "num_damping",
    "num_healthy",
    "num_vanishing",
    "num_missing",
)
FLOW_KEYS = (*SUMMARY_KEYS, "end_to_end_gain")
STAT_KEYS = ("mean", "std", "min", "max", "zero_fraction", "large_fraction", "nonfinite_count")

if TYPE_CHECKING:
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_gradwatch import GradientFlowCallback


def ref_norm(grads: Union[Tensor, Sequence[Tensor]], norm_type: str) -> float:
    """The norm of one tensor, or of several tensors taken together as one flat vector."""
    tensors = [grads] if isinstance(grads, Tensor) else list(grads)
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors]).abs()
    if norm_type == "l2":
        return flat.pow(2).sum().sqrt().item()
    if norm_type == "l1":
        return flat.sum().item()
    if norm_type == "linf":
        return flat.max().item()
    if norm_type == "mean":
        return flat.mean().item()
    raise AssertionError(norm_type)


def ref_gains(norms: Sequence[Optional[float]], eps: float = 1e-30) -> list[Optional[float]]:
    """gamma_i = norm[i-1] / norm[i]; None where a norm is missing; inf where norm[i] <= eps."""
    out: list[Optional[float]] = []
    for i in range(1, len(norms)):
        before, after = norms[i - 1], norms[i]
        if before is None or after is None:
            out.append(None)
        else:
            out.append(math.inf if after <= eps else before / after)
    return out


def ref_log_gains(norms: Sequence[Optional[float]], eps: float = 1e-30) -> list[Optional[float]]:
    out: list[Optional[float]] = []
    for gain in ref_gains(norms, eps):
        if gain is None:
            out.append(None)
        elif gain == 0:
            out.append(-math.inf)
        else:
            out.append(math.log(gain))
    return out


def ref_category(gain: Optional[float], low: float = 0.5, high: float = 2.0) -> str:
    if gain is None:
        return "missing"
    if math.isinf(gain):
        return "vanishing"
    if gain > high:
        return "amplifying"
    if gain < low:
        return "damping"
    return "healthy"


def ref_summary(
    norms: Sequence[Optional[float]], eps: float = 1e-30, low: float = 0.5, high: float = 2.0
) -> dict[str, float]:
    """The gain summary (means/min/max over finite gains) plus ``end_to_end_gain``."""
    gains = ref_gains(norms, eps)
    finite = [g for g in gains if g is not None and math.isfinite(g)]
    logs = [math.log(g) for g in finite if g > 0]
    categories = [ref_category(g, low, high) for g in gains]
    first, last = norms[0], norms[-1]
    if first is None or last is None:
        end_to_end = math.nan
    else:
        end_to_end = math.inf if last <= eps else first / last
    return {
        "mean_gain": sum(finite) / len(finite) if finite else math.nan,
        "min_gain": min(finite) if finite else math.nan,
        "max_gain": max(finite) if finite else math.nan,
        "mean_log_gain": sum(logs) / len(logs) if logs else math.nan,
        "num_amplifying": categories.count("amplifying"),
        "num_damping": categories.count("damping"),
        "num_healthy": categories.count("healthy"),
        "num_vanishing": categories.count("vanishing"),
        "num_missing": categories.count("missing"),
        "end_to_end_gain": end_to_end,
    }


def ref_grad_stats(grads: Sequence[Tensor], large_threshold: float = 1.0) -> dict[str, float]:
    flat = torch.cat([g.detach().reshape(-1).double() for g in grads])
    return {
        "mean": flat.mean().item(),
        "std": flat.std().item(),  # unbiased, like torch.std
        "min": flat.min().item(),
        "max": flat.max().item(),
        "zero_fraction": (flat == 0).double().mean().item(),
        "large_fraction": (flat.abs() > large_threshold).double().mean().item(),
        "nonfinite_count": float((~torch.isfinite(flat)).sum().item()),
    }


def ref_metrics(
    block_names: Sequence[str],
    block_grads: Sequence[Optional[Tensor]],
    param_grads: Mapping[str, Tensor],
    norm_type: str = "l2",
    *,
    eps: float = 1e-30,
    low: float = 0.5,
    high: float = 2.0,
    large_threshold: float = 1.0,
    param_keys: Sequence[str] = (),
    grad_stats: bool = True,
) -> dict[str, float]:
    """The flat dict the callback should log for one step (keys exactly as in the README table)."""
    norms = [None if g is None else ref_norm(g, norm_type) for g in block_grads]
    metrics: dict[str, float] = {}
    for name, norm in zip(block_names, norms):
        if norm is not None:
            metrics[f"grad_norm/{name}"] = norm
    for name, gain, log_gain in zip(
        block_names[1:], ref_gains(norms, eps), ref_log_gains(norms, eps)
    ):
        if gain is not None:
            metrics[f"grad_gain/{name}"] = gain
            metrics[f"grad_log_gain/{name}"] = log_gain  # type: ignore[assignment]
    metrics["grad_norm_total"] = ref_norm(list(param_grads.values()), norm_type)
    for name in param_keys:
        metrics[f"grad_param_norm/{name}"] = ref_norm(param_grads[name], norm_type)
    for key, value in ref_summary(norms, eps, low, high).items():
        metrics[f"grad_flow/{key}"] = float(value)
    if grad_stats:
        for key, value in ref_grad_stats(list(param_grads.values()), large_threshold).items():
            metrics[f"grad_stats/{key}"] = value
    return metrics


#: Relative tolerance of a figure the package accumulates in float32 (a norm, a sum of squares)
#: against the float64 reference of the same gradients. A sum of ``n`` non-negative float32 terms is
#: within ``n * 2**-24`` of the exact sum in any order, and within about ``log2(n) * 2**-24`` (~1e-6
#: for the models here) with torch's cascade sums, whose order changes with the CPU's vector width
#: and the thread count: 1e-5 leaves a factor of ten. (``rel=1e-6`` is not: a different order on
#: another machine gets there.)
FLOAT32_SUM_REL = 1e-5
#: Keys whose value is a log of a ratio of two compared norms: its error is *absolute*, the sum of
#: the two norms' relative errors (``log(a (1 + e_a)) - log(b (1 + e_b)) = log(a / b) + e_a - e_b``
#: to first order), however close to 0 the value itself is.
LOG_KEYS = ("grad_log_gain/", "grad_flow/mean_log_gain")
#: Keys whose value is a ratio of two compared norms (or a mean/min/max of such): its relative error
#: is at most the sum of the two norms' relative errors.
RATIO_KEYS = (
    "grad_gain/",
    "grad_flow/mean_gain",
    "grad_flow/min_gain",
    "grad_flow/max_gain",
    "grad_flow/end_to_end_gain",
)


def close_to(expected: float, key: str = "", rel: float = FLOAT32_SUM_REL) -> Any:
    """``pytest.approx`` of ``expected`` for a figure whose inputs (the norms) are each within
    ``rel`` of their reference: absolute ``2 * rel`` for a log-gain, relative ``2 * rel`` for a
    gain, relative ``rel`` otherwise (``abs=1e-12``: exact zeros; NaN equals NaN)."""
    if key.startswith(LOG_KEYS):
        return pytest.approx(expected, rel=0.0, abs=2 * rel, nan_ok=True)
    if key.startswith(RATIO_KEYS):
        return pytest.approx(expected, rel=2 * rel, abs=1e-12, nan_ok=True)
    return pytest.approx(expected, rel=rel, abs=1e-12, nan_ok=True)


def approx_stats(expected: Mapping[str, float], rel: float = FLOAT32_SUM_REL) -> dict[str, Any]:
    """``{key: pytest.approx}`` for a ``grad_stats`` dict (keys without the prefix) whose sums are
    within ``rel``: ``mean`` is a signed sum that cancels to near zero, so its error is relative to
    the spread of the summed elements (``std + |mean|``), not to itself; the rest relative."""
    out = {key: close_to(value, key, rel) for key, value in expected.items()}
    spread = abs(expected.get("std", math.nan)) + abs(expected.get("mean", math.nan))
    if math.isfinite(spread):  # NaN/Inf elements: a NaN mean is compared as NaN
        out["mean"] = pytest.approx(expected["mean"], rel=0.0, abs=rel * spread)
    return out


def assert_floats_equal(
    actual: Sequence[Optional[float]],
    expected: Sequence[Optional[float]],
    rel: float = FLOAT32_SUM_REL,
    *,
    key: str = "",
) -> None:
    """Element-wise equality up to ``rel`` (per :func:`close_to` with ``key``, e.g.
    ``"grad_log_gain/"`` for log-gains): ``None`` only matches ``None``, NaN matches NaN."""
    assert len(actual) == len(expected)
    for index, (value, want) in enumerate(zip(actual, expected)):
        if want is None:
            assert value is None, index
        else:
            assert value == close_to(want, key, rel), index


def assert_metrics_equal(
    actual: Mapping[str, float], expected: Mapping[str, float], rel: float = FLOAT32_SUM_REL
) -> None:
    """Same keys, and every value equal up to ``rel`` as :func:`close_to` derives it from the key;
    ``grad_stats/`` figures as :func:`approx_stats` compares them (the mean against the spread)."""
    extra, missing = sorted(set(actual) - set(expected)), sorted(set(expected) - set(actual))
    assert not extra and not missing, f"unexpected keys {extra}, missing keys {missing}"
    prefix = "grad_stats/"
    stats = approx_stats(
        {k[len(prefix) :]: v for k, v in expected.items() if k.startswith(prefix)}, rel
    )
    for key, value in expected.items():
        want = stats[key[len(prefix) :]] if key.startswith(prefix) else close_to(value, key, rel)
        assert actual[key] == want, (key, actual[key], value)


class RefNet(BlockNet):
    """``BlockNet`` that records, at every optimizer step, the independent reference gradients.

    ``forward`` calls ``retain_grad`` on each block's output tensor; the LightningModule's own
    ``on_before_optimizer_step`` (which Lightning calls *after* the callbacks') stores deep copies of
    those gradients and of every parameter gradient in ``refs[global_step]``.

    ``skip`` lists block indices left out of the forward (they get no gradient); ``dead_param`` adds
    a parameter whose gradient is all zeros (so ``zero_fraction`` is not trivially 0).
    """

    def __init__(
        self, *args: Any, skip: Sequence[int] = (), dead_param: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.skip = set(skip)
        self.dead = nn.Parameter(torch.ones(5)) if dead_param else None
        self.refs: dict[int, dict[str, Any]] = {}
        self._outputs: list[Optional[Tensor]] = []
        #: per training forward: how many tensor hooks sit on each block's output tensor.
        self.tensor_hooks: list[list[int]] = []

    def forward(self, x: Tensor) -> Tensor:
        h: Any = self.stem(x)
        self._outputs = []
        for index, block in enumerate(self.blocks):
            if index in self.skip:
                self._outputs.append(None)
                continue
            h = block(h)
            tensor = unwrap(h)
            if tensor.requires_grad:  # a frozen prefix gives outputs without gradients
                tensor.retain_grad()
            self._outputs.append(tensor)
        if self.training and self._trainer is not None:
            self.tensor_hooks.append(
                [len(t._backward_hooks or {}) if t is not None else 0 for t in self._outputs]
            )
        out = self.head(unwrap(h))
        if self.dead is not None:
            out = out + 0.0 * self.dead.sum()
        return out

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.refs[self.trainer.global_step] = {
            "blocks": [None if t is None else copy.deepcopy(t.grad) for t in self._outputs],
            "params": {
                name: copy.deepcopy(p.grad)
                for name, p in self.named_parameters()
                if p.grad is not None
            },
        }

    def block_names(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.blocks))]

    def expected(self, step: int, norm_type: str = "l2", **kwargs: Any) -> dict[str, float]:
        ref = self.refs[step]
        return ref_metrics(self.block_names(), ref["blocks"], ref["params"], norm_type, **kwargs)


def trainer(tmp_path: Any, callbacks: Sequence[pl.Callback], **kwargs: Any) -> pl.Trainer:
    """A small CPU Trainer writing under ``tmp_path`` (CSVLogger unless ``logger`` is given)."""
    from lightning.pytorch.loggers import CSVLogger

    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 2,
        "log_every_n_steps": 1,  # the models log nothing themselves; keeps Lightning quiet
        "logger": CSVLogger(tmp_path, name="csv"),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), default_root_dir=tmp_path, **options)


def hooks_of(module: nn.Module) -> int:
    """Forward (pre-)hooks and backward hooks registered on ``module`` or any submodule."""
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in module.modules()
    )


def csv_metrics(log_dir: str) -> dict[int, dict[str, float]]:
    """``metrics.csv`` of a CSVLogger as ``{step: {key: value}}`` (empty cells left out); ``log_dir``
    may be an fsspec URL (``memory://...``), read through its filesystem as Lightning writes it."""
    import csv
    import io

    from lightning.fabric.utilities.cloud_io import get_filesystem

    fs = get_filesystem(log_dir)
    with fs.open(f"{log_dir.rstrip('/')}/metrics.csv", "r", newline="") as handle:
        text = handle.read()
    rows: dict[int, dict[str, float]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        step = int(row.pop("step"))
        values = {key: float(value) for key, value in row.items() if value != ""}
        rows.setdefault(step, {}).update(values)
    return rows


def tensorboard_events(log_dir: str, **size_guidance: int) -> EventAccumulator:
    """The event files of a TensorBoardLogger's ``log_dir``, loaded (every scalar kept)."""
    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0, **size_guidance})
    accumulator.Reload()
    return accumulator


def tensorboard_scalars(accumulator: EventAccumulator) -> dict[int, dict[str, float]]:
    """Every scalar of ``accumulator`` as ``{step: {tag: value}}`` (TensorBoard stores float32)."""
    steps: dict[int, dict[str, float]] = {}
    for tag in accumulator.Tags()["scalars"]:
        for event in accumulator.Scalars(tag):
            steps.setdefault(event.step, {})[tag] = event.value
    return steps


def lightning_cli(*args: Any, **kwargs: Any) -> LightningCLI:
    """``LightningCLI(*args, **kwargs)`` with pytest's own command line out of ``sys.argv``: given
    both ``args=`` and command-line arguments, LightningCLI warns that it got both."""
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        return LightningCLI(*args, **kwargs)


def callback_from_cli_config(tmp_path: Any, config: dict[str, Any]) -> Any:
    """The ``GradientFlowCallback`` that ``LightningCLI`` builds from ``config`` (a YAML dict with
    a ``trainer.callbacks`` entry), written to ``tmp_path/config.yaml``; raises what the CLI raises."""
    path = Path(tmp_path) / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = lightning_cli(BlockNet, args=["--config", str(path)], run=False)
    [callback] = [c for c in cli.trainer.callbacks if type(c).__name__ == "GradientFlowCallback"]
    return callback


def logger_trainer(
    logger: TensorBoardLogger, callback: GradientFlowCallback, max_steps: int
) -> pl.Trainer:
    """:func:`trainer` with ``callback`` and ``logger`` as its only logger, under its root dir."""
    return trainer(logger.root_dir, [callback], max_steps=max_steps, logger=[logger])
