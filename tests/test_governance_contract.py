"""Governance read the way a user would use it: ``Rule`` built with keyword arguments or from a
LightningCLI ``class_path`` entry, a halt checkpoint opened with a plain ``torch.load`` (holding the
weights and the Adam state before the bad update), the callback's state round trip after a halt,
clipping on an unmeasured step logging the pre-clip total next to the clipped one, and a NaN made by
the very first operation of block k's backward (its input side) named as block k, and ``skip`` under
DDP when only rank 1 trips (run as ``python tests/test_governance_contract.py OUT_DIR``)."""

from __future__ import annotations

import csv
import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from expected_warnings import RULE_TRIPS
from faults import (
    FaultNet,
    NaNBackward,
    RankFault,
    ddp_trainer,
    make_trainer,
    same_weights,
    snapshot,
)
from models import Block, BlockNet
from reference import callback_from_cli_config
from torch import Tensor

from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.alerts import read_alerts
from lightning_gradwatch.diagnosis import locate_nonfinite

pytestmark = RULE_TRIPS


def fit(
    tmp_path: Path, model: pl.LightningModule, callback: GradientFlowCallback, steps: int
) -> Any:
    trainer = make_trainer(tmp_path, [callback], max_steps=steps)
    trainer.fit(model)
    return trainer


def csv_column(tmp_path: Path, key: str) -> dict[int, float]:
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(handle) if r.get(key)}


def test_rule_is_a_keyword_dataclass_with_the_documented_fields() -> None:
    assert dataclasses.is_dataclass(Rule)
    fields = {f.name for f in dataclasses.fields(Rule)}
    assert fields >= {
        "metric",
        "min",
        "max",
        "zscore",
        "window",
        "patience",
        "action",
        "clip_to",
        "clip_mode",
    }
    rule = Rule(
        metric="grad_norm_total",
        min=0.0,
        max=5,
        zscore=6,
        window=200,
        patience=3,
        action="clip",
        clip_to=1,
        clip_mode="value",
    )
    assert (rule.max, rule.zscore, rule.clip_to) == (5.0, 6.0, 1.0)
    # A bad value of the right type is a ValueError naming the field; a wrong type a TypeError.
    with pytest.raises(ValueError, match="`metric`"):
        Rule(metric="", max=1.0)
    with pytest.raises(TypeError, match="`metric`"):
        Rule(metric=3, max=1.0)  # type: ignore[arg-type]


def test_rules_from_yaml_with_class_path_entries(tmp_path: Path) -> None:
    callback = {
        "class_path": "lightning_gradwatch.GradientFlowCallback",
        "init_args": {
            "require_logger": False,
            "rules": [
                {
                    "class_path": "lightning_gradwatch.Rule",
                    "init_args": {"metric": "nonfinite", "action": "halt"},
                },
                {"metric": "grad_gain/*", "max": 2.0, "patience": 3, "action": "warn"},
            ],
        },
    }
    config = {"trainer": {"accelerator": "cpu", "logger": False, "callbacks": [callback]}}
    built = callback_from_cli_config(tmp_path, config)
    assert built.rules == [
        Rule("nonfinite", action="halt"),
        Rule("grad_gain/*", max=2.0, patience=3, action="warn"),
    ]


