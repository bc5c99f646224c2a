"""Example 7, spike rescue: bad batches hit a transformer, with and without adaptive governance.

The character transformer of ``benchmarks/rescue.py`` learns the standard library's source. Three
bursts of 4 bad batches (random bytes, misaligned targets, a zero-filled block) arrive mid-run. Run
once without rules and once with the adaptive clip (ZClip-style: clip the total gradient norm to its
EMA mean + 2.5 EMA standard deviations) and the loss / gradient-norm spike skip (OLMo-core's policy:
skip the step when either is more than 6 standard deviations above its last 128 values). Printed: the
alerts of the governed run and the held-out loss of both. The alerts' audit trail is in
``<root>/ex07_spike_rescue/governed/gradwatch_alerts.jsonl``.

Run: ``python examples/ex07_spike_rescue.py [--root runs] [--fast]``
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from common import example_args  # also sets torch to one thread

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

import rescue_lib as lib
from gradwatch_bench.cli import quiet

EXPERIMENT = "ex07_spike_rescue"


def main() -> int:
    args = example_args(__doc__.splitlines()[0], default_root="runs")
    quiet()
    # 250 steps keep the example under a minute; --fast: a smoke run too short for the rules' warm-up
    config = replace(lib.RunConfig(), steps=40 if args.fast else 250, eval_every=10)
    corpus = lib.load_corpus()
    scenario = {s.name: s for s in lib.scenarios(config.steps)}["bad_batches"]
    print(f"[ex07] faults: {scenario.description}")
    variants = {v.name: v for v in lib.VARIANTS}
    governed = lib.Variant(
        "governed",
        "adaptive clip + spike skip",
        lambda: variants["adaptive_clip"].rules() + variants["spike_skip"].rules(),
    )
    results = {}
    for variant in (variants["none"], governed):
        root = os.path.join(args.root, EXPERIMENT, variant.name)
        results[variant.name] = result = lib.run(config, corpus, scenario, variant, 0, root=root)
        if not result.available:
            print(f"[ex07] {variant.name}: rules not available in this version of the package")
            return 1
    by_step: dict[int, list[str]] = {}
    for alert in results["governed"].alerts:
        by_step.setdefault(alert["step"], []).append(f"{alert['action'].upper()} {alert['rule']}")
    for step, actions in by_step.items():
        print(f"[ex07] governed, step {step:>4}: {', '.join(actions)}")
    first = scenario.faults[0].step
    for name, result in results.items():
        before = result.heldout[max(t for t in result.heldout if t <= first)]
        print(
            f"[ex07] {name:>8}: held-out loss {result.final_heldout:.3f} at step {config.steps} "
            f"({before:.3f} before the faults; clipped {len(result.actions.get('clip', []))}, "
            f"skipped {len(result.actions.get('skip', []))} steps)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
