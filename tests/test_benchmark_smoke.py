"""The benchmarks: ``benchmarks/overhead.py --quick`` runs end to end and writes its Markdown
table and JSON; the goals' verdicts follow from the spread of the repeated measurements (synthetic
ones here); the committed results are what the writer makes of their recorded steps; and
``benchmarks/measured_step.py`` still drives the real internals.

Nothing here asserts a timing (that is the benchmark's job, on a quiet machine).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from typing import Any

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "overhead.py")
VARIANTS = (
    "baseline",
    "measured",
    "measured_no_stats",
    "unmeasured",
    "governance",
    "builtin",
    "backward_hooks",
    "floor",
    "floor_blocks",
)


def test_quick_benchmark_writes_table_and_json(tmp_path: Any) -> None:
    out = tmp_path / "results"
    command = [sys.executable, SCRIPT, "--quick", "--models", "mlp", "--rounds", "2"]
    command += ["--memory-steps", "12", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads((out / "overhead.json").read_text())
    assert result["quick"] is True
    (model,) = result["models"]
    assert model["name"] == "mlp" and model["blocks"] == 4
    stats = model["stats"]
    assert set(VARIANTS) <= set(stats)
    for name in VARIANTS:
        assert stats[name]["steps"] == 2, name  # one step per round, every round recorded
    # Every timed step is in the records, tagged with its variant and round.
    assert sorted((r["variant"], r["round"]) for r in model["records"]) == sorted(
        (name, r) for name in stats if not stats[name]["derived"] for r in range(2)
    )
    # The instrumented variants spent time in their own hooks; the baseline has none.
    assert stats["baseline"]["own_median_ms"] == 0.0
    for name in ("measured", "governance", "builtin", "floor", "floor_blocks"):
        assert stats[name]["own_median_ms"] > 0.0, name
    assert {goal["model"] for goal in result["goals"]} == {"mlp"}
    assert result["memory"]["steps"] == 12

    table = (out / "overhead.md").read_text()
    assert "| variant |" in table and "## Goals" in table and "## Memory" in table
    assert "Lightning `grad_norm` + `self.log_dict`" in table
    assert "quick mode" in table


def test_quick_updates_benchmark_writes_the_ratio_of_a_measured_step_with_and_without(
    tmp_path: Any,
) -> None:
    out = tmp_path / "results"
    script = os.path.join(ROOT, "benchmarks", "updates.py")
    command = [sys.executable, script, "--quick", "--rounds", "2", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "updates.json").read_text())
    assert [model["name"] for model in result["models"]] == ["mlp", "gpt"]
    for model in result["models"]:
        stats, headline = model["stats"], model["headline"]
        names = {"baseline", "measured", "measured_updates", "unmeasured", "unmeasured_updates"}
        assert set(stats) >= names
        # The update figures' work is the callback's own: its hooks, the step post-hook included.
        assert (
            stats["measured_updates"]["own_median_ms"]
            > stats["unmeasured_updates"]["own_median_ms"]
        )
        assert headline["ratio"] > 0 and len(headline["ratio_ci"]) == 2
    assert "| model | step ratio" in (out / "updates.md").read_text()


# -- the goals' verdicts: met, not met, or not measurable at this noise ------------------------


def _bench(name: str) -> Any:
    """A module of ``benchmarks/gradwatch_bench`` (the benchmarks folder is not a package)."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    return importlib.import_module(f"gradwatch_bench.{name}")


BENCHMARKS = os.path.join(ROOT, "benchmarks")
ROUNDS = 20


def _records(costs: dict[str, list[float]]) -> list[Any]:
    """Timed steps of several rounds: a baseline step that drifts from round to round (the
    machine's noise, the same for every variant of a round) plus each variant's cost in that round,
    which is also its own time (time in its hooks)."""
    stats = _bench("stats")
    out = []
    for r in range(ROUNDS):
        base = 100.0 + 30.0 * ((r * 7) % 5)  # 100 .. 220 ms: a drift far above every cost
        out.append(stats.StepRecord("baseline", r, base, base, 0.0))
        for name, cost in costs.items():
            c = cost[r % len(cost)]
            out.append(stats.StepRecord(name, r, base + c, base + c, max(c, 0.0)))
    return out


def _goal(costs: dict[str, list[float]], goal: str, how: str) -> dict[str, Any]:
    stats, goals = _bench("stats"), _bench("goals")
    model = {
        "name": "m",
        "stats": {k: vars(v) for k, v in stats.summarize(_records(costs), seed=0).items()},
    }
    (found,) = [g for g in goals.goals(model) if g["goal"] == goal and g["how"] == how]
    return found


def test_a_ratio_of_costs_above_the_noise_is_met_or_not_met_by_its_whole_interval() -> None:
    goals = _bench("goals")
    steady = {"floor": [4.9, 5.0, 5.1]}  # a cost the pairing resolves: its CI is [4.9, 5.1]
    met = _goal({**steady, "governance": [5.4, 5.5, 5.6]}, "governance / floor", "paired wall Δ")
    assert met["verdict"] == goals.MET and met["met"] is True
    low, high = met["interval"]
    assert 5.4 / 5.1 <= low <= met["value"] <= high <= 5.6 / 4.9 < 1.2
    assert met["spread"]["governance"][0] > 0 and met["spread"]["floor"][0] > 0
    missed = _goal({**steady, "governance": [7.9, 8.0, 8.1]}, "governance / floor", "own time")
    assert missed["verdict"] == goals.NOT_MET and missed["met"] is False
    assert missed["interval"][0] > 1.2
    # A spread that straddles the limit decides nothing.
    wide = _goal({**steady, "governance": [4.0, 6.0, 8.0]}, "governance / floor", "paired CPU Δ")
    assert wide["interval"][0] < 1.2 < wide["interval"][1]
    assert wide["verdict"] == goals.NOISE and wide["met"] is None


