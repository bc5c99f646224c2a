"""The cost of curvature (``log_curvature=True``) on the benchmark's MLP and GPT.

For each model, one fit with curvature every ``EVERY`` steps and nothing else of the callback's
(``rules=[]``, block measurements never due, no logger): the wall time of each step (from one
``on_train_batch_start`` to the next) is recorded, and a curvature step is compared with the plain
steps between them. The first curvature step starts power iteration cold (a random vector), later
ones warm (the previous eigenvector); at the defaults (every 500 steps) the top eigenvector has moved
more than over ``EVERY`` steps, so the cold figure is the safe one for the share of a run:
``(multiple - 1) / 500``.

Run: ``python benchmarks/curvature.py [--quick] [--out benchmarks/results/curvature.md]``
(``--quick``: small models, under a minute).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning.pytorch as pl
import torch
from gradwatch_bench.cli import quiet
from gradwatch_bench.models import gpt, mlp

from lightning_gradwatch import GradientFlowCallback

EVERY = 4
DEFAULT_EVERY = 500


class StepClock(pl.Callback):
    """Wall time from one ``on_train_batch_start`` to the next, by step."""

    def __init__(self, watch: GradientFlowCallback) -> None:
        self.starts: list[float] = []
        self.watch = watch
        self.iterations: list[dict[str, int]] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())
        # power iterations of the previous step's curvature, if it had one
        self.iterations.append(dict(self.watch._extras.curvature.last_iterations))
        self.watch._extras.curvature.last_iterations.clear()

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def measure(build: Any, steps: int, probes: int) -> dict[str, Any]:
    module = build()
    watch = GradientFlowCallback(
        rules=[],
        log_every_n_steps=10**9,
        require_logger=False,
        log_grad_stats=False,
        log_curvature=True,
        curvature_every_n_steps=EVERY,
        curvature_probes=probes,
    )
    clock = StepClock(watch)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        callbacks=[clock, watch],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module)
    times = clock.durations()
    curvature = [t for s, t in enumerate(times) if s % EVERY == 0]
    # Plain steps: not the first ones (warm-up) nor curvature steps.
    plain = [t for s, t in enumerate(times) if s % EVERY and s > EVERY]
    base = statistics.median(plain)
    cold, warm = curvature[0] / base, statistics.median(curvature[1:]) / base
    return {
        "params": sum(p.numel() for p in module.parameters()),
        "step_ms": 1000 * base,
        "cold": cold,
        "warm": warm,
        "share": (cold - 1) / DEFAULT_EVERY,
        "iterations": [sum(it.values()) for it in clock.iterations[1:] if it],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models, under a minute")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    parser.add_argument("--probes", type=int, default=2, help="curvature_probes (default 2)")
    parser.add_argument("--models", nargs="+", default=["mlp", "gpt"], choices=["mlp", "gpt"])
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.quick:
        models = [
            ("MLP 4 x Linear(32)+ReLU, batch 8", lambda: mlp(32, 4, 8), 4 * EVERY + 1),
            ("GPT 2 blocks d 32 seq 8 batch 2", lambda: gpt(32, 2, 8, 2, 64), 4 * EVERY + 1),
        ]
    else:
        models = [
            ("24 x Linear(512)+ReLU MLP, batch 256", lambda: mlp(512, 24, 256), 3 * EVERY + 1),
            (
                "12-block pre-LN GPT, d 256, seq 128, batch 8",
                lambda: gpt(256, 12, 128, 8),
                2 * EVERY + 1,
            ),
        ]
    models = [m for m, key in zip(models, ("mlp", "gpt")) if key in args.models]
    command = " ".join(["python benchmarks/curvature.py", *sys.argv[1:]])
    lines = [
        "# The cost of curvature",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {platform.processor() or platform.machine()}"
        f" · torch {torch.__version__} · 1 thread · `{command}`",
        "",
        "Multiple = a curvature step's wall time over the median plain step (forward, backward, "
        "SGD step). Cold: power iteration from a random vector (the first curvature step); warm: "
        f"from the previous eigenvector ({EVERY} steps earlier). Share of a run at the defaults "
        f"(every {DEFAULT_EVERY} steps, cold) = (cold - 1) / {DEFAULT_EVERY}. Settings: "
        f"`curvature_iterations=30`, `curvature_probes={args.probes}` (Hessian-vector products per step = "
        "power iterations + probes).",
        "",
        "| model | parameters | plain step ms | curvature step, cold | warm | share at defaults "
        "| power iterations per curvature step |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, build, steps in models:
        r = measure(build, steps, args.probes)
        lines.append(
            f"| {label} | {r['params']:,} | {r['step_ms']:.1f} | x{r['cold']:.1f} | "
            f"x{r['warm']:.1f} | {100 * r['share']:.2f} % | {r['iterations']} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out is not None:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
