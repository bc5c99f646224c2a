"""The memory check: many measured steps on a small model under tracemalloc."""

from __future__ import annotations

import gc
import math
import os
import tracemalloc
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from gradwatch_bench.harness import drain_tensorboard, trainer_for
from gradwatch_bench.models import mlp
from lightning_gradwatch import GradientFlowCallback


class MemoryProbe(Callback):
    """Samples the Python memory allocated by this package and still held, and the process RSS."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.samples: dict[str, dict[str, float]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step not in (self.first, self.last):
            return
        drain_tensorboard(trainer)  # what attaching wrote (the callback's custom-scalars layout)
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, "*lightning_gradwatch*")]
        )
        self.samples["first" if step == self.first else "last"] = {
            "step": step,
            "gradwatch_traced_bytes": sum(stat.size for stat in snapshot.statistics("filename")),
            "rss_bytes": _rss_bytes(),
        }


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return float(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        return math.nan


def run_memory(steps: int, root: str) -> dict[str, Any]:
    """``steps`` measured steps (every figure, every step) on a small model under tracemalloc.

    Sampled right after CSV-logger flushes (it holds the logged dicts until it writes them)."""
    torch.manual_seed(0)
    module = mlp(64, 8, 32)
    callback = GradientFlowCallback(blocks="net.blocks", log_every_n_steps=1, log_param_norms=True)
    flush = max(1, steps // 20)
    probe = MemoryProbe(2 * flush, steps - steps % flush)
    tracemalloc.start()
    try:
        trainer_for(os.path.join(root, "memory"), steps, [callback, probe], flush).fit(module)
    finally:
        tracemalloc.stop()
    first, last = probe.samples.get("first", {}), probe.samples.get("last", {})
    return {
        "steps": steps,
        "first": first,
        "last": last,
        "gradwatch_traced_growth_bytes": last.get("gradwatch_traced_bytes", math.nan)
        - first.get("gradwatch_traced_bytes", math.nan),
        "rss_growth_bytes": last.get("rss_bytes", math.nan) - first.get("rss_bytes", math.nan),
    }
