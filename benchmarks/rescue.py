"""Does governance rescue a training run from loss spikes? Faults injected into a real training run.

A small Post-LN character transformer (4 blocks, d 64, 237 k parameters, AdamW, constant lr 5e-3
without warm-up, context 64, batch 16, 500 steps) learns the CPython standard library's own source
(fixed file lists and held-out modules in ``rescue_lib.py``). Left alone this setup shows no loss spike
(largest single-step jump of the train loss about 1.2x), so spikes are caused the way they arise in
practice:

* ``bad_batches``: 4 consecutive out-of-distribution batches at each of 3 steps (random bytes,
  misaligned targets, a zero-filled block): unusual batches, the usual suspect in large-model reports;
* ``lr_jump``: the learning rate x10 for 3 steps mid-run (a misconfigured schedule, a warm restart);
* ``natural``: the run unmodified (and the clean counterfactual of the two others).

Each scenario is trained under every variant of ``rescue_lib.VARIANTS`` (nothing; Lightning's
``gradient_clip_val=1.0``; a static clip rule; an adaptive clip rule; a loss / gradient-norm skip rule)
for several seeds, always with a real ``lightning.Trainer`` and ``GradientFlowCallback(rules=...)``.

Definitions (also printed with the table):

* held-out loss: mean cross-entropy (nats per byte) on 64 fixed windows of the held-out modules,
  evaluated every 10 steps;
* loss jump at a fault: train loss at the fault's first step / train loss at the step before (for a bad
  batch that is the bad batch's own loss); worst loss after: the largest train loss on clean batches
  from the fault's second step to 20 steps after its last, over the same step-before loss;
* recovery: steps from the fault's first step to the first held-out evaluation from which on, up to
  the next fault (or the end), the held-out loss stays within 2 % of the clean run of the same variant
  and seed at the same step; 0 if it never left that band, "n.r." if it is outside at the last
  evaluation before the next fault (or the end).

Usage::

    .venv/bin/python benchmarks/rescue.py            # 3 seeds, 45 runs, 2 at a time
    .venv/bin/python benchmarks/rescue.py --quick    # 1 seed, 32-step runs, 2 blocks (smoke test)

A full run writes ``rescue.md`` and ``rescue.json`` to ``benchmarks/results/`` (committed: the README
cites them); ``--quick`` writes to ``benchmarks/results/quick/`` (scratch); ``--out`` chooses.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rescue_lib as lib
from gradwatch_bench.cli import QUICK_RESULTS, RESULTS, add_out_argument, quiet
from gradwatch_bench.writer import loadavg, machine_info, write_files

TOLERANCE = 0.02  # recovery band: within 2 % of the clean run's held-out loss
AFTER_HORIZON = 20  # steps after a fault's last step searched for the worst clean-batch loss

_CORPUS: Optional[lib.Corpus] = None


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _init_worker() -> None:
    """One intra-op thread per run (two runs share two cores) and the corpus read once per process."""
    global _CORPUS
    quiet()
    torch.set_num_threads(1)
    _CORPUS = lib.load_corpus()


def _run_task(task: tuple[lib.RunConfig, str, str, int]) -> dict[str, Any]:
    config, scenario_name, variant_name, seed = task
    if _CORPUS is None:
        _init_worker()
    assert _CORPUS is not None
    scenario = {s.name: s for s in lib.scenarios(config.steps)}[scenario_name]
    variant = {v.name: v for v in lib.VARIANTS}[variant_name]
    result = lib.run(config, _CORPUS, scenario, variant, seed)
    print(
        f"[rescue] {scenario_name:>11} {variant_name:>14} seed {seed}: "
        + (
            f"held-out {result.final_heldout:.3f}, {result.seconds:.0f} s"
            if result.available
            else "not available in this version"
        ),
        file=sys.stderr,
        flush=True,
    )
    return asdict(result)


def run_all(
    config: lib.RunConfig,
    scenario_names: Sequence[str],
    variant_names: Sequence[str],
    seeds: Sequence[int],
    jobs: int,
) -> list[dict[str, Any]]:
    """Every (scenario, variant, seed) run, ``jobs`` at a time in separate processes."""
    tasks = [
        (config, scenario, variant, seed)
        for seed in seeds
        for variant in variant_names
        for scenario in scenario_names
    ]
    if jobs <= 1:
        return [_run_task(task) for task in tasks]
    # spawn: a fresh interpreter per worker, no torch thread pool inherited through fork
    pool = multiprocessing.get_context("spawn").Pool(jobs, initializer=_init_worker)
    try:
        return pool.map(_run_task, tasks, chunksize=1)
    finally:
        # close + join, not terminate: workers that exit normally count in RUSAGE_CHILDREN
        pool.close()
        pool.join()


# --------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------


def _heldout(run: dict[str, Any]) -> dict[int, float]:
    return {int(step): value for step, value in run["heldout"].items()}


def _outside(value: float, clean: float) -> bool:
    # NaN (a diverged run) is never within the band
    return not value <= (1.0 + TOLERANCE) * clean


def recovery_steps(
    heldout: dict[int, float], clean: dict[int, float], start: int, window_end: int
) -> Optional[int]:
    """Steps from ``start`` until the held-out loss is back within the band and stays there up to
    ``window_end``; 0 if it never left it, ``None`` if it is outside at the window's last evaluation."""
    evals = sorted(t for t in heldout if start < t <= window_end and t in clean)
    outside = [t for t in evals if _outside(heldout[t], clean[t])]
    if not outside:
        return 0
    if outside[-1] == evals[-1]:
        return None
    return evals[evals.index(outside[-1]) + 1] - start