def test_a_negative_or_noise_level_ratio_is_never_met() -> None:
    goals, writer = _bench("goals"), _bench("writer")
    # The committed run's case: both paired differences scatter around zero, so their ratio came
    # out negative (-0.836) and used to be marked as met.
    noisy = {"floor": [-19.0, 8.6, 2.8, -3.0], "governance": [-34.7, 5.4, -2.3, 1.0]}
    goal = _goal(noisy, "governance / floor", "paired wall Δ")
    assert goal["verdict"] == goals.NOISE and goal["met"] is None and goal["interval"] is None
    assert goal["spread"]["governance"][0] < 0 < goal["spread"]["governance"][1]
    # Only the numerator in the noise: a ratio near zero, still not a measurement.
    half = _goal(
        {"floor": [4.9, 5.0, 5.1], "governance": [-1.0, 0.0, 1.0]},
        "governance / floor",
        "paired wall Δ",
    )
    assert half["value"] < 1.2 and half["verdict"] == goals.NOISE
    # A variant faster than the baseline in every round: a negative cost is noise too.
    faster = _goal(
        {"floor": [4.9, 5.0, 5.1], "governance": [-3.0, -2.0]},
        "governance / floor",
        "paired wall Δ",
    )
    assert faster["value"] < 0 and faster["verdict"] == goals.NOISE
    # The unmeasured step's share of the step, within the limit by its value, lost in the noise.
    cost = _goal(
        {"unmeasured": [-9.0, 0.1, 6.0]}, "unmeasured step cost, % of the step", "paired wall Δ"
    )
    assert cost["value"] <= 0.5 and cost["verdict"] == goals.NOISE
    # The table says so, with the spread, and never "yes".
    row = next(
        line
        for line in writer._goals_section([goal])
        if line.startswith("| m | governance / floor |")
    )
    ci = goal["spread"]["governance"]
    assert "| not measurable at this noise |" in row and "| yes |" not in row
    assert f"Δ governance [{ci[0]:.2f}, {ci[1]:.2f}] ms" in row


def test_committed_results_are_rendered_from_their_recorded_steps(tmp_path: Any) -> None:
    """The committed overhead.md/.json are what the writer makes of the recorded steps today: the
    statistics recomputed from ``records`` equal the committed ones, and so do the verdicts."""
    cli, goals = _bench("cli"), _bench("goals")
    path = os.path.join(ROOT, "benchmarks", "results", "overhead.json")
    with open(path, encoding="utf-8") as handle:
        committed = json.load(handle)
    rendered = json.loads(json.dumps(cli.render(path, str(tmp_path))))  # tuples -> lists
    for old, new in zip(committed["models"], rendered["models"]):
        assert old["stats"] == new["stats"], old["name"]
    assert committed["goals"] == rendered["goals"]
    table = (tmp_path / "overhead.md").read_text()
    with open(os.path.join(ROOT, "benchmarks", "results", "overhead.md"), encoding="utf-8") as f:
        committed_table = f.read()
    assert committed_table.split("## Goals")[1] == table.split("## Goals")[1]
    # No goal of the committed run is marked met on a figure lost in the noise.
    for goal in committed["goals"]:
        if goal["met"]:
            assert all(ci[0] > 0 for ci in goal["spread"].values()), goal
            assert goal["interval"][1] <= goal["limit"] or goal["goal"].endswith("(at least)")
        if goal["value"] <= 0:
            assert goal["verdict"] == goals.NOISE, goal


# -- benchmarks/measured_step.py: the internals it drives still exist and measure right --------


def test_measured_step_quick_times_the_real_measure_and_gets_the_reference_norm(
    capsys: Any, monkeypatch: Any
) -> None:
    spec = importlib.util.spec_from_file_location(
        "measured_step", os.path.join(ROOT, "benchmarks", "measured_step.py")
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "measured_step", script)  # its dataclasses look it up
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        timing = script.main(["--quick"])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    match = re.search(r"best ([0-9.]+) ms, median ([0-9.]+) ms", printed)
    assert match is not None, printed
    best, median = float(match.group(1)), float(match.group(2))
    assert len(timing.times_ms) == 3 and 0 < timing.best_ms <= timing.median_ms < 1e4
    assert (best, median) == (round(timing.best_ms, 2), round(timing.median_ms, 2))
    # What it timed is a real measurement of the model it built: every block, and the total norm
    # of an independent reference over the same gradients (float32 norms summed in float64).
    setup = script.build(4, 64)
    measurement = timing.measurement
    assert measurement.block_names == [f"blocks.{i}" for i in range(4)]
    assert all(n is not None and math.isfinite(n) and n > 0 for n in measurement.block_norms)
    squares = sum(g.double().square().sum() for _, g in setup.named_grads)
    reference = float(torch.sqrt(squares))
    assert measurement.total_norm == pytest.approx(reference, rel=1e-5)


def test_curvature_benchmark_quick_mode_writes_its_table(tmp_path: Any) -> None:
    out = tmp_path / "curvature.md"
    script = os.path.join(ROOT, "benchmarks", "curvature.py")
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, script, "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [
        line
        for line in out.read_text().splitlines()
        if line.startswith("| MLP") or line.startswith("| GPT")
    ]
    assert len(rows) == 2
    for row in rows:
        # a curvature step costs more than a plain one, cold and warm
        cold, warm = (float(x) for x in re.findall(r"\| x([0-9.]+) ", row))
        assert cold > 1.0 and warm > 1.0
