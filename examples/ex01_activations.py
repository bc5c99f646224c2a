"""Example 1, activations: 10-layer sigmoid vs tanh vs ReLU MLPs.

sigmoid'(x) <= 0.25, so every sigmoid block shrinks the gradient going backward: the report shows
DAMPING transitions and a tiny end-to-end gain (the "vanishing ratio": first block's norm / last
block's norm). tanh (Xavier init) loses less; ReLU with He init keeps the gradient: Healthy.

Run: ``python examples/ex01_activations.py [--root runs] [--fast]``
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import MLPClassifier, example_args, report, run_dir, tensorboard_logger, train

from lightning_gradwatch import GradientFlowCallback

# Each activation with the initialisation made for it (Xavier for the saturating ones, He for ReLU).
RUNS = {"sigmoid": "xavier", "tanh": "xavier", "relu": "he"}


def main() -> int:
    args = example_args(__doc__.splitlines()[0], default_root="runs")
    steps = 10 if args.fast else 200
    dirs: list[Path] = []
    for activation, init in RUNS.items():
        model = MLPClassifier(depth=10, activation=activation, init=init, lr=0.05)
        logger = tensorboard_logger(args.root, "ex01_activations", activation)
        callback = GradientFlowCallback(log_every_n_steps=5, rules=[])
        train(model, callback, logger, max_steps=steps)
        dirs.append(run_dir(logger))
        assert callback.last is not None
        summary = callback.last.summary
        print(
            f"[ex01] {activation:>7} ({init}): damping transitions {summary['num_damping']:.0f}/9, "
            f"healthy {summary['num_healthy']:.0f}/9, vanishing ratio (end-to-end gain) "
            f"{summary['end_to_end_gain']:.2e}"
        )
    return report(dirs, args.root, "ex01_activations")


if __name__ == "__main__":
    sys.exit(main())
