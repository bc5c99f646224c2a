"""The measured step's own work, alone: ``GradientFlowCallback._measure`` (pack, reduce, one host
copy, build the measurement) on a fixed model whose gradients and probe buffer are filled once.

Prints the best and median CPU time (this thread) per call over several repeats: other processes
on a shared machine lengthen the wall clock, much less the thread's own CPU time. Run it on two checkouts to compare a
change (``PYTHONPATH=<checkout> python benchmarks/measured_step.py``): the best of many repeats is
the figure least disturbed by other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace

import torch
from torch import nn

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch.measure.probe import GradientProbe


def build(depth: int, width: int) -> tuple[GradientFlowCallback, GradientProbe]:
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth))
    probe = GradientProbe([(f"blocks.{i}", b) for i, b in enumerate(blocks)], "l2")
    probe.arm()
    x = torch.randn(64, width)
    for block in blocks:
        x = block(x)
    x.square().mean().backward()
    probe.disarm()
    callback = GradientFlowCallback()
    callback._params = [(n, p) for n, p in blocks.named_parameters()]
    return callback, probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    callback, probe = build(args.depth, args.width)
    trainer = SimpleNamespace(precision_plugin=None, global_step=0, world_size=1)  # one process
    times = []
    for _ in range(args.repeats):
        start = time.thread_time()
        for _ in range(args.calls):
            callback._measure(trainer, probe, 0)  # type: ignore[arg-type]
        times.append((time.thread_time() - start) / args.calls * 1e3)
    print(
        f"measured step own time: best {min(times):.2f} ms, median {statistics.median(times):.2f} ms"
    )


if __name__ == "__main__":
    main()
