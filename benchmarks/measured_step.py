"""The measured step's own work, alone: :func:`lightning_gradwatch.measure.record.measure` (pack,
reduce, one host copy, build the measurement), what the callback's ``on_before_optimizer_step``
calls on a measured step, on a fixed model whose gradients and probe buffer are filled once.

Prints the best and median CPU time (this thread) per call over several repeats: other processes
on a shared machine lengthen the wall clock, much less the thread's own CPU time. Run it on two
checkouts to compare a change (``PYTHONPATH=<checkout> python benchmarks/measured_step.py``): the
best of many repeats is the figure least disturbed by other processes on a shared machine.
``--quick`` (a small model, few calls) is the smoke run ``tests/test_benchmark_smoke.py`` makes, so
a refactor that moves the internals driven here fails the suite instead of this script.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from lightning_gradwatch.measure.probe import GradientProbe
from lightning_gradwatch.measure.record import GradientMeasurement, MeasurementSpec, measure
from lightning_gradwatch.measure.reduction import ReductionPlan


@dataclass
class Setup:
    """A probe whose buffer holds one backward's block rows, and the parameters' gradients."""

    probe: GradientProbe
    named_grads: list[tuple[str, Tensor]]


@dataclass
class Timing:
    """CPU milliseconds per call of each repeat, and the last call's measurement."""

    times_ms: list[float]
    measurement: GradientMeasurement

    @property
    def best_ms(self) -> float:
        return min(self.times_ms)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)


def build(depth: int, width: int) -> Setup:
    """``depth`` Linear+ReLU blocks of ``width``, one forward and backward with the probe armed."""
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth))
    probe = GradientProbe([(f"blocks.{i}", b) for i, b in enumerate(blocks)], "l2")
    probe.arm()
    x = torch.randn(64, width)
    for block in blocks:
        x = block(x)
    x.square().mean().backward()
    probe.disarm()
    grads = [(n, p.grad) for n, p in blocks.named_parameters() if p.grad is not None]
    return Setup(probe, grads)


def measure_once(setup: Setup, spec: MeasurementSpec) -> GradientMeasurement:
    """One measured step's work, as the callback does it in one process (nothing to reduce)."""
    return measure(
        setup.probe.buffer,
        setup.named_grads,
        spec,
        ReductionPlan(),
        step=0,
        block_names=setup.probe.names,
    )


def run(depth: int, width: int, calls: int, repeats: int) -> Timing:
    setup = build(depth, width)
    spec = MeasurementSpec()  # the callback's defaults: every figure, grad stats included
    times: list[float] = []
    measurement: Optional[GradientMeasurement] = None
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            measurement = measure_once(setup, spec)
        times.append((time.thread_time() - start) / calls * 1e3)
    assert measurement is not None
    return Timing(times, measurement)


def main(argv: Optional[Sequence[str]] = None) -> Timing:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--quick", action="store_true", help="4 blocks of width 64, 5 calls, 3 repeats (smoke run)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.depth, args.width, args.calls, args.repeats = 4, 64, 5, 3
    torch.set_num_threads(1)
    timing = run(args.depth, args.width, args.calls, args.repeats)
    print(f"measured step own time: best {timing.best_ms:.2f} ms, median {timing.median_ms:.2f} ms")
    return timing


if __name__ == "__main__":
    main()
