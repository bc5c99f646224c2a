"""What the update figures cost (``log_updates=True``): a measured step with them against the same
measured step without them, on the benchmark's MLP and GPT trained with AdamW (so Adam's state is
read too), in the interleaved harness of :mod:`~gradwatch_bench.harness` (one fit per model, one
step per variant per shuffled round, each paired with the other variants of its round).

Variants: ``baseline``; ``measured`` / ``measured_updates`` (every step measured, ``rules=[]``,
without / with ``log_updates=True``); ``unmeasured`` / ``unmeasured_updates`` (a step that is not
measured: with ``log_updates=True`` the optimizer's post-hook returns at once, no copy).

Headline per model: the paired ratio ``measured_updates / measured`` of the whole step's wall time
(median over rounds, bootstrap 95 % CI; target <= 1.2x: met when the CI's upper end is at most 1.2,
not met when its lower end is above, else undecided), and the own-time difference (time inside the
callback's hooks, the optimizer post-hook included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Sequence
from typing import Any, Optional

import torch

from gradwatch_bench.cli import QUICK_RESULTS, RESULTS, add_out_argument, quiet
from gradwatch_bench.harness import run_model
from gradwatch_bench.models import model_specs
from gradwatch_bench.stats import bootstrap_ci
from gradwatch_bench.variants import GradwatchVariant, Variant
from gradwatch_bench.writer import loadavg, machine_info

TARGET = 1.2
NEVER = 10**9


def update_variants() -> list[Variant]:
    return [
        Variant(),
        GradwatchVariant("measured", log_every_n_steps=1, rules=[]),
        GradwatchVariant("measured_updates", log_every_n_steps=1, rules=[], log_updates=True),
        GradwatchVariant("unmeasured", log_every_n_steps=NEVER, rules=[]),
        GradwatchVariant("unmeasured_updates", log_every_n_steps=NEVER, rules=[], log_updates=True),
    ]


def paired(records: Sequence[dict[str, Any]], top: str, bottom: str, field: str) -> list[float]:
    """Per round, ``top``'s ``field`` over ``bottom``'s (rounds holding both)."""
    by = {(r["variant"], r["round"]): r[field] for r in records}
    rounds = sorted({r["round"] for r in records})
    return [by[top, k] / by[bottom, k] for k in rounds if (top, k) in by and (bottom, k) in by]


def headline(model: dict[str, Any], seed: int) -> dict[str, Any]:
    """The ratio with its CI and verdict, and the own-time difference."""
    ratios = paired(model["records"], "measured_updates", "measured", "wall_ms")
    low, high = bootstrap_ci(ratios, seed)
    verdict = "met" if high <= TARGET else "not met" if low > TARGET else "undecided (noise)"
    stats = model["stats"]
    own = stats["measured_updates"]["own_median_ms"] - stats["measured"]["own_median_ms"]
    idle = stats["unmeasured_updates"]["own_median_ms"] - stats["unmeasured"]["own_median_ms"]
    return {
        "ratio": statistics.median(ratios),
        "ratio_ci": [low, high],
        "verdict": verdict,
        "own_extra_ms": own,
        "own_ratio": stats["measured_updates"]["own_median_ms"]
        / stats["measured"]["own_median_ms"],
        "unmeasured_own_extra_ms": idle,
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# What `log_updates=True` costs",
        "",
        f"{m['date']} · {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads) · "
        f"torch {m['torch']} · lightning {m['lightning']}"
        + (" · **quick mode (tiny models, not a measurement)**" if result["quick"] else ""),
        f"Load average at start: {m['loadavg_start']}; at end: {m['loadavg_end']}.",
        "",
        f"Produced by `{result['command']}`. AdamW; every variant interleaved in one fit per model.",
        "Ratio = median over rounds of (measured step with update figures / the same round's "
        "measured step without), bootstrap 95 % CI; own = time inside the callback's hooks.",
        "",
        "| model | step ratio [95 % CI] | target ≤ 1.2x | own ms without | own ms with | "
        "extra own ms, unmeasured step |",
        "|---|---|---|---|---|---|",
    ]
    for model in result["models"]:
        h, stats = model["headline"], model["stats"]
        lines.append(
            f"| {model['label']} | {h['ratio']:.3f} [{h['ratio_ci'][0]:.3f}, "
            f"{h['ratio_ci'][1]:.3f}] | {h['verdict']} | "
            f"{stats['measured']['own_median_ms']:.2f} | "
            f"{stats['measured_updates']['own_median_ms']:.2f} | "
            f"{h['unmeasured_own_extra_ms']:.3f} |"
        )
    lines += ["", "Median step (ms) per variant:", "", "| variant | " + " | ".join(
        m["name"] for m in result["models"]) + " |", "|---|" + "---|" * len(result["models"])]  # fmt: skip
    for name in ("baseline", "measured", "measured_updates", "unmeasured", "unmeasured_updates"):
        cells = [f"{m['stats'][name]['median_ms']:.1f}" for m in result["models"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 3 rounds (< 1 min)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per model (override)")
    parser.add_argument("--seed", type=int, default=0)
    add_out_argument(parser, "updates")
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(1)
    rounds = args.rounds if args.rounds is not None else (3 if args.quick else 10)
    specs = [s for s in model_specs(args.quick, rounds) if s.name in ("mlp", "gpt")]
    result: dict[str, Any] = {
        "command": " ".join(["python benchmarks/updates.py", *argv]),
        "machine": machine_info(torch.get_num_threads()),
        "quick": args.quick,
        "seed": args.seed,
        "models": [],
    }
    with tempfile.TemporaryDirectory() as root:
        for spec in specs:
            print(f"[{spec.name}] {spec.label}: {spec.rounds} rounds ...", file=sys.stderr)
            warmup = 2 if args.quick else 5
            model = run_model(spec, warmup, args.seed, root, update_variants(), optimizer="adamw")
            model["headline"] = headline(model, args.seed)
            result["models"].append(model)
    result["machine"]["loadavg_end"] = loadavg()
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "updates.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
    text = markdown(result)
    with open(os.path.join(out, "updates.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    print(text)
    return result