def test_halt_checkpoint_opens_with_plain_torch_load_and_holds_adam_before_the_update(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    s = 3
    model = FaultNet(poison_block=1, poison_steps=(s,), optimizer="adam", lr=0.01)
    callback = GradientFlowCallback(log_every_n_steps=50)  # rules=None: halt on non-finite
    trainer = fit(tmp_path, model, callback, steps=10)

    assert callback.halted and trainer.global_step == s + 1 and max(model.weights) == s
    [alert] = callback.alerts
    assert alert.block == "blocks.1" and "blocks.1" in alert.where
    checkpoint = torch.load(alert["checkpoint_path"])  # torch's default weights_only=True
    assert checkpoint["global_step"] == s
    assert same_weights(checkpoint["state_dict"], model.weights[s])
    assert same_weights(dict(model.named_parameters()), model.weights[s])
    # Adam had taken s steps when the checkpoint was written, and took no step at s or later.
    saved = checkpoint["optimizer_states"][0]["state"]
    assert {int(v["step"]) for v in saved.values()} == {s}
    live = trainer.optimizers[0].state
    assert {int(live[p]["step"]) for p in model.parameters()} == {s}
    for index, p in enumerate(model.parameters()):
        torch.testing.assert_close(live[p]["exp_avg"], saved[index]["exp_avg"], rtol=0, atol=0)
    [record] = read_alerts(str(tmp_path / "csv" / "version_0" / "gradwatch_alerts.jsonl"))
    assert record["checkpoint_path"] == alert.checkpoint and record["rank"] == 0


def test_state_round_trip_after_a_halt(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rules = [
        Rule("nonfinite", action="halt"),
        Rule("grad_norm_total", zscore=100.0, window=10, name="z"),
        Rule("grad_norm_total", max=0.0, patience=100, name="never_acts"),
    ]
    callback = GradientFlowCallback(log_every_n_steps=50, rules=rules)
    fit(tmp_path, FaultNet(poison_steps=(4,)), callback, steps=10)
    state = callback.state_dict()
    governance = state["governance"]
    assert governance["halted"] is True and "blocks.2" in governance["halt_reason"]
    assert governance["rules"]["never_acts"] == {"count": 5, "consecutive": 5, "windows": {}}
    assert len(governance["rules"]["z"]["windows"]["grad_norm_total"]) == 4  # steps 0-3 only

    restored = GradientFlowCallback(log_every_n_steps=50, rules=rules)
    assert not restored.halted
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    assert restored.halted and restored.halt_reason == callback.halt_reason


def test_clip_on_an_unmeasured_step_logs_pre_and_post_clip_totals(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FaultNet()
    rule = Rule("grad_norm_total", max=0.05, action="clip", clip_to=0.02)
    callback = GradientFlowCallback(log_every_n_steps=50, rules=[rule])  # only step 0 measured
    fit(tmp_path, model, callback, steps=3)
    total = csv_column(tmp_path, "grad_norm_total")
    clipped = csv_column(tmp_path, "grad_norm_total_clipped")
    assert set(total) == set(clipped) == {0, 1, 2}
    for step in range(3):
        before = model.grads_after_backward[step]
        pre = float(torch.cat([g.double().reshape(-1) for g in before.values()]).norm())
        seen = model.grads_at_step[step]
        post = float(torch.cat([g.double().reshape(-1) for g in seen.values()]).norm())
        assert total[step] == pytest.approx(pre, rel=1e-5) and pre > 0.05
        assert clipped[step] == pytest.approx(post, rel=1e-4) == pytest.approx(0.02, rel=1e-4)
    assert csv_column(tmp_path, "grad_alerts/grad_norm_total") == {0: 1.0, 1: 2.0, 2: 3.0}


class PoisonInputBlock(Block):
    """A block whose forward starts with the NaN function: its backward's last operation makes the
    NaN, so its own parameters and output gradient stay finite and only its input gradient is NaN."""

    poison = False

    def forward(self, x: Tensor) -> Tensor:
        if self.poison:
            x = NaNBackward.apply(x)
        return super().forward(x)


class PoisonInputNet(BlockNet):
    def __init__(self, k: int, s: int) -> None:
        super().__init__()
        self.k, self.s = k, s
        self.blocks[k] = PoisonInputBlock(8)
        self.weights: dict[int, dict[str, Tensor]] = {}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.weights[self.trainer.global_step] = snapshot(self)
        self.blocks[self.k].poison = self.trainer.global_step == self.s  # type: ignore[union-attr]


def test_nan_made_at_the_input_side_of_block_k_names_block_k(tmp_path: Path) -> None:
    torch.manual_seed(0)
    k, s = 2, 3
    model = PoisonInputNet(k, s)
    callback = GradientFlowCallback(log_every_n_steps=1, blocks="blocks")
    fit(tmp_path, model, callback, steps=8)
    assert callback.halted and max(model.weights) == s
    [alert] = callback.alerts
    assert (alert.step, alert.action, alert.block) == (s, "halt", f"blocks.{k}")
    assert alert.where[0] == f"blocks.{k}" and f"blocks.{k}" in (callback.halt_reason or "")
    # Only the blocks below k saw the NaN; block k's own parameters did not.
    assert alert.blocks == [f"blocks.{i}" for i in range(k)]
    assert not any(p.startswith(f"blocks.{k}.") for p in alert.params)
    assert same_weights(snapshot(model), model.weights[s])


def test_locate_nonfinite_uses_the_chaining_of_blocks() -> None:
    blocks = ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    nan = float("nan")
    norms = [nan, nan, 1.0, 1.0]
    params = ["blocks.0.linear.weight", "blocks.1.linear.weight"]
    # Block 2 took block 1's output directly: the NaN between them came from block 2's backward.
    chained = [False, True, True, True]
    assert locate_nonfinite(blocks, params, norms, chained=chained).block == "blocks.2"
    # Something outside the blocks sat between them: block 1's output is where it showed up.
    chained = [False, True, False, True]
    assert locate_nonfinite(blocks, params, norms, chained=chained).block == "blocks.1"
    assert locate_nonfinite(blocks, params, norms).block == "blocks.1"
    # Block 2 got no gradient at all: its backward did not run, so it made nothing.
    unused = [nan, nan, None, 1.0]
    assert locate_nonfinite(blocks, params, unused, chained=[True] * 4).block == "blocks.1"


DDP_FAULT_STEP = 3


def ddp_skip_worker(out_dir: str) -> None:
    """One rank of a 2-process DDP run where an Inf reaches rank 1's gradients only at one step."""
    pl.seed_everything(0, verbose=False)
    model = FaultNet(n_samples=128, batch_size=8)
    callback = GradientFlowCallback(log_every_n_steps=50, rules=[Rule("nonfinite", action="skip")])
    callbacks = [RankFault(rank=1, step=DDP_FAULT_STEP), callback]
    trainer = ddp_trainer(out_dir, callbacks, max_steps=6)
    trainer.fit(model)
    record = {
        "global_step": trainer.global_step,
        "halted": callback.halted,
        "alerts": [(a.step, a.rule, a.action, a.rank, list(a.ranks)) for a in callback.alerts],
        "weights": model.weights,
        "final": snapshot(model),
    }
    torch.save(record, Path(out_dir) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_skip_when_one_rank_trips_skips_every_rank_and_training_goes_on(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=90,  # a rank left waiting in a collective would hang: fail instead
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    s = DDP_FAULT_STEP
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for record in ranks:
        assert record["global_step"] == 6 and not record["halted"]
        assert record["alerts"] == [(s, "nonfinite", "skip", 1, [1])]
        weights = record["weights"]
        assert same_weights(weights[s + 1], weights[s])  # the poisoned step changed nothing
        for step in (s - 1, s + 1):
            assert not same_weights(weights[step + 1], weights[step])  # the others trained
        assert all(torch.isfinite(w).all() for w in record["final"].values())
    assert same_weights(ranks[0]["final"], ranks[1]["final"])
    [line] = read_alerts(str(tmp_path / "csv" / "version_0" / "gradwatch_alerts.jsonl"))
    assert (line["step"], line["action"], line["rank"], line["ranks"]) == (s, "skip", 1, [1])


if __name__ == "__main__":  # the script's own directory is on sys.path: `faults` imports
    ddp_skip_worker(sys.argv[1])


@pytest.mark.parametrize(
    "metric", ["grad_norm_totl", "grad_stats/maximum", "grad_flow/mean", "loss", "grad_norm/"]
)
def test_rule_on_a_key_the_callback_never_logs_fails_at_construction(metric: str) -> None:
    with pytest.raises(ValueError, match=r"Rule `metric` .* is not a key the callback logs"):
        Rule(metric, max=1.0)


def test_rule_whose_pattern_matches_nothing_is_warned_about_once(tmp_path: Path) -> None:
    callback = GradientFlowCallback(
        log_every_n_steps=1, rules=[Rule("grad_gian/*", max=0.0), Rule("grad_gain/*", max=1e9)]
    )
    with pytest.warns(UserWarning, match=r"rule 'grad_gian/\*' .*cannot trip") as record:
        fit(tmp_path, FaultNet(), callback, steps=3)
    unmatched = [w for w in record if "cannot trip" in str(w.message)]
    assert len(unmatched) == 1  # once, not per step, and not for the rule that matches
    assert callback.alerts == []


@pytest.mark.parametrize("log_param_norms", [False, "*.bias"])
def test_rule_on_parameter_norms_that_are_not_logged_is_warned_about(
    tmp_path: Path, log_param_norms: Any
) -> None:
    weight = "blocks.1.linear.weight"
    rule = Rule(f"grad_param_norm/{weight}", max=0.0, action="warn")
    callback = GradientFlowCallback(
        log_every_n_steps=1, log_param_norms=log_param_norms, rules=[rule]
    )
    with pytest.warns(UserWarning, match=r"cannot trip\. .*`log_param_norms` selects"):
        fit(tmp_path, FaultNet(), callback, steps=2)
    assert callback.alerts == []
    # Logged, the same rule trips at every step and names the parameter.
    callback = GradientFlowCallback(log_every_n_steps=1, log_param_norms=weight, rules=[rule])
    fit(tmp_path / "logged", FaultNet(), callback, steps=2)
    assert [a.step for a in callback.alerts] == [0, 1]
    assert callback.alerts[0].params == [weight]
