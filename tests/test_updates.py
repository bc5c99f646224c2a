"""``log_updates=True``: what each measured ``optimizer.step()`` did, against an independent reference
that copies the parameters before the step and reads them after it (``update_reference.py``; the
tolerance, 1e-5 relative, and why, are in its docstring).

Covered: SGD, SGD with momentum and AdamW on an MLP and a small transformer; Lightning's gradient
clipping; gradient accumulation (one figure per optimizer step); a skip rule and an AMP GradScaler
skipping a step (both log 0); two optimizers in manual optimization; the eps fraction against a
hand-built Adam state; bit-identical weights; no work on unmeasured steps; hooks removed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from diag_models import TransformerNet
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from faults import FaultNet
from lightning.pytorch.plugins import MixedPrecision
from models import BlockNet
from reference import assert_metrics_equal, csv_metrics, trainer
from torch import Tensor, nn
from update_reference import REL, UpdateRecording, adam_state, ref_update_metrics

import lightning_gradwatch.lightning.updates as updates_module
from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.measure.updates import adam_state as measured_state
from lightning_gradwatch.measure.updates import measure_update, take_snapshot

pytestmark = [RULE_TRIPS, WIRING_REPORT]

BLOCKS4 = [f"blocks.{i}" for i in range(4)]
UPDATE_HEADS = ("update_ratio", "weight_norm", "update_norm_total", "optim/")


def make_optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05)
    if kind == "momentum":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)


class MLP(UpdateRecording, BlockNet):
    def __init__(self, optimizer: str = "sgd", **kwargs: Any) -> None:
        torch.manual_seed(0)
        super().__init__(**kwargs)
        self.kind = optimizer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.kind, self.parameters())


class Transformer(UpdateRecording, TransformerNet):
    def __init__(self, optimizer: str = "sgd") -> None:
        super().__init__(depth=2, norm_first=True)
        self.kind = optimizer

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.kind, self.parameters())


def logged_updates(log_dir: str) -> dict[int, dict[str, float]]:
    """The update keys of every logged step."""
    rows = csv_metrics(log_dir)
    out = {
        step: {k: v for k, v in row.items() if k.startswith(UPDATE_HEADS)}
        for step, row in rows.items()
    }
    return {step: row for step, row in out.items() if row}


def fit(
    tmp_path: Path, model: pl.LightningModule, steps: int, **kwargs: Any
) -> tuple[Any, pl.Trainer]:
    options = {"log_every_n_steps": 1, "log_updates": True, "rules": []}
    options.update(kwargs.pop("callback", {}))
    callback = GradientFlowCallback(**options)
    run = trainer(tmp_path, [callback], max_steps=steps, **kwargs)
    run.fit(model)
    return callback, run


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adamw"])
@pytest.mark.parametrize("net", ["mlp", "transformer"])
def test_update_figures_equal_the_reference(tmp_path: Path, net: str, optimizer: str) -> None:
    model = MLP(optimizer) if net == "mlp" else Transformer(optimizer)
    blocks = BLOCKS4 if net == "mlp" else ["blocks.0", "blocks.1"]
    callback, run = fit(tmp_path, model, steps=3)
    logged = logged_updates(run.logger.log_dir)
    assert sorted(logged) == [0, 1, 2]
    for step in range(3):
        expected = model.expected_updates(step, blocks)
        assert_metrics_equal(logged[step], expected, rel=REL)
        assert logged[step]["update_ratio_total"] > 0
    # Adam-style state only for AdamW; plain SGD moves exactly against the gradient.
    assert ("optim/eps_fraction" in logged[0]) == (optimizer == "adamw")
    if optimizer == "sgd":
        assert logged[2]["optim/update_grad_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert callback.last_updates.metrics == pytest.approx(logged[2], rel=1e-12)
    assert callback.last.metrics["update_ratio_total"] == logged[2]["update_ratio_total"]


def test_only_measured_steps_do_update_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = updates_module.take_snapshot

    def counted(params: Any, step: int) -> Any:
        calls.append(step)
        return real(params, step)

    monkeypatch.setattr(updates_module, "take_snapshot", counted)
    model = MLP("adamw")
    callback, run = fit(tmp_path, model, steps=7, callback={"log_every_n_steps": 3})
    assert calls == [0, 3, 6]  # no copy on the other steps
    logged = logged_updates(run.logger.log_dir)
    assert sorted(logged) == [0, 3, 6]
    for step in (0, 3, 6):
        assert_metrics_equal(logged[step], model.expected_updates(step, BLOCKS4), rel=REL)
    assert callback._extras.updates._pending == {}
    optimizer = run.optimizers[0]
    assert len(optimizer._optimizer_step_post_hooks) == 0  # removed at teardown


def test_clipped_gradients_are_what_the_update_used(tmp_path: Path) -> None:
    model = MLP("sgd")
    _, run = fit(tmp_path, model, steps=2, gradient_clip_val=1e-3)
    logged = logged_updates(run.logger.log_dir)
    for step in range(2):
        assert_metrics_equal(logged[step], model.expected_updates(step, BLOCKS4), rel=REL)
        # SGD: update = -lr * the gradient after clipping (norm about the clip value), up to the
        # rounding of each float32 weight (spacing ~3e-8 here) against element updates of ~1e-6.
        grads = [g.double() for g in model.update_refs[step]["grads"].values()]
        clipped = math.sqrt(sum(float(g.square().sum()) for g in grads))
        assert 0.99e-3 < clipped <= 1e-3
        assert logged[step]["update_norm_total"] == pytest.approx(0.05 * clipped, rel=1e-3)
        assert logged[step]["optim/update_grad_cosine"] == pytest.approx(1.0, abs=1e-3)


def test_accumulation_gives_one_figure_per_optimizer_step(tmp_path: Path) -> None:
    model = MLP("momentum")
    _, run = fit(tmp_path, model, steps=3, accumulate_grad_batches=2)
    rows = csv_metrics(run.logger.log_dir)
    logged = logged_updates(run.logger.log_dir)
    assert sorted(logged) == [0, 1, 2] and sorted(model.update_refs) == [0, 1, 2]
    for step in range(3):
        assert_metrics_equal(logged[step], model.expected_updates(step, BLOCKS4), rel=REL)
        assert "grad_norm_total" in rows[step]


def test_a_skipped_step_logs_zero(tmp_path: Path) -> None:
    model = MLP("adamw")
    skip = Rule("grad_norm_total", max=0.0, action="skip")
    _, run = fit(tmp_path, model, steps=2, callback={"rules": [skip]})
    logged = logged_updates(run.logger.log_dir)
    for step in range(2):
        ref = model.update_refs[step]
        assert all(torch.equal(ref["before"][n], ref["after"][n]) for n in ref["before"])
        assert logged[step]["update_ratio_total"] == 0.0
        assert logged[step]["update_norm_total"] == 0.0
        assert logged[step]["optim/update_grad_cosine"] == 0.0
        assert all(logged[step][f"update_ratio/{b}"] == 0.0 for b in BLOCKS4)
        assert logged[step]["weight_norm_total"] > 0


class AmpNet(UpdateRecording, FaultNet):
    pass


def test_amp_scaler_skipping_a_step_logs_zero(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AmpNet(poison_steps=(2,))  # a NaN gradient at step 2: the scaler skips that step
    scaler = torch.amp.GradScaler("cpu", init_scale=2**10)
    _, run = fit(
        tmp_path, model, steps=4, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    )
    logged = logged_updates(run.logger.log_dir)
    assert sorted(logged) == [0, 1, 2, 3]
    skipped = model.update_refs[2]
    assert all(torch.equal(skipped["before"][n], skipped["after"][n]) for n in skipped["before"])
    assert logged[2]["update_ratio_total"] == 0.0 and logged[2]["update_norm_total"] == 0.0
    for step in (0, 1, 3):
        assert_metrics_equal(logged[step], model.expected_updates(step, BLOCKS4), rel=REL)
        assert logged[step]["update_ratio_total"] > 0


def test_an_overflowing_scale_skips_and_logs_zero(tmp_path: Path) -> None:
    model = MLP("sgd")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # fp16 gradients overflow at once
    _, run = fit(
        tmp_path, model, steps=2, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]
    )
    logged = logged_updates(run.logger.log_dir)
    for step in (0, 1):
        ref = model.update_refs[step]
        assert all(torch.equal(ref["before"][n], ref["after"][n]) for n in ref["before"])
        assert logged[step]["update_ratio_total"] == 0.0


class TwoOptimizers(pl.LightningModule):
    """Manual optimization: AdamW on ``gen``, SGD with momentum on ``disc``, one step each per
    batch; the reference copies each optimizer's parameters around its own ``step()``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Linear(8, 2))
        self.disc = nn.Sequential(nn.Sequential(nn.Linear(2, 8), nn.Tanh()), nn.Linear(8, 1))
        self.refs: dict[int, dict[str, Any]] = {}

    def _step(self, optimizer: Any, module: nn.Module, prefix: str, loss: Tensor) -> None:
        optimizer.zero_grad()
        self.manual_backward(loss)
        named = {f"{prefix}.{n}": p for n, p in module.named_parameters()}
        step = self.trainer.global_step
        before = {n: p.detach().clone() for n, p in named.items()}
        optimizer.step()
        self.refs[step] = {
            "before": before,
            "after": {n: p.detach().clone() for n, p in named.items()},
            "grads": {n: p.grad.detach().clone() for n, p in named.items()},
            "state": adam_state(optimizer, named),
        }

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        gen_opt, disc_opt = self.optimizers()  # type: ignore[misc]
        fake = self.gen(x)
        self._step(disc_opt, self.disc, "disc", self.disc(fake.detach()).square().mean())
        self._step(gen_opt, self.gen, "gen", (self.disc(self.gen(x)) - 1).square().mean())

    def configure_optimizers(self) -> Any:
        return [
            torch.optim.AdamW(self.gen.parameters(), lr=1e-2),
            torch.optim.SGD(self.disc.parameters(), lr=0.05, momentum=0.9),
        ]

    def train_dataloader(self) -> Any:
        x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)


