"""Cost structure of ``GradientFlowCallback``, asserted by counting rather than timing: exactly one
device-to-host copy per measured step and none on an unmeasured one (plus one at fit start), no tensor hook on an unmeasured
step, and no Python memory that grows with the number of steps.

Host copies are counted by wrapping the ``torch.Tensor`` methods that copy a value to the host
(``item``, ``tolist``, ``cpu``, ``numpy``, ``__float__``, ...) for the whole fit and keeping the calls
made from code in the ``lightning_gradwatch`` package (any frame of the call stack in it): Lightning's
own calls (none here: no progress bar, nothing logged by the model) are not the callback's.
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from typing import Any, Callable

import lightning.pytorch as pl
import pytest
import torch
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import BlockNet
from reference import trainer
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch_features import needs_flat_traced_memory

import lightning_gradwatch
from lightning_gradwatch import GradientFlowCallback, Rule

pytestmark = [RULE_TRIPS, WIRING_REPORT]

PACKAGE_DIR = os.path.dirname(os.path.abspath(lightning_gradwatch.__file__)) + os.sep
#: Tensor methods that copy data to the host (a device sync on an accelerator).
HOST_COPIES = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__float__",
    "__int__",
    "__bool__",
    "__index__",
    "__array__",
)


def _from_package() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(PACKAGE_DIR):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False


class StepClock(Callback):
    """Knows the optimizer step in progress; records the forward hooks sitting on the blocks."""

    def __init__(self) -> None:
        self.step = -1
        self.forward_hooks: list[int] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.step = trainer.global_step
        self.forward_hooks.append(sum(len(b._forward_hooks) for b in pl_module.blocks))


@pytest.fixture
def package_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[StepClock], Counter]]:
    """Wraps the host-copy methods and ``Tensor.register_hook``; yields a function that starts
    counting the calls made from the package, per (step, method)."""
    counts: Counter = Counter()
    clocks: list[StepClock] = []

    def wrap(name: str) -> None:
        original = getattr(torch.Tensor, name)

        def counted(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            if clocks and _from_package():
                counts[(clocks[0].step, name)] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    for name in (*HOST_COPIES, "register_hook"):
        wrap(name)

    def start(clock: StepClock) -> Counter:
        clocks.append(clock)
        return counts

    yield start


def _per_step(counts: Counter, names: tuple[str, ...]) -> dict[int, int]:
    out: Counter = Counter()
    for (step, name), n in counts.items():
        if name in names:
            out[step] += n
    return dict(out)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_host_copy_per_measured_step_none_otherwise(
    accumulate: int, package_calls: Callable[[StepClock], Counter], tmp_path: Any
) -> None:
    clock = StepClock()
    counts = package_calls(clock)
    callback = GradientFlowCallback(log_every_n_steps=3, log_param_norms=True, rules=[])
    steps = 8
    fit = trainer(
        tmp_path,
        [clock, callback],
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        logger=[TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")],
    )
    fit.fit(BlockNet(depth=4, n_samples=16 * steps * accumulate))
    assert clock.step == steps - 1
    measured = [s for s in range(steps) if s % 3 == 0]
    # (step -1: fit start, where the model facts' init scales come in one batched copy)
    assert _per_step(counts, HOST_COPIES) == {-1: 1, **dict.fromkeys(measured, 1)}
    assert {name for _, name in counts if name in HOST_COPIES} == {"tolist"}
    # ... and that one copy held every figure of the step.
    assert callback.last is not None and callback.last.step == measured[-1]
    assert callback.last.grads_measured == len(list(fit.lightning_module.parameters()))
    assert len(callback.last.param_norms) == callback.last.grads_measured  # log_param_norms=True


ADAPTIVE_RULES = [
    Rule("grad_norm_total", zscore=0.1, ema=0.9, warmup=2, action="clip"),  # clips most steps
    Rule("loss", zscore=6.0, window=8, warmup=2, action="skip"),
    Rule("nonfinite", action="halt"),
]


@pytest.mark.parametrize("rules", [None, ADAPTIVE_RULES], ids=["default", "adaptive-and-loss"])
def test_every_step_governance_is_one_host_copy_on_every_step(
    rules: Any, package_calls: Callable[[StepClock], Counter], tmp_path: Any
) -> None:
    # Rules checked every step (the default non-finite -> halt; an adaptive clip and a loss rule)
    # cost one copy on each step: the loss rides in the same copy as the norms, the clip uses the
    # total already on the host, and a measured step reuses its measurement.
    clock = StepClock()
    counts = package_calls(clock)
    callback = GradientFlowCallback(log_every_n_steps=3, rules=rules)
    assert callback.rules  # rules are on
    steps = 7
    trainer(tmp_path, [clock, callback], max_steps=steps).fit(BlockNet(n_samples=16 * steps))
    assert _per_step(counts, HOST_COPIES) == {-1: 1, **dict.fromkeys(range(steps), 1)}
    if rules is not None:
        assert [a.action for a in callback.alerts if a.action == "clip"]  # the clip did act


def test_unmeasured_steps_register_no_tensor_hooks(
    package_calls: Callable[[StepClock], Counter], tmp_path: Any
) -> None:
    clock = StepClock()
    counts = package_calls(clock)
    depth, steps = 5, 7
    callback = GradientFlowCallback(log_every_n_steps=3, rules=[])
    trainer(tmp_path, [clock, callback], max_steps=steps).fit(
        BlockNet(depth=depth, n_samples=16 * steps)
    )
    # One tensor hook per block on a measured step; the forward hooks stay registered on every step
    # (so torch.compile sees them) but return before touching the output on the others. Before the
    # first forward each block also carries the model facts' one-off Post-LN capture hook, which
    # removes itself in that forward.
    measured = [s for s in range(steps) if s % 3 == 0]
    assert _per_step(counts, ("register_hook",)) == dict.fromkeys(measured, depth)
    assert clock.forward_hooks == [2 * depth] + [depth] * (steps - 1)


def _container_items(root: object) -> int:
    """Items in every list/dict/set/tuple/deque reachable from ``root`` through attributes and
    containers (not into tensors, modules or Lightning objects: those are not the callback's)."""
    seen: set[int] = set()
    stack = [root]
    total = 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        if obj is not root and isinstance(obj, (Tensor, nn.Module, pl.Trainer, Callback, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, dict):
            total += len(obj)
            stack.extend(obj.values())
        elif isinstance(obj, (list, set, tuple, frozenset)) or type(obj).__name__ == "deque":
            total += len(obj)  # type: ignore[arg-type]
            stack.extend(obj)  # type: ignore[arg-type]
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("lightning_gradwatch"):
            stack.extend(vars(obj).values())
    return total


class MemorySampler(Callback):
    """Container items of the callback and Python memory allocated by the package, at two steps
    right after the CSV logger flushed (it holds logged dicts until then)."""

    def __init__(self, callback: GradientFlowCallback, at: tuple[int, int]) -> None:
        self.callback, self.at = callback, at
        self.items: dict[int, int] = {}
        self.traced: dict[int, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step in self.at:
            gc.collect()
            snapshot = tracemalloc.take_snapshot().filter_traces(
                [tracemalloc.Filter(True, PACKAGE_DIR + "*")]
            )
            self.traced[step] = sum(s.size for s in snapshot.statistics("filename"))
            self.items[step] = _container_items(self.callback)


@needs_flat_traced_memory
def test_memory_stays_flat_over_many_measured_steps(tmp_path: Any) -> None:
    callback = GradientFlowCallback(log_every_n_steps=1, log_param_norms=True)
    sampler = MemorySampler(callback, at=(40, 120))
    steps = 120
    tracemalloc.start()
    try:
        trainer(
            tmp_path,
            [callback, sampler],
            max_steps=steps,
            logger=[
                TensorBoardLogger(tmp_path, name="tb"),
                CSVLogger(tmp_path, name="csv", flush_logs_every_n_steps=20),
            ],
        ).fit(BlockNet(depth=3, width=4, n_samples=4 * steps, batch_size=4))
    finally:
        tracemalloc.stop()
    assert set(sampler.items) == {40, 120}
    assert sampler.items[40] > 0  # the walk does reach the callback's state
    assert sampler.items[120] == sampler.items[40]
    # 80 measured steps later, what the package allocated and still holds has not grown by even one
    # step's worth of metric dicts (the CSV logger drops its copies at each flush).
    assert sampler.traced[120] - sampler.traced[40] < 2048, sampler.traced


class PackageOps(TorchFunctionMode):
    """Counts torch functions and tensor methods called from the package, per optimizer step."""

    def __init__(self, clock: StepClock) -> None:
        super().__init__()
        self.clock = clock
        self.calls: Counter = Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if _from_package():
            self.calls[self.clock.step] += 1
        return func(*args, **(kwargs or {}))


def test_unmeasured_steps_run_no_tensor_operation(tmp_path: Any) -> None:
    # With no every-step rule, an unmeasured step touches no tensor at all: no norm, no buffer
    # write, not even a look at a gradient.
    clock = StepClock()
    steps = 7
    callback = GradientFlowCallback(log_every_n_steps=4, rules=[])
    fit = trainer(tmp_path, [clock, callback], max_steps=steps)
    with PackageOps(clock) as ops:
        fit.fit(BlockNet(n_samples=16 * steps))
    assert clock.step == steps - 1
    # (step -1: fit start, building the probe's buffer)
    assert {step for step, n in ops.calls.items() if step >= 0 and n > 0} == {0, 4}