def fault_figures(
    run: dict[str, Any], clean: dict[str, Any], scenario: lib.Scenario, steps: int
) -> list[dict[str, Any]]:
    """Loss jump, worst loss after and recovery of each fault of ``scenario`` in ``run``."""
    train, heldout, clean_heldout = run["train_loss"], _heldout(run), _heldout(clean)
    bad = {s for f in scenario.faults if isinstance(f, lib.BadBatch) for s in f.steps}
    starts = [f.step for f in scenario.faults] + [steps]
    out = []
    for fault, window_end in zip(scenario.faults, starts[1:]):
        before = train[fault.step - 1]
        after_steps = range(fault.step + 1, min(fault.steps[-1] + AFTER_HORIZON + 1, len(train)))
        after = [train[t] for t in after_steps if t not in bad]
        out.append(
            {
                "fault": fault.describe(),
                "jump": train[fault.step] / before,
                "after": max(after) / before if after else math.nan,
                "recovery": recovery_steps(heldout, clean_heldout, fault.step, window_end),
            }
        )
    return out


def largest_step_jump(train: Sequence[float]) -> float:
    """The largest ratio of one step's train loss to the step before's."""
    return max((b / a for a, b in zip(train, train[1:]) if a > 0), default=math.nan)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None]
    return statistics.fmean(finite) if finite else math.nan


