"""``benchmarks/overhead.py --quick`` runs end to end and writes its Markdown table and JSON.

A smoke test only: nothing here asserts a timing (that is the benchmark's job, on a quiet machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

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