def test_two_optimizers_each_measured_over_what_it_updates(tmp_path: Path) -> None:
    model = TwoOptimizers()
    blocks = {"gen": ["gen.0", "gen.1"], "disc": ["disc.0", "disc.1"]}
    callback = {"blocks": blocks["gen"] + blocks["disc"]}
    _, run = fit(tmp_path, model, steps=4, callback=callback)
    logged = logged_updates(run.logger.log_dir)
    assert sorted(logged) == [0, 1, 2, 3]
    for step in range(4):
        side, name = ("disc", "SGD") if step % 2 == 0 else ("gen", "AdamW")
        ref = model.refs[step]
        expected = ref_update_metrics(
            ref["before"],
            ref["after"],
            ref["grads"],
            blocks[side],
            state=ref["state"],
            optimizer=name,
        )
        assert_metrics_equal(logged[step], expected, rel=REL)
    assert "optim/eps_fraction/AdamW" in logged[1] and "optim/eps_fraction/SGD" not in logged[0]


def test_eps_fraction_and_moment_norm_from_a_hand_built_state() -> None:
    weight = nn.Parameter(torch.ones(4, 5))
    for amsgrad in (False, True):
        optimizer = torch.optim.Adam([weight], eps=1e-3, betas=(0.9, 0.99), amsgrad=amsgrad)
        t = 7.0
        bound = 1e-3**2 * (1 - 0.99**t)  # v below this: sqrt(v_hat) < eps
        factors = torch.tensor([0.25, 0.5, 0.99, 1.01, 2.0, 4.0, 0.0, 10.0, 0.9, 3.0] * 2).reshape(
            4, 5
        )
        v = factors * bound
        m = torch.arange(20.0).reshape(4, 5) / 10
        state = {"step": torch.tensor(t), "exp_avg": m, "exp_avg_sq": v if not amsgrad else v * 100}
        if amsgrad:
            state["max_exp_avg_sq"] = v  # what AMSGrad's denominator uses
        optimizer.state[weight] = state
        snapshot = take_snapshot([weight], step=0)
        update = measure_update(
            snapshot, stepped=True, state=measured_state(optimizer, [weight]), blocks=[]
        )
        assert update.eps_fraction == (factors < 1).sum().item() / 20  # 10 of the 20 elements
        assert update.eps_fraction == 0.5
        assert update.moment_norm == pytest.approx(float(m.double().norm()), rel=1e-7)
        assert update.update_ratio == 0.0 and update.cosine == 0.0  # nothing moved


