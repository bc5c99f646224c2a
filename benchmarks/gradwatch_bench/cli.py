"""Command line: which models, how many rounds, where to write; runs them and writes the results."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import torch

import gradwatch_bench
from gradwatch_bench.goals import goals
from gradwatch_bench.harness import run_model
from gradwatch_bench.memory import run_memory
from gradwatch_bench.models import model_specs
from gradwatch_bench.stats import StepRecord, summarize
from gradwatch_bench.writer import loadavg, machine_info, write_results

#: Where a full run writes by default (committed; the README cites it) and where a quick one does
#: (scratch, ignored by git), so that a smoke run never overwrites the committed results.
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")
QUICK_RESULTS = os.path.join(RESULTS, "quick")


def add_out_argument(parser: argparse.ArgumentParser, stem: str) -> None:
    """``--out``: where a run writes ``<stem>.md`` / ``<stem>.json`` (default: the committed
    results; with ``--quick``: the scratch folder)."""
    parser.add_argument(
        "--out",
        default=None,
        help=f"folder for {stem}.md / {stem}.json (default {RESULTS}, the committed results; "
        f"--quick: {QUICK_RESULTS}, scratch)",
    )


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.ERROR)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    doc = gradwatch_bench.__doc__ or ""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per model (override)")
    parser.add_argument(
        "--models", nargs="+", default=None, help="subset of: mlp gpt stress params"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed baseline steps first")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared machine, threads that other processes "
        "preempt make every parallel op erratic; 0 keeps torch's default)",
    )
    parser.add_argument(
        "--memory-steps", type=int, default=None, help="steps of the memory check (0: skip)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--render",
        default=None,
        help="only recompute the statistics, goals and table from this overhead.json's recorded "
        "steps (no training); writes next to it unless --out is given",
    )
    add_out_argument(parser, "overhead")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.render:
        return render(args.render, args.out or os.path.dirname(os.path.abspath(args.render)))
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    memory_steps = (
        args.memory_steps if args.memory_steps is not None else (30 if args.quick else 2000)
    )
    specs = model_specs(args.quick, args.rounds)
    if args.models:
        specs = [s for s in specs if s.name in args.models]
    result: dict[str, Any] = {
        "command": " ".join(["python benchmarks/overhead.py", *argv]),
        "machine": machine_info(torch.get_num_threads()),
        "quick": args.quick,
        "seed": args.seed,
        "warmup": warmup,
        "models": [],
        "goals": [],
    }
    with tempfile.TemporaryDirectory() as root:
        for spec in specs:
            print(
                f"[{spec.name}] {spec.label}: {spec.rounds} rounds ...", file=sys.stderr, flush=True
            )
            model = run_model(spec, warmup, args.seed, root)
            result["models"].append(model)
            result["goals"] += goals(model)
            print(f"[{spec.name}] done in {model['seconds']:.0f} s", file=sys.stderr, flush=True)
        if memory_steps > 0:
            print(f"[memory] {memory_steps} steps ...", file=sys.stderr, flush=True)
            result["memory"] = run_memory(memory_steps, root)
    result["machine"]["loadavg_end"] = loadavg()
    out = args.out or (QUICK_RESULTS if args.quick else RESULTS)
    print(write_results(result, out))
    return result


def render(path: str, out: str) -> dict[str, Any]:
    """Recompute a finished run's statistics and goals from its recorded steps (the same bootstrap
    seed gives the same CIs) and rewrite its Markdown and JSON: a change to the statistics or the
    verdicts reaches committed results without timing anything again."""
    with open(path, encoding="utf-8") as handle:
        result: dict[str, Any] = json.load(handle)
    seed = result.get("seed", 0)  # runs written before the seed was recorded used the default
    result["goals"] = []
    for model in result["models"]:
        records = [StepRecord(**record) for record in model["records"]]
        model["stats"] = {name: vars(s) for name, s in summarize(records, seed).items()}
        result["goals"] += goals(model)
    shown = os.path.relpath(os.path.abspath(path))
    result["rendered"] = {
        "command": f"python benchmarks/overhead.py --render {shown}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print(write_results(result, out))
    return result
