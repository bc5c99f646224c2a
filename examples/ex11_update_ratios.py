"""Example 9, update-to-weight ratios: what each optimizer step does to the weights
(``log_updates=True``), for a learning rate that suits the net, one far too high and one far too low.

``update_ratio/<block>`` = ||theta_after - theta_before|| / ||theta_before|| per block, around 1e-3
per step in a healthy run (Karpathy's rule of thumb; LARS/LAMB rescale each layer's step by the
inverse of it). Far above 1e-2 the learning rate is too high for the block, far below 1e-4 the block
barely learns. The diagnosis says which blocks sit outside [1e-4, 1e-2]; a warn rule on
``update_ratio_total`` trips in the run whose steps are too large; the report draws
``update_ratios.png`` and TensorBoard's custom-scalars tab one chart of every block's ratio.

Run: ``python examples/ex11_update_ratios.py [--root runs] [--fast]``
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from common import MLPClassifier, example_args, report, run_dir, tensorboard_logger, train

from lightning_gradwatch import GradientFlowCallback, Rule

#: (run, optimizer, learning rate)
RUNS = (("adam_1e-3", "adam", 1e-3), ("adam_3e-1", "adam", 3e-1), ("sgd_1e-5", "sgd", 1e-5))


def main() -> int:
    args = example_args(__doc__.splitlines()[0], default_root="runs")
    steps = 8 if args.fast else 150
    dirs: list[Path] = []
    for name, optimizer, lr in RUNS:
        torch.manual_seed(0)
        logger = tensorboard_logger(args.root, "ex11_update_ratios", name)
        big = Rule("update_ratio_total", max=0.05, patience=3, action="warn", name="big_steps")
        callback = GradientFlowCallback(log_every_n_steps=2, log_updates=True, rules=[big])
        model = MLPClassifier(depth=6, activation="relu", residual=True, optimizer=optimizer, lr=lr)
        train(model, callback, logger, max_steps=steps)
        dirs.append(run_dir(logger))
        updates = callback.last_updates
        assert updates is not None
        findings = [f.name for f in callback.findings] or ["none"]
        print(
            f"[ex11] {name}: update_ratio_total {updates.update_ratio:.2e}, update/-grad cosine "
            f"{updates.cosine:.2f}, eps fraction {updates.eps_fraction or 0.0:.2f}, "
            f"alerts {len(callback.alerts)}, findings: {', '.join(findings)}"
        )
    return report(dirs, args.root, "ex11_update_ratios")


if __name__ == "__main__":
    sys.exit(main())