def summarize(
    runs: Sequence[dict[str, Any]],
    config: lib.RunConfig,
    scenario_list: Sequence[lib.Scenario],
    first_fault: int,
) -> list[dict[str, Any]]:
    """One row per (scenario, variant): figures per seed and their means; "before" is the last
    held-out evaluation at or before step ``first_fault``."""
    by_key = {(r["scenario"], r["variant"], r["seed"]): r for r in runs}
    rows = []
    for scenario in scenario_list:
        for variant in lib.VARIANTS:
            seeds = sorted(s for (sc, v, s) in by_key if sc == scenario.name and v == variant.name)
            mine = [by_key[(scenario.name, variant.name, s)] for s in seeds]
            if not mine:
                continue
            row: dict[str, Any] = {
                "scenario": scenario.name,
                "variant": variant.name,
                "seeds": seeds,
                "available": all(r["available"] for r in mine),
            }
            rows.append(row)
            if not row["available"]:
                continue
            per_seed = []
            for run in mine:
                heldout = _heldout(run)
                base = by_key.get(("natural", "none", run["seed"]))
                clean = by_key.get(("natural", variant.name, run["seed"]))
                end = heldout[max(heldout)]
                per_seed.append(
                    {
                        "seed": run["seed"],
                        "before": heldout[max(t for t in heldout if t <= first_fault)],
                        "end": end,
                        "end_vs_baseline": end / _heldout(base)[max(heldout)] - 1.0
                        if base and base["available"]
                        else math.nan,
                        "largest_step_jump": largest_step_jump(run["train_loss"]),
                        "faults": fault_figures(run, clean, scenario, config.steps)
                        if clean and scenario.faults
                        else [],
                        "skipped": len(run["actions"].get("skip", [])),
                        "clipped": len(run["actions"].get("clip", [])),
                        "seconds": run["seconds"],
                    }
                )
            row["per_seed"] = per_seed
            for key in ("before", "end", "end_vs_baseline", "skipped", "clipped", "seconds"):
                values = [p[key] for p in per_seed]
                row[key] = _mean(values)
                row[key + "_sd"] = statistics.stdev(values) if len(values) > 1 else math.nan
            row["largest_step_jump"] = _mean([p["largest_step_jump"] for p in per_seed])
            row["faults"] = [
                {
                    "fault": fault["fault"],
                    "jump": _mean([p["faults"][i]["jump"] for p in per_seed]),
                    "after": _mean([p["faults"][i]["after"] for p in per_seed]),
                    "recovery": [p["faults"][i]["recovery"] for p in per_seed],
                }
                for i, fault in enumerate(per_seed[0]["faults"])
            ]
    return rows


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _f(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _pm(row: dict[str, Any], key: str, digits: int = 3) -> str:
    sd = row[key + "_sd"]
    return _f(row[key], digits) + (f" ± {_f(sd, digits)}" if math.isfinite(sd) else "")


def _recovery(values: Sequence[Optional[int]]) -> str:
    done = [v for v in values if v is not None]
    if not done:
        return "n.r."
    text = f"{statistics.fmean(done):.0f}"
    missed = len(values) - len(done)
    return text + (f" ({missed}/{len(values)} n.r.)" if missed else "")


def table(rows: Sequence[dict[str, Any]], first_fault: int) -> list[str]:
    """The Markdown table: one line per (scenario, variant)."""
    lines = [
        f"| scenario | variant | held-out before faults (step {first_fault}) | held-out at end | end vs clean no-rules "
        "| loss jump at fault | worst loss after | recovery steps | steps skipped | steps clipped "
        "| wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row['scenario']} | {row['variant']} |"
        if not row["available"]:
            lines.append(head + " not available in this version" + " |" * 9)
            continue
        if row["faults"]:
            jump = " / ".join(f"{f['jump']:.2f}x" for f in row["faults"])
            after = " / ".join(f"{f['after']:.2f}x" for f in row["faults"])
            recovery = " / ".join(_recovery(f["recovery"]) for f in row["faults"])
        else:
            jump, after, recovery = f"{row['largest_step_jump']:.2f}x (largest)", "-", "-"
        delta = row["end_vs_baseline"]
        lines.append(
            f"{head} {_pm(row, 'before')} | {_pm(row, 'end')} | "
            f"{'n/a' if not math.isfinite(delta) else f'{100 * delta:+.1f} %'} | {jump} | {after} | "
            f"{recovery} | {_f(row['skipped'], 1)} | {_f(row['clipped'], 1)} | "
            f"{_f(row['seconds'], 0)} |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    corpus = result["corpus"]
    lines = [
        "# Does governance rescue runs?",
        "",
        f"{m['date']} · {m['cpu']} ({m['cores']} cores) · {result['jobs']} runs at a time, 1 torch "
        f"thread each · torch {m['torch']} · lightning {m['lightning']} · Python {m['python']}"
        + (
            " · **quick mode (shortened runs, one seed: not a measurement)**"
            if result["quick"]
            else ""
        ),
        f"Load average at start: {m['loadavg_start']}; at end: {m['loadavg_end']}. "
        f"Total wall time {result['seconds'] / 60:.1f} min; CPU time of all processes "
        f"{result['cpu_seconds'] / 60:.1f} min.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Model: Post-LN byte-level transformer, {c['n_blocks']} blocks, d {c['d_model']}, "
        f"{c['heads']} heads, {result['parameters']:,} parameters; AdamW lr {c['lr']:g} constant, "
        f"no warm-up, weight decay {c['weight_decay']:g}; context {c['context']}, batch {c['batch']}, "
        f"{c['steps']} steps; seeds {', '.join(map(str, result['seeds']))}. Held-out loss: nats per "
        f"byte on {c['eval_windows']} fixed windows of the held-out modules, every "
        f"{c['eval_every']} steps.",
        "",
        f"Data: {len(corpus['train_files'])} training modules ({corpus['train_bytes']:,} bytes), "
        f"{len(corpus['heldout_files'])} held-out modules ({corpus['heldout_bytes']:,} bytes) from "
        f"`{corpus['root']}`"
        + (f"; missing here: {corpus['missing']}" if corpus["missing"] else "")
        + ".",
        "",
        "Scenarios:",
        "",
        *[f"- `{s['name']}`: {s['description']}" for s in result["scenarios"]],
        "",
        "Variants (every one trains with `GradientFlowCallback(log_every_n_steps="
        f"{c['log_every_n_steps']}, rules=...)`):",
        "",
        *[f"- `{v['name']}`: {v['description']}" for v in result["variants"]],
        "",
        *table(result["rows"], result["first_fault"]),
        "",
        "Mean ± standard deviation over seeds. *End vs clean no-rules*: held-out loss at the end over "
        "the `natural` run without rules of the same seed, minus 1. *Loss jump at fault*: train loss "
        "at the fault's first step over the step before (for bad batches: the bad batch's own "
        "loss); `natural` shows the largest single-step ratio of the run. *Worst loss after*: the "
        "largest train loss on clean batches from the fault's second step to "
        f"{AFTER_HORIZON} steps after its last, over the same step-before loss. *Recovery*: steps "
        "from the fault's first step to the first held-out evaluation from which on (up to the next "
        f"fault or the end) the held-out loss stays within {100 * TOLERANCE:.0f} % of the `natural` "
        "run of the same variant and seed at the same step; 0: it never left that band; n.r.: "
        "outside at the last evaluation before the next fault (or the end); mean over the seeds "
        "that recovered. *Steps skipped / clipped*: optimizer steps at which a rule skipped / "
        "clipped (Lightning's own clipping is not counted). *Wall s*: seconds per run (two runs "
        "share the machine).",
    ]
    return "\n".join(lines) + "\n"


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one seed, 32-step runs of a 2-block model (smoke test)",
    )
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (processes)")
    parser.add_argument("--scenarios", nargs="+", default=None, help="subset (natural is added)")
    parser.add_argument("--variants", nargs="+", default=None, help="subset (none is added)")
    parser.add_argument(
        "--render", default=None, help="only recompute the table from this rescue.json's runs"
    )
    add_out_argument(parser, "rescue")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.render:
        return render(args.render, args.out or os.path.dirname(os.path.abspath(args.render)))
    quiet()
    start = time.perf_counter()
    config = lib.RunConfig()
    if args.quick:
        # a smoke run: a smaller model, and just enough steps for three non-overlapping bursts
        config = replace(
            config,
            steps=32,
            d_model=32,
            n_blocks=2,
            eval_every=4,
            eval_windows=16,
            log_every_n_steps=8,
        )
    if args.steps:
        config = replace(config, steps=args.steps)
    seeds = list(range(args.seeds if args.seeds else (1 if args.quick else 3)))
    scenario_list = [
        s
        for s in lib.scenarios(config.steps)
        if args.scenarios is None or s.name in args.scenarios or s.name == "natural"
    ]
    variant_names = [
        v.name
        for v in lib.VARIANTS
        if args.variants is None or v.name in args.variants or v.name == "none"
    ]
    result: dict[str, Any] = {
        "machine": machine_info(threads=1),
        "command": " ".join(["python", "benchmarks/rescue.py", *(argv or sys.argv[1:])]),
        "quick": args.quick,
        "jobs": args.jobs,
        "seeds": seeds,
        "config": asdict(config),
    }
    corpus = lib.load_corpus()
    result["corpus"] = {
        "root": corpus.root,
        "train_files": corpus.train_files,
        "heldout_files": corpus.heldout_files,
        "missing": corpus.missing,
        "train_bytes": len(corpus.train),
        "heldout_bytes": len(corpus.heldout),
    }
    result["parameters"] = sum(
        p.numel() for p in lib.CharTransformer(config, corpus, 0).parameters()
    )
    result["scenarios"] = [{"name": s.name, "description": s.description} for s in scenario_list]
    result["variants"] = [
        {"name": v.name, "description": v.description}
        for v in lib.VARIANTS
        if v.name in variant_names
    ]
    runs = run_all(config, [s.name for s in scenario_list], variant_names, seeds, args.jobs)
    result["first_fault"] = min(
        (f.step for s in scenario_list for f in s.faults), default=config.steps // 2
    )
    result["rows"] = summarize(runs, config, scenario_list, result["first_fault"])
    result["runs"] = runs
    result["seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = cpu_seconds()
    result["machine"]["loadavg_end"] = loadavg()
    # the shared results folders: a full run's results are committed, a quick run's are scratch
    write(result, args.out or (QUICK_RESULTS if args.quick else RESULTS))
    return result


def write(result: dict[str, Any], out: str) -> None:
    """``rescue.md`` and ``rescue.json`` into ``out``; the table also on stdout."""
    text = markdown(result)
    # compact: the per-step losses of every run make an indented file ten times as long
    write_files(out, "rescue", text, result, compact=True)
    print(text)


def render(path: str, out: str) -> dict[str, Any]:
    """Recompute the table from the runs saved in a ``rescue.json`` (no training)."""
    with open(path, encoding="utf-8") as handle:
        result: dict[str, Any] = json.load(handle)
    config = lib.RunConfig(**result["config"])
    names = {s["name"] for s in result["scenarios"]}
    scenario_list = [s for s in lib.scenarios(config.steps) if s.name in names]
    result["rows"] = summarize(result["runs"], config, scenario_list, result["first_fault"])
    write(result, out)
    return result


if __name__ == "__main__":
    main()
