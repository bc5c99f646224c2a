"""Rerun attribution (``Rule(..., rerun=True)``) in one process: a batch with out-of-range targets
trips the rule again when rerun (``reproducible``, with the loss an independent forward gives); an
output corrupted in the first execution only does not (``transient``, naming the rank, and its
batch is not put on the skip list); the step's
gradients, the final weights and BatchNorm's running statistics are bit-identical with and without
``rerun=True``, whether the rule trips or not (Dropout draws the same masks); manual optimization
says the rerun is unavailable, and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from faults import EpochData, FaultNet, PoisonNet, fit_csv, same_weights
from models import BlockNet
from reference import ref_norm
from torch import Tensor, nn

from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.governance.skip_list import SKIP_LIST_FILENAME
from lightning_gradwatch.lightning.rerun import RTOL

pytestmark = [RULE_TRIPS, WIRING_REPORT]

BATCH = 8


def reference_loss(
    weights: dict[str, Tensor], batches: list[int], poison: set
) -> tuple[float, float]:
    """The loss (micro-batch losses averaged) and total gradient norm of a fresh model holding
    ``weights`` on the given batches of epoch 0, computed here with plain torch."""
    model = BlockNet(n_samples=64, batch_size=BATCH)  # PoisonNet's layers, without its faults
    model.load_state_dict(weights)
    data = EpochData(64, BATCH, poison)
    total = torch.zeros((), dtype=torch.float64)
    for b in batches:
        x = torch.stack([data[i][0] for i in range(b * BATCH, (b + 1) * BATCH)])
        y = torch.stack([data[i][1] for i in range(b * BATCH, (b + 1) * BATCH)])
        loss = nn.functional.mse_loss(model(x), y) / len(batches)
        loss.backward()
        total += loss.detach().double()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(total), ref_norm(grads, "l2")


def watch(rule: Rule, every: int = 4) -> GradientFlowCallback:
    return GradientFlowCallback(log_every_n_steps=every, rules=[rule])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_out_of_range_batch_is_reproducible(tmp_path: Path, accumulate: int) -> None:
    torch.manual_seed(0)
    micro = list(range(3 * accumulate, 4 * accumulate))  # the micro-batches of step 3
    bad = micro[-1]
    model = PoisonNet(poison=((0, bad),), n_samples=64, batch_size=BATCH)
    callback = watch(Rule("loss", max=50.0, action="skip", rerun=True))
    fit_csv(tmp_path, model, [callback], max_steps=5, accumulate_grad_batches=accumulate)

    (alert,) = callback.alerts
    assert alert.step == 3 and alert.rerun is not None
    assert alert.rerun["verdict"] == "reproducible" and alert.rerun["ranks"] == []
    loss, norm = reference_loss(model.weights[3], micro, {(0, bad)})
    first, again = alert.rerun["first"], alert.rerun["rerun"]
    assert first["loss"] == [pytest.approx(loss, rel=1e-6)]
    assert again["loss"] == [pytest.approx(loss, rel=1e-6)]
    # One process: the total parameter-gradient norm of both executions is compared too.
    assert first["param_norm"] == [pytest.approx(norm, rel=1e-5)]
    assert again["param_norm"] == [pytest.approx(norm, rel=1e-5)]
    assert alert.rerun["tolerance"] == RTOL
    assert "rerun: reproducible" in alert.message
    assert same_weights(model.weights[4], model.weights[3])  # the skip still applied


def test_a_fault_in_the_first_execution_only_is_transient(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PoisonNet(corrupt=((3, 0),), n_samples=64, batch_size=BATCH)
    callback = watch(Rule("loss", max=50.0, action="skip", rerun=True))
    fit_csv(tmp_path, model, [callback], max_steps=5)

    (alert,) = callback.alerts
    assert alert.step == 3 and alert.rerun is not None
    assert alert.rerun["verdict"] == "transient" and alert.rerun["ranks"] == [0]
    clean, _ = reference_loss(model.weights[3], [3], set())
    assert alert.rerun["rerun"]["loss"] == [pytest.approx(clean, rel=1e-6)]
    assert alert.rerun["first"]["loss"][0] > 1000 * clean  # the corrupted output's loss
    assert "rerun: transient on rank 0" in alert.message
    # The data is not to blame: the skip still applied, but the batch is not listed for replay.
    assert same_weights(model.weights[4], model.weights[3])
    assert alert.skip_list is None and "not added to the skip list" in alert.message
    assert not list(tmp_path.rglob(SKIP_LIST_FILENAME))


class NormBlock(nn.Module):
    """Linear -> BatchNorm -> Dropout -> tanh: running statistics and random masks."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.drop(self.norm(self.linear(x))))


class NoisyNet(FaultNet):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.blocks = nn.ModuleList(NormBlock(8) for _ in range(3))


def noisy_run(tmp_path: Path, rerun: bool, trips: bool) -> tuple[NoisyNet, GradientFlowCallback]:
    torch.manual_seed(0)
    model = NoisyNet(n_samples=64, batch_size=BATCH)
    bound = 0.0 if trips else 1e9  # trips at every step, or never
    callback = watch(Rule("grad_norm_total", max=bound, action="warn", rerun=rerun), every=2)
    fit_csv(tmp_path / f"{rerun}-{trips}", model, [callback], max_steps=6)
    return model, callback


@pytest.mark.parametrize("trips", [False, True])
def test_gradients_weights_and_buffers_are_the_same_with_and_without_rerun(
    tmp_path: Path, trips: bool
) -> None:
    plain, _ = noisy_run(tmp_path, rerun=False, trips=trips)
    rerun, callback = noisy_run(tmp_path, rerun=True, trips=trips)
    assert len(callback.alerts) == (6 if trips else 0)
    for step in range(6):
        assert same_weights(plain.grads_at_step[step], rerun.grads_at_step[step]), step
    state, other = plain.state_dict(), rerun.state_dict()
    assert state.keys() == other.keys()
    assert all(torch.equal(state[key], other[key]) for key in state)
    assert not torch.equal(state["blocks.0.norm.running_mean"], torch.zeros(8))  # they did move
    for alert in callback.alerts:  # Dropout's masks and BatchNorm's batch statistics came back
        assert alert.rerun is not None and alert.rerun["verdict"] == "reproducible", alert.message


class Manual(PoisonNet):
    def __init__(self) -> None:
        super().__init__(n_samples=32, batch_size=BATCH)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        optimizer.zero_grad()  # type: ignore[union-attr]
        loss = nn.functional.mse_loss(self(batch[0]), batch[1])
        self.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]
        return loss


def test_manual_optimization_says_the_rerun_is_unavailable(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Manual()
    callback = watch(Rule("loss", max=0.0, action="warn", rerun=True))
    fit_csv(tmp_path, model, [callback], max_steps=2)
    assert len(callback.alerts) == 2
    for alert in callback.alerts:
        assert alert.rerun is not None and alert.rerun["verdict"] == "unavailable"
        assert "manual optimization" in alert.rerun["reason"]
        assert "rerun: unavailable (manual optimization" in alert.message
        assert alert.rerun["rerun"]["loss"] == [None]
