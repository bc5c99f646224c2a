"""Example 6, LightningCLI with a YAML config that adds the callback and its rules.

``ex06_config.yaml`` puts ``lightning_gradwatch.GradientFlowCallback`` (with ``Rule`` objects
written as plain mappings) into ``trainer.callbacks``: no Python change to the training script.

Run: ``python examples/ex06_lightning_cli.py [--root runs] [--fast]`` (which means
``fit --config examples/ex06_config.yaml``), or pass LightningCLI arguments yourself:
``python examples/ex06_lightning_cli.py fit --config examples/ex06_config.yaml --trainer.max_steps 50``
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from common import MLPClassifier, fast_mode
from lightning.pytorch.cli import LightningCLI

from lightning_gradwatch.report.cli import main as gradwatch

CONFIG = Path(__file__).with_name("ex06_config.yaml")


class CLIClassifier(MLPClassifier):
    """The examples' MLP with only the arguments a config needs (the data set is built inside)."""

    def __init__(
        self,
        depth: int = 10,
        width: int = 32,
        activation: str = "relu",
        init: str = "default",
        lr: float = 0.05,
    ) -> None:
        super().__init__(depth=depth, width=width, activation=activation, init=init, lr=lr)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--root", default="runs")
    parser.add_argument("--fast", action="store_true")
    ours, rest = parser.parse_known_args(argv)
    args = rest or ["fit", "--config", str(CONFIG)]
    args += [f"--trainer.logger.init_args.save_dir={ours.root}"]
    if fast_mode(["--fast"] if ours.fast else []):
        args += ["--trainer.max_steps=6"]
    if (
        not rest
    ):  # the default config: start from a clean run folder (see common.tensorboard_logger)
        shutil.rmtree(Path(ours.root) / "ex06_lightning_cli" / "sigmoid_cli", ignore_errors=True)
    cli = LightningCLI(CLIClassifier, args=args, save_config_callback=None)
    log_dir = Path(cli.trainer.logger.log_dir)  # type: ignore[union-attr]
    print(f"[ex06] callbacks from the config: {[type(c).__name__ for c in cli.trainer.callbacks]}")
    return gradwatch(["report", str(log_dir), "--out", str(log_dir / "report")])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
