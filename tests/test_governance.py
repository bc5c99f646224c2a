"""Governance in a real Trainer with fault injection: halt and skip on a NaN made in block k's
backward, clipping by norm and by value as the optimizer sees it, z-score spike detection without
false alarms, AMP, resume, manual optimization and the first-step wiring report."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from faults import FaultNet, NaNBackward, fit_csv, fit_steps, make_trainer, same_weights, snapshot
from lightning.pytorch.plugins import MixedPrecision
from models import Block, BlockNet
from reference import csv_metrics, hooks_of
from torch import Tensor

from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.governance.trail import read_alerts
from lightning_gradwatch.numerics.norms import Category

pytestmark = [RULE_TRIPS, WIRING_REPORT]


def csv_rows(tmp_path: Path) -> list[dict[str, str]]:
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def csv_column(tmp_path: Path, key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in csv_rows(tmp_path) if r.get(key)}


def ref_total_norm(grads: dict[str, Tensor]) -> float:
    return float(torch.cat([g.double().reshape(-1) for g in grads.values()]).norm())


# -- NaN in block k's backward -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("placement", "log_every"),
    [("inside", 1), ("inside", 50), ("output", 1), ("output", 50)],
    ids=["inside-measured", "inside-unmeasured", "output-measured", "output-unmeasured"],
)
def test_halt_on_nan_in_block_backward(placement: str, log_every: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    k, s = 2, 3
    model = FaultNet(poison_block=k, poison_steps=(s,), placement=placement)
    callback = GradientFlowCallback(log_every_n_steps=log_every)  # default: halt on non-finite
    trainer = make_trainer(tmp_path, [callback], max_steps=10)
    trainer.fit(model)  # returns normally

    assert callback.halted and callback.halt_reason and "blocks.2" in callback.halt_reason
    assert max(model.weights) == s  # no step after the halted one
    assert same_weights(dict(model.named_parameters()), model.weights[s])  # update skipped
    assert not same_weights(model.weights[s], model.weights[0])  # it did train before
    [alert] = callback.alerts
    assert (alert.step, alert.action, alert.rule, alert.block) == (
        s,
        "halt",
        "nonfinite",
        "blocks.2",
    )
    # The NaN reaches every parameter from block k back to the stem, none after it.
    bad = {n for n, g in model.grads_after_backward[s].items() if not torch.isfinite(g).all()}
    assert set(alert.params) == bad and "blocks.2.linear.weight" in bad
    assert not any(n.startswith(("blocks.3", "head")) for n in bad)
    assert alert.loss_nonfinite is False
    if log_every == 1:  # block-output gradients were measured too
        # Forward order; "output" poisons block k's own output gradient, "inside" the one below.
        assert alert.blocks == [f"blocks.{i}" for i in range(k + (placement == "output"))]
    # The checkpoint holds the weights before the bad update.
    assert alert.checkpoint is not None and Path(alert.checkpoint).exists()
    state = torch.load(alert.checkpoint, weights_only=False)["state_dict"]
    assert same_weights(state, model.weights[s])
    # The audit trail has the same record.
    [record] = read_alerts(str(tmp_path / "csv" / "version_0" / "gradwatch_alerts.jsonl"))
    assert record["step"] == s and record["block"] == "blocks.2" and record["action"] == "halt"
    assert record["checkpoint"] == alert.checkpoint and record["ranks"] == [0]
    # The counter is logged at every measured step (0 until the trip) and at the trip itself.
    counters = csv_column(tmp_path, "grad_alerts/nonfinite")
    assert counters == {step: 0.0 for step in range(0, s, log_every)} | {s: 1.0}


def test_halt_checkpoint_resumes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FaultNet(poison_steps=(2,))
    callback = GradientFlowCallback(log_every_n_steps=50)
    make_trainer(tmp_path, [callback], max_steps=10).fit(model)
    assert callback.halted and callback.alerts[0].checkpoint
    # After fixing the cause, training resumes from the saved weights and goes on.
    fixed = FaultNet()
    again = GradientFlowCallback(log_every_n_steps=50)
    trainer = make_trainer(tmp_path / "resumed", [again], max_steps=5)
    trainer.fit(fixed, ckpt_path=callback.alerts[0].checkpoint)
    assert same_weights(fixed.weights[2], model.weights[2]) and not again.halted
    assert trainer.global_step == 5


def test_skip_on_nan_keeps_weights_and_training_goes_on(tmp_path: Path) -> None:
    torch.manual_seed(0)
    s = 3
    model = FaultNet(poison_steps=(s,), optimizer="adam", lr=0.01)
    callback = GradientFlowCallback(log_every_n_steps=50, rules=[Rule("nonfinite", action="skip")])
    trainer = make_trainer(tmp_path, [callback], max_steps=8)
    trainer.fit(model)
    assert not callback.halted and trainer.global_step == 8
    assert same_weights(model.weights[s + 1], model.weights[s])  # the poisoned step changed nothing
    for step in (s - 1, s + 1, s + 2):  # the others train
        assert not same_weights(model.weights[step + 1], model.weights[step])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [(a.step, a.action, a.block) for a in callback.alerts] == [(s, "skip", "blocks.2")]
    # Adam's state did not see the poisoned step (a zero gradient would still have moved it).
    state = trainer.optimizers[0].state[next(model.parameters())]
    assert int(state["step"]) == 7


# -- clipping ------------------------------------------------------------------------------------


def test_clip_by_norm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FaultNet()
    rule = Rule("grad_norm_total", max=0.05, action="clip", clip_to=0.02)
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[rule])
    make_trainer(tmp_path, [callback], max_steps=4).fit(model)
    logged = csv_column(tmp_path, "grad_norm_total")
    clipped = csv_column(tmp_path, "grad_norm_total_clipped")
    for step in range(4):
        before = model.grads_after_backward[step]
        seen = model.grads_at_step[step]
        pre = ref_total_norm(before)
        assert pre > 0.05
        assert logged[step] == pytest.approx(pre, rel=1e-5)  # the logged total is pre-clip
        coef = 0.02 / (pre + 1e-6)  # clip_grad_norm_'s coefficient
        for name in before:
            torch.testing.assert_close(seen[name], before[name] * coef, rtol=1e-5, atol=1e-8)
        assert ref_total_norm(seen) == pytest.approx(0.02, rel=1e-4)
        assert clipped[step] == pytest.approx(0.02, rel=1e-4)
    assert [a.action for a in callback.alerts] == ["clip"] * 4
    assert csv_column(tmp_path, "grad_alerts/grad_norm_total") == {0: 1, 1: 2, 2: 3, 3: 4}


def test_clip_by_value(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FaultNet()
    rule = Rule("grad_norm_total", max=0.0, action="clip", clip_to=1e-3, clip_mode="value")
    callback = GradientFlowCallback(log_every_n_steps=100, rules=[rule])
    make_trainer(tmp_path, [callback], max_steps=3).fit(model)
    clipped = csv_column(tmp_path, "grad_norm_total_clipped")
    for step in range(3):
        before, seen = model.grads_after_backward[step], model.grads_at_step[step]
        assert max(float(g.abs().max()) for g in before.values()) > 1e-3
        for name in before:
            torch.testing.assert_close(seen[name], before[name].clamp(-1e-3, 1e-3))
        assert clipped[step] == pytest.approx(ref_total_norm(seen), rel=1e-5)
    assert [a.value for a in callback.alerts] == [
        pytest.approx(ref_total_norm(model.grads_after_backward[s]), rel=1e-5) for s in range(3)
    ]


def test_clip_is_refused_for_non_finite_gradients(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FaultNet(poison_steps=(1,))
    rules = [Rule("grad_norm_total", max=1e-9, action="clip", clip_to=1.0, name="clip")]
    callback = GradientFlowCallback(log_every_n_steps=100, rules=rules)
    make_trainer(tmp_path, [callback], max_steps=2).fit(model)
    # A NaN total would have made every gradient NaN under clip_grad_norm_; it is recorded instead.
    assert [(a.step, a.action) for a in callback.alerts] == [(0, "clip"), (1, "none")]
    seen, before = model.grads_at_step[1], model.grads_after_backward[1]
    assert all(torch.equal(seen[n], before[n]) for n in before if torch.isfinite(before[n]).all())


# -- z-score -------------------------------------------------------------------------------------


def test_zscore_trips_on_a_spike_and_not_on_500_steady_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spike = 450
    model = FaultNet(spike_step=spike, spike=50.0, poison_block=0, depth=2, width=4, lr=0.01)
    model.record = False
    rule = Rule("grad_norm_total", zscore=6.0, window=100, action="skip", name="spike")
    callback = GradientFlowCallback(log_every_n_steps=10_000, rules=[rule])
    weights: dict[int, dict[str, Tensor]] = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, module: Any, *args: Any) -> None:
            if trainer.global_step in (spike, spike + 1):
                weights[trainer.global_step] = {
                    n: p.detach().clone() for n, p in module.named_parameters()
                }

    make_trainer(tmp_path, [callback, Watch()], max_steps=501).fit(model)
    assert [(a.step, a.action, a.rule) for a in callback.alerts] == [(spike, "skip", "spike")]
    assert callback.alerts[0].zscore is not None and callback.alerts[0].zscore > 6.0
    assert same_weights(weights[spike], weights[spike + 1])
    # The window holds the last 100 accepted values: the spike stayed out of it.
    window = callback.state_dict()["governance"]["rules"]["spike"]["windows"]["grad_norm_total"]
    assert len(window) == 100 and max(window) < callback.alerts[0].value / 10


# -- audit trail, counters, warnings ------------------------------------------------------------


def test_warn_patience_counters_and_rate_limited_warnings(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FaultNet()
    rules = [
        Rule("grad_gain/*", min=1e9, patience=3, action="warn", name="gain"),
        Rule("grad_norm/blocks.3", max=1e9, action="warn"),  # never trips
    ]
    path = tmp_path / "audit" / "trail.jsonl"
    callback = GradientFlowCallback(log_every_n_steps=2, rules=rules, alerts_path=str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [callback], max_steps=20).fit(model)
    # Block rules run on measured steps only (0, 2, ..., 18); patience 3 -> acts from the 3rd trip.
    steps = list(range(0, 20, 2))
    assert [a.step for a in callback.alerts] == steps
    assert [a.action for a in callback.alerts] == ["none", "none"] + ["warn"] * 8
    assert [a.consecutive for a in callback.alerts] == list(range(1, 11))
    first = callback.alerts[0]
    assert first.blocks == ["blocks.1", "blocks.2", "blocks.3"] and first.condition == "min"
    assert set(first.keys) == {"grad_gain/blocks.1", "grad_gain/blocks.2", "grad_gain/blocks.3"}
    assert first.value == min(first.keys.values()) and first.threshold == 1e9
    records = read_alerts(str(path))
    assert [r["step"] for r in records] == steps and all(r["rule"] == "gain" for r in records)
    assert csv_column(tmp_path, "grad_alerts/gain") == {s: i + 1.0 for i, s in enumerate(steps)}
    # Warned at trips 1, 2, 4 and 8 only.
    shown = [w for w in caught if "rule 'gain' tripped" in str(w.message)]
    assert len(shown) == 4


def test_alerts_default_to_the_logger_dir_or_default_root_dir(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rules = [Rule("grad_norm_total", max=0.0, action="warn")]
    callback = GradientFlowCallback(log_every_n_steps=5, rules=rules)
    make_trainer(tmp_path, [callback], max_steps=2).fit(FaultNet())
    assert len(read_alerts(str(tmp_path / "csv" / "version_0" / "gradwatch_alerts.jsonl"))) == 2
    callback = GradientFlowCallback(log_every_n_steps=5, rules=rules, require_logger=False)
    root = tmp_path / "root"
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=3,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(root),
    )
    trainer.fit(FaultNet())
    assert len(read_alerts(str(root / "gradwatch_alerts.jsonl"))) == 3


def test_no_rules_means_no_governance(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FaultNet(poison_steps=(1,))
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[])
    trainer = make_trainer(tmp_path, [callback], max_steps=3)
    trainer.fit(model)
    assert not callback.halted and callback.alerts == [] and trainer.global_step == 3
    assert not (tmp_path / "csv" / "version_0" / "gradwatch_alerts.jsonl").exists()


# -- AMP -----------------------------------------------------------------------------------------


def _amp_trainer(tmp_path: Path, callback: GradientFlowCallback, max_steps: int) -> pl.Trainer:
    scaler = torch.amp.GradScaler("cpu", init_scale=2**10)
    return make_trainer(
        tmp_path,
        [callback],
        max_steps=max_steps,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )


def test_amp_non_finite_step_is_the_scalers_job(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FaultNet(poison_steps=(2,))
    callback = GradientFlowCallback(log_every_n_steps=50)  # default: nonfinite -> halt
    trainer = _amp_trainer(tmp_path, callback, max_steps=6)
    trainer.fit(model)
    assert not callback.halted and trainer.global_step == 6
    assert [(a.step, a.action, a.block) for a in callback.alerts] == [(2, "none", "blocks.2")]
    assert "GradScaler" in callback.alerts[0].message
    assert same_weights(model.weights[3], model.weights[2])  # the scaler skipped it


def test_amp_repeated_non_finite_steps_halt_after_patience(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FaultNet(poison_steps=(2, 3, 4, 5))
    callback = GradientFlowCallback(
        log_every_n_steps=50, rules=[Rule("nonfinite", action="halt", patience=3)]
    )
    _amp_trainer(tmp_path, callback, max_steps=10).fit(model)
    assert callback.halted
    assert [(a.step, a.action) for a in callback.alerts] == [(2, "none"), (3, "none"), (4, "halt")]
    assert max(model.weights) == 4


# -- resume --------------------------------------------------------------------------------------


def test_resume_continues_windows_counters_and_patience(tmp_path: Path) -> None:
    rules = [
        Rule("grad_norm_total", zscore=1e6, window=50, name="z"),
        Rule("grad_norm/blocks.0", min=1e9, patience=4, name="tiny"),
    ]
    torch.manual_seed(0)
    first = GradientFlowCallback(log_every_n_steps=1, rules=rules)
    trainer = make_trainer(tmp_path, [first], max_steps=3)
    trainer.fit(FaultNet())
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = first.state_dict()["governance"]
    assert (
        saved["rules"]["tiny"]["consecutive"] == 3
        and len(saved["rules"]["z"]["windows"]["grad_norm_total"]) == 3
    )

    second = GradientFlowCallback(log_every_n_steps=1, rules=rules)
    trainer = make_trainer(tmp_path / "b", [second], max_steps=5)
    trainer.fit(FaultNet(), ckpt_path=str(ckpt))
    state = second.state_dict()["governance"]["rules"]
    window = state["z"]["windows"]["grad_norm_total"]
    assert window[:3] == saved["rules"]["z"]["windows"]["grad_norm_total"] and len(window) == 5
    assert state["tiny"]["count"] == 5
    # Patience went on counting across the resume: the 4th consecutive trip (step 3) acts.
    assert [(a.step, a.action) for a in second.alerts] == [(3, "warn"), (4, "warn")]


def test_a_checkpoint_written_before_the_single_optimizer_path_still_resumes(
    tmp_path: Path,
) -> None:
    """Version 1 of the callback's state (before one optimizer became a list of one) had no
    ``version`` and held ``measured_step``: it loads, the governance state carries on, and the
    measuring grid follows the restored global step."""
    rules = [Rule("grad_norm/blocks.0", min=1e9, patience=4, name="tiny")]
    torch.manual_seed(0)
    first = GradientFlowCallback(log_every_n_steps=2, rules=rules)
    trainer = make_trainer(tmp_path, [first], max_steps=3)
    trainer.fit(FaultNet())
    ckpt = tmp_path / "v1.ckpt"
    trainer.save_checkpoint(ckpt)
    checkpoint = torch.load(ckpt, weights_only=False)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("GradientFlowCallback")]
    state = checkpoint["callbacks"][key]
    assert state.pop("version") == 2
    state["measured_step"] = 2  # the version-1 layout
    torch.save(checkpoint, ckpt)

    second = GradientFlowCallback(log_every_n_steps=2, rules=rules)
    trainer = make_trainer(tmp_path / "b", [second], max_steps=6)
    trainer.fit(FaultNet(), ckpt_path=str(ckpt))
    # Measured steps 0 and 2 tripped before; the resumed run measures 4 (not 3): the 3rd trip.
    assert [a.step for a in second.alerts] == [4]
    assert second.state_dict()["governance"]["rules"]["tiny"]["count"] == 3
    assert second.state_dict()["version"] == 2


# -- diagnosis -----------------------------------------------------------------------------------


class WiringNet(BlockNet):
    """An unused parameter (grad None), a dead one (grad exactly 0) and a block that kills the
    gradient behind it (vanishing)."""

    def __init__(self) -> None:
        super().__init__(depth=4)
        self.unused = torch.nn.Parameter(torch.ones(3))
        self.dead = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(h * 0.0 if i == 3 else h)
        return self.head(h) + 0.0 * self.dead


def test_first_step_report(tmp_path: Path) -> None:
    torch.manual_seed(0)
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[])
    with pytest.warns(UserWarning, match="not connected to the loss"):
        make_trainer(tmp_path, [callback], max_steps=2).fit(WiringNet())
    report = callback.first_step_report
    assert report is not None and report.step == 0
    assert report.no_grad == ["unused"]
    assert "dead" in report.zero_grad and "unused" not in report.zero_grad
    # Everything before block 3 gets a zero gradient (stem and blocks 0-2), and block 3's weight
    # sees a zero input.
    assert set(report.zero_grad) == {
        "dead",
        "stem.weight",
        "stem.bias",
        "blocks.3.linear.weight",
    } | {f"blocks.{i}.linear.{p}" for i in range(3) for p in ("weight", "bias")}
    categories = callback.last.categories if callback.last else []
    expected = [f"blocks.{i + 1}" for i, c in enumerate(categories) if c == Category.VANISHING]
    assert report.vanishing == expected and "blocks.2" in expected


class ManualNet(BlockNet):
    def __init__(self, zero_grad: bool) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.zero_grad_each_step = zero_grad

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        opt.step()
        if self.zero_grad_each_step:
            opt.zero_grad()


@pytest.mark.parametrize("zero_grad", [False, True])
def test_manual_optimization_missing_zero_grad(zero_grad: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    callback = GradientFlowCallback(log_every_n_steps=50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [callback], max_steps=4).fit(ManualNet(zero_grad))
    missing = [w for w in caught if "zero_grad()" in str(w.message)]
    assert len(missing) == (0 if zero_grad else 1)


def test_check_every_n_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    rules = [
        Rule("grad_norm_total", max=0.0, action="warn", name="total"),
        Rule("grad_flow/mean_gain", max=0.0, action="warn", name="gain"),
    ]
    callback = GradientFlowCallback(log_every_n_steps=4, check_every_n_steps=3, rules=rules)
    make_trainer(tmp_path, [callback], max_steps=10).fit(FaultNet())
    # grad_norm_total: every 3rd step, and on measured steps (0, 4, 8) where it comes for free;
    # block metrics: measured steps only.
    total = [a.step for a in callback.alerts if a.rule == "total"]
    assert total == [0, 3, 4, 6, 8, 9]
    assert [a.step for a in callback.alerts if a.rule == "gain"] == [0, 4, 8]


def test_documented_example_rules_work_together(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spike = 24
    model = FaultNet(spike_step=spike, spike=1000.0)
    rules = [
        Rule("grad_norm_total", max=5.0, action="clip", clip_to=1.0),
        Rule("grad_gain/*", max=2.0, patience=3, action="warn"),  # wildcard over blocks
        Rule("grad_norm_total", zscore=6.0, window=200, action="skip"),  # adaptive spike detection
        Rule("nonfinite", action="halt"),
    ]
    callback = GradientFlowCallback(log_every_n_steps=4, rules=rules)  # no name= needed
    assert callback.rules == rules
    trainer = fit_csv(tmp_path, model, [callback], max_steps=spike + 3, log_every_n_steps=1000)

    assert not callback.halted
    at_spike = [a for a in callback.alerts if a.step == spike]
    assert {(a.rule, a.action) for a in at_spike} == {
        ("grad_norm_total", "clip"),
        ("grad_norm_total#2", "skip"),
    }
    assert not [a for a in callback.alerts if a.metric == "grad_norm_total" and a.step != spike]
    # Skip beats clip: the spiked step changed no weight, training went on afterwards.
    assert same_weights(model.weights[spike + 1], model.weights[spike])
    assert not same_weights(model.weights[spike + 2], model.weights[spike + 1])
    spiked = model.grads_after_backward[spike]
    value = float(torch.cat([g.reshape(-1) for g in spiked.values()]).norm())
    for alert in at_spike:
        assert alert.value == pytest.approx(value, rel=1e-5)
    # One counter per rule, each under its own name.
    logged = csv_metrics(str(trainer.logger.log_dir))  # type: ignore[union-attr]
    labels = ["grad_norm_total", "grad_gain/*", "grad_norm_total#2", "nonfinite"]
    counters = {k: v for k, v in logged[spike].items() if k.startswith("grad_alerts/")}
    assert set(counters) == {f"grad_alerts/{label}" for label in labels}
    assert counters["grad_alerts/grad_norm_total"] == counters["grad_alerts/grad_norm_total#2"] == 1
    assert set(callback.state_dict()["governance"]["rules"]) == set(labels)


def test_default_rules_halt_on_nan_with_a_pathlib_alerts_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    s = 3
    model = FaultNet(poison_block=2, poison_steps=(s,))
    trail = tmp_path / "audit" / "trail.jsonl"
    callback = GradientFlowCallback(log_every_n_steps=2, alerts_path=trail)  # rules=None
    assert callback.rules == [Rule("nonfinite", action="halt")]
    with pytest.raises(TypeError, match=r"`alerts_path` must be a path .*got int: 3"):
        GradientFlowCallback(alerts_path=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`alerts_path` must be a non-empty path"):
        GradientFlowCallback(alerts_path="")
    trainer = fit_csv(tmp_path, model, [callback], max_steps=10)

    assert callback.halted is True and "blocks.2" in (callback.halt_reason or "")
    assert trainer.should_stop and max(model.weights) == s
    assert same_weights(snapshot(model), model.weights[s])  # the last good weights
    assert hooks_of(model) == 1  # only FaultNet's own poisoning hook: ours are gone
    [record] = read_alerts(str(trail))
    assert (record["step"], record["action"], record["block"]) == (s, "halt", "blocks.2")
    assert "blocks.2" in record["where"]
    checkpoint = Path(record["checkpoint"])
    assert checkpoint.parent == trail.parent and checkpoint.exists()
    restored = FaultNet.load_from_checkpoint(str(checkpoint))
    assert same_weights(snapshot(restored), model.weights[s])


class _ClipValueSeen(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seen.append(trainer.gradient_clip_val)


def test_skip_with_trainer_value_clipping(tmp_path: Path) -> None:
    # torch's clip_grad_value_ raises when no parameter has a gradient: a skipped step must not
    # hand Lightning's value clipping an empty list, and clipping must work again afterwards.
    torch.manual_seed(0)
    s, clip = 2, 0.01
    model = FaultNet(poison_block=1, poison_steps=(s,))
    seen = _ClipValueSeen()
    callback = GradientFlowCallback(log_every_n_steps=3, rules=[Rule("nonfinite", action="skip")])
    trainer = fit_csv(
        tmp_path,
        model,
        [callback, seen],
        max_steps=5,
        gradient_clip_val=clip,
        gradient_clip_algorithm="value",
    )
    assert [(a.step, a.action) for a in callback.alerts] == [(s, "skip")]
    assert same_weights(model.weights[s + 1], model.weights[s])
    assert trainer.gradient_clip_val == clip and seen.seen == [clip] * 5
    # After the skip the optimizer sees clamped gradients again: w' = w - lr * clamp(g).
    step = s + 1
    grads: dict[str, Tensor] = model.grads_at_step[step]
    for name, before in model.weights[step].items():
        expected = before - model.lr * grads[name].clamp(-clip, clip)
        assert torch.allclose(model.weights[step + 1][name], expected, atol=1e-7)
    assert any(g.abs().max() > clip for g in grads.values())  # the clamp did bind
    assert all(math.isfinite(float(w.sum())) for w in snapshot(model).values())


def test_halt_checkpoint_opens_with_plain_torch_load_and_holds_adam_before_the_update(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    s = 3
    model = FaultNet(poison_block=1, poison_steps=(s,), optimizer="adam", lr=0.01)
    callback = GradientFlowCallback(log_every_n_steps=50)  # rules=None: halt on non-finite
    trainer = fit_steps(tmp_path, model, callback, steps=10)

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
    fit_steps(tmp_path, FaultNet(poison_steps=(4,)), callback, steps=10)
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
    fit_steps(tmp_path, model, callback, steps=3)
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
    fit_steps(tmp_path, model, callback, steps=8)
    assert callback.halted and max(model.weights) == s
    [alert] = callback.alerts
    assert (alert.step, alert.action, alert.block) == (s, "halt", f"blocks.{k}")
    assert alert.where[0] == f"blocks.{k}" and f"blocks.{k}" in (callback.halt_reason or "")
    # Only the blocks below k saw the NaN; block k's own parameters did not.
    assert alert.blocks == [f"blocks.{i}" for i in range(k)]
    assert not any(p.startswith(f"blocks.{k}.") for p in alert.params)
    assert same_weights(snapshot(model), model.weights[s])
