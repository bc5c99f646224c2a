"""Example 2, initialisation: small-std vs Xavier vs He with ReLU, and an exploding net.

With ReLU, N(0, 0.01) weights shrink the gradient at every block (DAMPING, a tiny end-to-end gain),
Xavier loses a little per block, He keeps it (Healthy). The exploding net (weights N(0, 5.0), no
activation) multiplies it by ~sqrt(width) * 5 per block going backward: AMPLIFYING transitions, and a
rule on the gains raises an alert while a clip rule keeps the total norm bounded.

Run: ``python examples/ex02_initialisation.py [--root runs] [--fast]``
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import MLPClassifier, example_args, report, run_dir, tensorboard_logger, train

from lightning_gradwatch import GradientFlowCallback, Rule

RUNS = {
    "relu_small_std": {"activation": "relu", "init": "normal", "init_std": 0.01},
    "relu_xavier": {"activation": "relu", "init": "xavier"},
    "relu_he": {"activation": "relu", "init": "he"},
    "exploding_std5": {"activation": "identity", "init": "normal", "init_std": 5.0},
}


def main() -> int:
    args = example_args(__doc__.splitlines()[0], default_root="runs")
    steps = 10 if args.fast else 150
    dirs: list[Path] = []
    for name, kwargs in RUNS.items():
        model = MLPClassifier(depth=10, lr=0.01, **kwargs)  # type: ignore[arg-type]
        logger = tensorboard_logger(args.root, "ex02_initialisation", name)
        rules = [
            # A transition that grows the gradient more than 4x going backward is worth an alert.
            Rule("grad_gain/*", max=4.0, action="warn", name="amplifying_block"),
            # ... and an exploding total norm is clipped before the optimizer sees it.
            Rule("grad_norm_total", max=10.0, action="clip", clip_to=1.0, name="clip_total"),
        ]
        callback = GradientFlowCallback(log_every_n_steps=5, rules=rules)
        train(model, callback, logger, max_steps=steps)
        dirs.append(run_dir(logger))
        assert callback.last is not None
        s = callback.last.summary
        print(
            f"[ex02] {name:>15}: amplifying {s['num_amplifying']:.0f}, damping "
            f"{s['num_damping']:.0f}, healthy {s['num_healthy']:.0f} of 9; end-to-end gain "
            f"{s['end_to_end_gain']:.2e}; alerts {len(callback.alerts)}"
        )
    return report(dirs, args.root, "ex02_initialisation")


if __name__ == "__main__":
    sys.exit(main())
