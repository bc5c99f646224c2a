"""``make demo``: a deep sigmoid MLP next to a ReLU residual one, watched by GradientFlowCallback.

Trains both on CPU (well under two minutes), writes TensorBoard logs under ``runs/demo/``, then runs
``gradwatch report`` on them (text to the console, PNGs and a self-contained HTML file to
``runs/demo/report/``) and prints how to open everything.

Run: ``python examples/demo.py [--root runs] [--fast]``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from common import MLPClassifier, example_args, report, run_dir, tensorboard_logger, train

from lightning_gradwatch import GradientFlowCallback

RUNS = {
    # 12 sigmoid layers: sigmoid'(x) <= 0.25, so the gradient shrinks at every block going backward.
    "sigmoid_mlp": {"activation": "sigmoid", "residual": False},
    # ReLU with residual connections: the identity path carries the gradient through every block.
    "relu_residual": {"activation": "relu", "residual": True},
}


def main() -> int:
    args = example_args(__doc__.splitlines()[0], default_root="runs")
    steps, every = (20, 5) if args.fast else (300, 5)
    started = time.perf_counter()
    dirs: dict[str, Path] = {}
    for name, kwargs in RUNS.items():
        model = MLPClassifier(depth=12, width=32, lr=0.1, **kwargs)  # type: ignore[arg-type]
        logger = tensorboard_logger(args.root, "demo", name)
        callback = GradientFlowCallback(
            log_every_n_steps=every,
            log_histograms=True,
            figure_every_n_steps=max(1, steps // every // 4),
        )
        train(model, callback, logger, max_steps=steps)
        dirs[name] = run_dir(logger)
        end_to_end = callback.last.summary["end_to_end_gain"] if callback.last else float("nan")
        print(f"[demo] {name}: trained {steps} steps, end-to-end gain {end_to_end:.3g}")

    code = report([dirs["sigmoid_mlp"], dirs["relu_residual"]], args.root, "demo")
    out = Path(args.root) / "demo" / "report"
    elapsed = time.perf_counter() - started
    print()
    print(f"[demo] done in {elapsed:.0f} s")
    print(f"[demo] TensorBoard logs : {Path(args.root) / 'demo'}  (one folder per run)")
    print(f"[demo]   open them with : tensorboard --logdir {args.root}  (.venv/bin/tensorboard)")
    print(f"[demo] HTML report      : open {out / 'report.html'} in a browser")
    print(f"[demo] PNG pictures     : {out}/*/*.png")
    print(
        f"[demo] report again     : gradwatch report {dirs['sigmoid_mlp']} --compare {dirs['relu_residual']}"
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