def test_weights_are_bit_identical_with_and_without(tmp_path: Path) -> None:
    weights = []
    for log_updates in (False, True):
        model = MLP("adamw")
        fit(tmp_path / str(log_updates), model, steps=4, callback={"log_updates": log_updates})
        weights.append({n: p.detach().clone() for n, p in model.named_parameters()})
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


class Raising(MLP):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.trainer.global_step == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_hooks_are_removed_when_training_raises(tmp_path: Path) -> None:
    model = Raising("adamw")
    callback = GradientFlowCallback(log_every_n_steps=1, log_updates=True, rules=[])
    run = trainer(tmp_path, [callback], max_steps=4)
    with pytest.raises(RuntimeError, match="boom"):
        run.fit(model)
    assert len(run.optimizers[0]._optimizer_step_post_hooks) == 0
    assert callback._extras.updates._pending == {}


def test_optimizer_without_adam_state_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO"):
        _, run = fit(tmp_path, MLP("sgd"), steps=3)
    said = [r for r in caplog.records if "keeps no Adam-style state" in r.getMessage()]
    assert len(said) == 1
    assert not any(
        k.startswith(("optim/eps", "optim/moment")) for k in csv_metrics(run.logger.log_dir)[2]
    )


def test_log_updates_is_validated() -> None:
    with pytest.raises(TypeError, match="log_updates"):
        GradientFlowCallback(log_updates=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="log_updates=True"):
        GradientFlowCallback(rules=[Rule("update_ratio_total", max=1.0)])
    assert math.isfinite(GradientFlowCallback(log_updates=True).log_every_n_steps)
