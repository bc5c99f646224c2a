"""The callback from a LightningCLI YAML config: parsed with its init_args, attached, and measuring."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI
from models import BlockNet
from reference import csv_metrics, lightning_cli

from lightning_gradwatch import GradientFlowCallback

CONFIG = """\
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 5
  enable_progress_bar: false
  enable_model_summary: false
  enable_checkpointing: false
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args:
      save_dir: {save_dir}
      name: cli
  callbacks:
    - class_path: lightning_gradwatch.GradientFlowCallback
      init_args:
        log_every_n_steps: 2
        norm_type: {norm_type}
        blocks: {blocks}
        log_param_norms: "*.bias"
model:
  depth: 3
"""


def _cli(tmp_path: Path, norm_type: str, blocks: str) -> LightningCLI:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(save_dir=tmp_path, norm_type=norm_type, blocks=blocks))
    return lightning_cli(BlockNet, args=["fit", "--config", str(config)], save_config_callback=None)


@pytest.mark.parametrize(
    ("norm_type", "blocks", "names"),
    [
        ("l1", "blocks", ["blocks.0", "blocks.1", "blocks.2"]),
        ("linf", "[blocks.0, blocks.2]", ["blocks.0", "blocks.2"]),
        ("mean", "auto", ["blocks.0", "blocks.1", "blocks.2"]),
    ],
)
def test_callback_from_yaml_config(
    tmp_path: Path, norm_type: str, blocks: str, names: list[str]
) -> None:
    cli = _cli(tmp_path, norm_type, blocks)
    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, GradientFlowCallback)]
    assert len(callbacks) == 1
    callback = callbacks[0]
    assert callback.log_every_n_steps == 2
    assert callback.spec.norm_type == norm_type
    assert callback.spec.log_param_norms == "*.bias"
    assert callback.block_names == names
    assert callback.last is not None and callback.last.step == 4
    logged = csv_metrics(str(cli.trainer.logger.log_dir))  # type: ignore[union-attr]
    assert sorted(logged) == [0, 2, 4]
    assert logged[4]["grad_norm_total"] == pytest.approx(callback.last.total_norm, rel=1e-12)
    keys = {key for key in logged[4] if key.startswith("grad_norm/")}
    assert keys == {f"grad_norm/{name}" for name in names}
    params = {key for key in logged[4] if key.startswith("grad_param_norm/")}
    assert params == {
        f"grad_param_norm/{n}" for n, _ in cli.model.named_parameters() if n.endswith(".bias")
    }
    assert isinstance(cli.model, BlockNet) and len(cli.model.blocks) == 3


def test_bad_value_in_yaml_config_is_reported(tmp_path: Path) -> None:
    # Instantiating the callback from the config surfaces its own validation message.
    with pytest.raises(ValueError, match=r"`norm_type` must be one of .*got 'l3'"):
        _cli(tmp_path, "l3", "auto")
