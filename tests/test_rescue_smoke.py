"""``benchmarks/rescue.py --quick`` runs end to end and writes its Markdown table and JSON.

A smoke test only (one seed, 32-step runs of a 2-block model): nothing here asserts that a variant
helps; that is the full benchmark's job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "rescue.py"
SCENARIOS = ("natural", "bad_batches", "lr_jump")
VARIANTS = ("none", "lightning_clip", "static_clip", "adaptive_clip", "spike_skip")


def test_quick_rescue_writes_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(SCRIPT), "--quick", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    result = json.loads((out / "rescue.json").read_text())
    assert result["quick"] is True and result["seeds"] == [0]
    assert not result["corpus"]["missing"]
    rows = {(row["scenario"], row["variant"]): row for row in result["rows"]}
    assert set(rows) == {(s, v) for s in SCENARIOS for v in VARIANTS}
    for key, row in rows.items():
        assert row["available"], key
        assert row["end"] > 0, key
    # The static clip rule and Lightning's gradient_clip_val clip to the same norm at the same steps.
    for scenario in SCENARIOS:
        static, builtin = rows[(scenario, "static_clip")], rows[(scenario, "lightning_clip")]
        assert abs(static["end"] - builtin["end"]) < 1e-2, scenario
    faults = rows[("bad_batches", "none")]["faults"]
    assert len(faults) == 3 and faults[0]["jump"] > 1.5  # a random-bytes batch costs far more

    table = (out / "rescue.md").read_text()
    assert table.strip() in done.stdout
    assert "| scenario | variant |" in table and "quick mode" in table
    for scenario in SCENARIOS:
        for variant in VARIANTS:
            assert f"| {scenario} | {variant} |" in table
