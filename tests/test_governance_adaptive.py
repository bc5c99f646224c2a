"""Governance that rescues runs, in a real Trainer: adaptive clipping (window and EMA) against a
reference replayed by hand from the recorded gradients, rules on the loss (gradient accumulation, an
AMP GradScaler), the interval's max/mean of every-step figures against a reference callback, and a
run resumed from a mid-run checkpoint continuing every piece of governance state."""

from __future__ import annotations

import math
import statistics
from collections import deque
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from expected_warnings import NEW_CHECKPOINT_DIR, RULE_TRIPS, WIRING_REPORT
from faults import FaultNet, make_trainer, same_weights
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from reference import FLOAT32_SUM_REL, csv_metrics, ref_norm
from torch import Tensor
from torch_features import needs_exact_resume

from lightning_gradwatch import GradientFlowCallback, Rule

pytestmark = [RULE_TRIPS, WIRING_REPORT, NEW_CHECKPOINT_DIR]


def total_norm(grads: dict[str, Tensor]) -> float:
    return ref_norm(list(grads.values()), "l2")


def logged(tmp_path: Path) -> dict[int, dict[str, float]]:
    return csv_metrics(str(tmp_path / "csv" / "version_0"))


class LossNet(FaultNet):
    """``FaultNet`` that records each micro-batch's loss as ``training_step`` returns it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.losses: dict[int, list[float]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.setdefault(self.trainer.global_step, []).append(float(loss.detach()))
        return loss


# -- adaptive clip ---------------------------------------------------------------------------------


class WindowReference:
    """A rolling window of the last ``size`` accepted values (plain Python, population std)."""

    def __init__(self, size: int, warmup: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.warmup = warmup

    def bar(self, zscore: float) -> Optional[float]:
        if len(self.values) < self.warmup:
            return None
        mean = sum(self.values) / len(self.values)
        std = math.sqrt(sum((v - mean) ** 2 for v in self.values) / len(self.values))
        return mean + zscore * std

    def add(self, value: float) -> None:
        self.values.append(value)


class EmaReference:
    """ZClip's statistics: the first ``warmup`` values give mean and variance, then
    ``mean = a * mean + (1 - a) * g`` and ``var = a * var + (1 - a) * (g - mean)**2``."""

    def __init__(self, alpha: float, warmup: int) -> None:
        self.alpha, self.warmup = alpha, warmup
        self.first: list[float] = []
        self.mean = self.var = math.nan

    def bar(self, zscore: float) -> Optional[float]:
        if len(self.first) < self.warmup:
            return None
        return self.mean + zscore * math.sqrt(self.var)

    def add(self, value: float) -> None:
        if len(self.first) < self.warmup:
            self.first.append(value)
            if len(self.first) == self.warmup:
                self.mean = sum(self.first) / self.warmup
                self.var = sum((v - self.mean) ** 2 for v in self.first) / self.warmup
            return
        self.mean = self.alpha * self.mean + (1 - self.alpha) * value
        self.var = self.alpha * self.var + (1 - self.alpha) * (value - self.mean) ** 2


@pytest.mark.parametrize("kind", ["window", "ema"])
def test_adaptive_clip_matches_a_hand_replayed_reference(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    spike, steps, z = 14, 18, 3.0
    model = FaultNet(spike_step=spike, spike=50.0, lr=0.01)
    if kind == "window":
        rule = Rule("grad_norm_total", zscore=z, window=8, warmup=5, action="clip")
        reference: Any = WindowReference(8, 5)
    else:
        rule = Rule("grad_norm_total", zscore=z, ema=0.8, warmup=5, action="clip")
        reference = EmaReference(0.8, 5)
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[rule])
    make_trainer(tmp_path, [callback], max_steps=steps).fit(model)
    rows = logged(tmp_path)

    clipped_steps, bars, entered = [], {}, []
    for step in range(steps):
        pre = total_norm(model.grads_after_backward[step])
        seen = model.grads_at_step[step]
        bar = bars[step] = reference.bar(z)
        assert rows[step]["grad_norm_total"] == pytest.approx(pre, rel=1e-5)
        if bar is None:  # warm-up: nothing in force, nothing logged, nothing clipped
            assert "grad_norm_total_clip_threshold" not in rows[step]
        else:
            assert rows[step]["grad_norm_total_clip_threshold"] == pytest.approx(bar, rel=1e-5)
        if bar is not None and pre > bar:
            clipped_steps.append(step)
            assert total_norm(seen) == pytest.approx(bar, rel=1e-5)
            assert rows[step]["grad_norm_total_clipped"] == pytest.approx(bar, rel=1e-5)
            reference.add(bar)  # the clipped value enters, not the spike
            entered.append(bar)
        else:
            assert same_weights(seen, model.grads_after_backward[step])  # untouched
            reference.add(pre)
            entered.append(pre)
    assert spike in clipped_steps
    assert [(a.step, a.action) for a in callback.alerts] == [(s, "clip") for s in clipped_steps]
    assert callback.alerts[clipped_steps.index(spike)].clip_to == pytest.approx(
        bars[spike], rel=1e-5
    )
    saved = callback.state_dict()["governance"]["rules"]["grad_norm_total"]["windows"]
    if kind == "window":
        assert saved["grad_norm_total"] == pytest.approx(list(reference.values), rel=1e-5)
        assert max(saved["grad_norm_total"]) < total_norm(model.grads_after_backward[spike]) / 10
    else:
        state = saved["grad_norm_total"]
        assert state["count"] == steps
        assert state["mean"] == pytest.approx(reference.mean, rel=FLOAT32_SUM_REL)
        # Each norm x within r = FLOAT32_SUM_REL relatively moves the variance by at most
        # 2 * std * r * max(x) (Cauchy-Schwarz on the centred sum): absolute, not relative to a
        # variance that is small when the norms barely move.
        bound = 2 * FLOAT32_SUM_REL * math.sqrt(reference.var) * max(entered)
        assert state["var"] == pytest.approx(reference.var, rel=0.0, abs=bound)


# -- the loss as a metric ----------------------------------------------------------------------


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "grad-scaler"])
def test_loss_rule_reads_the_step_loss_over_micro_batches(scaled: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    spike, steps, accumulate = 9, 12, 2
    model = LossNet(spike_step=spike, spike=30.0, n_samples=16 * accumulate * steps)
    rules = [Rule("loss", zscore=6.0, window=16, warmup=4, action="skip", name="loss_spike")]
    callback = GradientFlowCallback(log_every_n_steps=3, rules=rules)
    plugins = []
    if scaled:  # the hook sees loss x 1024: the rule must not
        plugins = [
            MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2**10))
        ]
    trainer = make_trainer(
        tmp_path, [callback], max_steps=steps, accumulate_grad_batches=accumulate, plugins=plugins
    )
    trainer.fit(model)

    # The step's loss is the mean of its micro-batches' losses (Lightning divides each by 2).
    step_loss = {s: sum(v) / len(v) for s, v in model.losses.items()}
    assert all(len(model.losses[s]) == accumulate for s in range(steps))
    [alert] = callback.alerts
    assert (alert.step, alert.rule, alert.action, alert.metric) == (
        spike,
        "loss_spike",
        "skip",
        "loss",
    )
    assert alert.value == pytest.approx(step_loss[spike], rel=1e-5)
    assert same_weights(model.weights[spike + 1], model.weights[spike])  # the step was skipped
    rows = logged(tmp_path)
    for step in (0, 3, 6, 9):
        assert rows[step]["gradwatch/loss"] == pytest.approx(step_loss[step], rel=1e-5)
        interval = [step_loss[s] for s in range(max(step - 2, 0), step + 1)]
        assert rows[step]["gradwatch/loss_max"] == pytest.approx(max(interval), rel=1e-5)
        assert rows[step]["gradwatch/loss_mean"] == pytest.approx(
            sum(interval) / len(interval), rel=1e-5
        )
    assert "loss" not in {key for row in rows.values() for key in row}  # never the bare key
    # The window holds the accepted steps' losses and, for the spike, the bound in force then
    # (mean + 6 std of the window before it), not the spike itself.
    window = callback.state_dict()["governance"]["rules"]["loss_spike"]["windows"]["loss"]
    before = [step_loss[s] for s in range(spike)]
    bound = statistics.fmean(before) + 6.0 * statistics.pstdev(before)
    accepted = [*before, bound, *(step_loss[s] for s in range(spike + 1, steps))]
    assert window == pytest.approx(accepted, rel=1e-5)


def test_nonfinite_rule_trips_on_a_nonfinite_loss(tmp_path: Path) -> None:
    class InfLoss(FaultNet):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            loss = super().training_step(batch, batch_idx)
            # An infinite loss whose gradient is still finite: only the loss tells.
            return loss + (math.inf if self.trainer.global_step == 2 else 0.0)

    torch.manual_seed(0)
    model = InfLoss()
    callback = GradientFlowCallback(log_every_n_steps=50, rules=[Rule("nonfinite", action="skip")])
    make_trainer(tmp_path, [callback], max_steps=4).fit(model)
    assert all(math.isfinite(total_norm(g)) for g in model.grads_after_backward.values())
    [alert] = callback.alerts
    assert (alert.step, alert.action, alert.loss_nonfinite) == (2, "skip", True)
    assert "loss itself" in alert.message
    assert same_weights(model.weights[3], model.weights[2])


# -- nothing hidden between measured steps -------------------------------------------------------


class StepRecorder(pl.Callback):
    """Reference figures of every optimizer step: the loss as Lightning hands it to
    ``on_before_backward`` (summed over micro-batches) and the pre-clip total norm."""

    def __init__(self) -> None:
        self.loss: dict[int, float] = {}
        self.total: dict[int, float] = {}

    def on_before_backward(self, trainer: pl.Trainer, module: Any, loss: Tensor) -> None:
        step = trainer.global_step
        self.loss[step] = self.loss.get(step, 0.0) + float(loss.detach())

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: Any, optimizer: Any) -> None:
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        self.total[trainer.global_step] = total_norm(grads)


def test_interval_max_and_mean_show_what_happened_between_measured_steps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    every, steps, spike = 5, 14, 7
    model = FaultNet(spike_step=spike, spike=40.0)
    rules = [
        Rule("grad_norm_total", max=1e9, action="warn", name="never"),
        Rule("loss", max=1e9, action="warn", name="loss_bound"),
    ]
    recorder = StepRecorder()
    callback = GradientFlowCallback(log_every_n_steps=every, rules=rules)
    make_trainer(tmp_path, [recorder, callback], max_steps=steps).fit(model)
    rows = logged(tmp_path)
    assert sorted(rows) == [0, 5, 10]  # nothing is logged between measured steps
    for step, first in ((0, 0), (5, 1), (10, 6)):
        span = range(first, step + 1)
        for key, figures in (
            ("grad_norm_total", recorder.total),
            ("gradwatch/loss", recorder.loss),
        ):
            values = [figures[s] for s in span]
            assert rows[step][f"{key}_max"] == pytest.approx(max(values), rel=1e-5), (key, step)
            assert rows[step][f"{key}_mean"] == pytest.approx(sum(values) / len(values), rel=1e-5)
        # Counters on every measured step, 0 included, so their charts are continuous.
        assert rows[step]["grad_alerts/never"] == rows[step]["grad_alerts/loss_bound"] == 0.0
    # The spike at step 7 shows in the chart logged at step 10, though step 10 itself is calm.
    assert rows[10]["grad_norm_total_max"] == pytest.approx(recorder.total[spike], rel=1e-5)
    assert rows[10]["grad_norm_total"] < rows[10]["grad_norm_total_max"] / 2
    # Steps 11-13 wait for the next measured step, in the callback's state.
    interval = callback.state_dict()["governance"]["interval"]
    count, total, peak = interval["grad_norm_total"]
    # The callback's float32-accumulated norms against the float64 reference.
    want = [recorder.total[s] for s in (11, 12, 13)]
    assert count == 3 and total == pytest.approx(sum(want), rel=FLOAT32_SUM_REL)
    assert peak == pytest.approx(max(want), rel=FLOAT32_SUM_REL)


# -- resume ----------------------------------------------------------------------------------------


def resume_rules() -> list[Rule]:
    return [
        Rule("grad_norm_total", zscore=3.0, ema=0.7, warmup=3, action="clip", name="zclip"),
        Rule("grad_norm_total", zscore=3.0, window=6, warmup=3, action="clip", name="wclip"),
        Rule("loss", zscore=6.0, window=6, warmup=3, action="skip", name="loss_spike"),
        Rule("grad_norm/blocks.0", max=0.0, patience=4, name="always"),
    ]


def resume_fit(tmp_path: Path, ckpt_path: Optional[str] = None) -> tuple[Any, FaultNet, Any]:
    torch.manual_seed(0)
    model = FaultNet(spike_step=12, spike=30.0, lr=0.01)
    callback = GradientFlowCallback(log_every_n_steps=5, rules=resume_rules())
    every_8 = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=16,
        callbacks=[callback, every_8],
        logger=CSVLogger(str(tmp_path), name="csv", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1000,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return callback, model, trainer


@needs_exact_resume
def test_resume_from_a_mid_run_checkpoint_continues_every_piece_of_state(tmp_path: Path) -> None:
    # 4 batches an epoch: the checkpoint after 8 steps sits at an epoch boundary (the data order
    # is then the same after resuming), and mid-interval (measured: 0, 5, 10, 15).
    whole, whole_model, _ = resume_fit(tmp_path / "whole")
    [ckpt] = (tmp_path / "whole" / "ckpt").glob("*step=8*.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    [state] = [v for k, v in saved["callbacks"].items() if k.startswith("GradientFlowCallback")]
    interval = state["governance"]["interval"]
    assert interval["grad_norm_total"][0] == 2 and interval["gradwatch/loss"][0] == 2  # steps 6, 7

    resumed, resumed_model, trainer = resume_fit(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert trainer.global_step == 16
    # Windows, EMA, counters, patience and the open interval are those of the uninterrupted run.
    assert _same_state(resumed.state_dict(), whole.state_dict())
    after = [(a.step, a.rule, a.action, a.clip_to) for a in whole.alerts if a.step >= 8]
    assert [(a.step, a.rule, a.action, a.clip_to) for a in resumed.alerts] == after
    assert {"loss_spike", "zclip"} <= {rule for step, rule, *_ in after if step == 12}
    # Patience counted on across the resume: trips at 0 and 5 before it, 10 (3rd) and 15 (4th).
    always = [(a.step, a.action, a.consecutive) for a in resumed.alerts if a.rule == "always"]
    assert always == [(10, "none", 3), (15, "warn", 4)]
    # The interval logged at step 10 spans the resume (steps 6-10) and equals the whole run's.
    whole_rows, resumed_rows = logged(tmp_path / "whole"), logged(tmp_path / "resumed")
    for step in (10, 15):
        assert resumed_rows[step] == pytest.approx(whole_rows[step], rel=1e-9)
    assert same_weights(
        dict(resumed_model.named_parameters()), dict(whole_model.named_parameters())
    )


def _same_state(a: Any, b: Any) -> bool:
    """Nested equality of plain data, floats up to 1e-9 relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, nan_ok=True)
    return bool(a == b)
