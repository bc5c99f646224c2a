"""Curvature (``log_curvature=True``): the figures against the exact Hessian of a small model, the
sharpness ratios against their formulas, and do-no-harm (bit-identical runs, dropout and BatchNorm
included, and ``self.log`` not counting the re-run)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from curvature_models import SharpeningNet, TanhNet, exact_hessian, hutchinson_stderr
from expected_warnings import RULE_TRIPS
from reference import csv_metrics, trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.diagnosis.checks import edge_of_stability
from lightning_gradwatch.diagnosis.findings import summarize
from lightning_gradwatch.diagnosis.run_history import RunHistory
from lightning_gradwatch.numerics.curvature import stability_constant, top_eigenpair
from lightning_gradwatch.report.cli import main

EVERY, PROBES = 2, 10


def _fit(tmp_path: Any, module: pl.LightningModule, steps: int = 6, **kwargs: Any) -> dict:
    callback = GradientFlowCallback(
        log_curvature=True,
        curvature_every_n_steps=EVERY,
        curvature_probes=PROBES,
        log_every_n_steps=EVERY,
        **kwargs,
    )
    run = trainer(tmp_path, [callback], max_steps=steps)
    run.fit(module)
    return csv_metrics(run.logger.log_dir)


def test_eigenvalue_and_trace_match_the_exact_hessian(tmp_path: Any) -> None:
    module = TanhNet(lambda p: torch.optim.SGD(p, lr=0.1))
    rows = _fit(tmp_path, module)
    steps = [s for s in range(6) if s % EVERY == 0]
    for step in steps:
        hessian, _, _ = exact_hessian(module, step)
        eigs = torch.linalg.eigvalsh(hessian)
        row = rows[step]
        assert row["curvature/hessian_max_eig"] == pytest.approx(float(eigs[-1]), rel=0.01)
        error = abs(row["curvature/hessian_trace"] - float(torch.trace(hessian)))
        assert error <= 3 * hutchinson_stderr(hessian, PROBES)
        assert row["curvature/sharpness_ratio"] == pytest.approx(
            float(eigs[-1]) * 0.1 / 2, rel=0.01
        )
        assert row["curvature/sharpness_threshold"] == pytest.approx(2 / 0.1)
        assert module.calls[step] == 2  # the curvature step's batch was re-run once
    assert all(module.calls[s] == 1 for s in range(6) if s % EVERY)  # nothing on other steps
    assert all("curvature/hessian_max_eig" not in rows.get(s, {}) for s in range(6) if s % EVERY)


@pytest.mark.parametrize(
    ("make", "constant"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), 3.8),
        (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True), 3.8 / 2.8),
    ],
    ids=["momentum", "nesterov"],
)
def test_sgd_momentum_ratio_follows_the_formula(tmp_path: Any, make: Any, constant: float) -> None:
    module = TanhNet(make)
    rows = _fit(tmp_path, module, steps=3)
    top = float(torch.linalg.eigvalsh(exact_hessian(module, 2)[0])[-1])
    assert rows[2]["curvature/sharpness_ratio"] == pytest.approx(top * 0.05 / constant, rel=0.01)


def test_adamw_ratio_is_the_preconditioned_sharpness_over_38_per_lr(tmp_path: Any) -> None:
    lr, betas, eps = 0.01, (0.9, 0.99), 1e-8
    module = TanhNet(lambda p: torch.optim.AdamW(p, lr=lr, betas=betas, eps=eps))
    rows = _fit(tmp_path, module, steps=5)
    for step in (2, 4):
        hessian, names, _ = exact_hessian(module, step)
        state = module.states[step]
        t = float(state[names[0]]["step"])
        v_hat = torch.cat([state[n]["exp_avg_sq"].reshape(-1) for n in names]).double()
        d = (v_hat / (1 - betas[1] ** t)).sqrt() + eps  # P = diag(sqrt(v_hat) + eps) / lr
        s = d.rsqrt()
        top = float(torch.linalg.eigvalsh(s[:, None] * hessian * s[None, :])[-1])
        threshold = (2 + 2 * betas[0]) / (1 - betas[0]) / lr
        row = rows[step]
        assert row["curvature/preconditioned_max_eig"] == pytest.approx(top, rel=0.01)
        assert row["curvature/sharpness_threshold"] == pytest.approx(threshold)
        assert row["curvature/sharpness_ratio"] == pytest.approx(top / threshold, rel=0.01)
    assert "curvature/sharpness_ratio" not in rows[0]  # no v yet at the first step
    assert "curvature/hessian_max_eig" in rows[0]


class DropoutBatchNormNet(pl.LightningModule):
    """Dropout and BatchNorm, logging an epoch mean from training_step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 1)
        )
        gen = torch.Generator().manual_seed(1)
        self.data = TensorDataset(
            torch.randn(48, 6, generator=gen), torch.randn(48, 1, generator=gen)
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        self.log("epoch_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8, shuffle=True)


def _final_state(tmp_path: Any, curvature: bool) -> tuple[dict[str, Tensor], dict]:
    pl.seed_everything(3)
    module = DropoutBatchNormNet()
    callback = GradientFlowCallback(log_curvature=curvature, curvature_every_n_steps=2)
    run = trainer(tmp_path, [callback], max_steps=12)
    run.fit(module)
    return module.state_dict(), csv_metrics(run.logger.log_dir)


def test_final_weights_and_buffers_are_bit_identical(tmp_path: Any) -> None:
    with_it, rows_with = _final_state(tmp_path / "on", True)
    without, rows_without = _final_state(tmp_path / "off", False)
    assert any("curvature/hessian_max_eig" in row for row in rows_with.values())
    assert with_it.keys() == without.keys()
    for key in without:
        assert torch.equal(with_it[key], without[key]), key
    # self.log in the re-run is a no-op: the epoch means are those of the run without curvature.
    means_with = {s: r["epoch_loss"] for s, r in rows_with.items() if "epoch_loss" in r}
    means_without = {s: r["epoch_loss"] for s, r in rows_without.items() if "epoch_loss" in r}
    assert means_with == means_without and means_with


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"log_curvature": 1}, TypeError, "log_curvature"),
        ({"curvature_every_n_steps": 0}, ValueError, "curvature_every_n_steps"),
        ({"curvature_iterations": 0}, ValueError, "curvature_iterations"),
        ({"curvature_iterations": 2.5}, TypeError, "curvature_iterations"),
        ({"curvature_probes": -1}, ValueError, "curvature_probes"),
    ],
)
def test_invalid_arguments_raise_naming_them(kwargs: dict, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        GradientFlowCallback(**kwargs)


def test_power_iteration_finds_the_top_eigenvalue_when_a_negative_one_dominates() -> None:
    q, _ = torch.linalg.qr(
        torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    )
    eigs = torch.tensor([-5.0, 3.0, 1.0, 0.5, -1.0, 0.1], dtype=torch.float64)
    matrix = q @ torch.diag(eigs) @ q.T
    start = [torch.ones(6, dtype=torch.float64) / math.sqrt(6)]
    top, vector, _, shift = top_eigenpair(lambda v: [matrix @ v[0]], start, 200)
    assert top == pytest.approx(3.0, rel=1e-3) and shift == pytest.approx(-5.0, rel=1e-3)
    # Warm: from that vector with the remembered shift, at once.
    again, _, used, _ = top_eigenpair(lambda v: [matrix @ v[0]], vector, 200, shift)
    assert again == pytest.approx(3.0, rel=1e-3) and used < 10


@pytest.mark.parametrize(
    ("beta", "nesterov"), [(0.0, False), (0.9, False), (0.5, False), (0.9, True)]
)
def test_sgd_threshold_is_where_the_quadratic_recurrence_turns_unstable(
    beta: float, nesterov: bool
) -> None:
    """Run PyTorch's own SGD on f(x) = lam x^2 / 2 just below and just above lr * lam = c."""
    c = stability_constant("sgd", beta, 0.0, nesterov)
    assert c is not None

    def final(ratio: float) -> float:
        x = torch.ones(1, requires_grad=True)
        opt = torch.optim.SGD([x], lr=1.0, momentum=beta, nesterov=nesterov)
        for _ in range(400):
            opt.zero_grad()
            (0.5 * c * ratio * x**2).sum().backward()
            opt.step()
        return float(x.detach().abs())

    below, above = final(0.97), final(1.03)
    assert below < 1.0 and not above < 1.0  # a diverged run may reach inf or nan


@pytest.mark.slow
def test_ddp_figures_are_those_of_the_global_batch(tmp_path: Any) -> None:
    """Two ranks on different data: the figures equal one process's on the concatenated batch."""
    from curvature_worker import EVERY as DDP_EVERY
    from curvature_worker import PROBES as DDP_PROBES
    from curvature_worker import STEPS, RankDataNet
    from parallel import run_worker

    rank0, rank1 = run_worker(
        "ddp", tmp_path, script=Path(__file__).with_name("curvature_worker.py")
    )
    rows = csv_metrics(str(tmp_path / "csv" / "version_0"))
    for name, value in rank0["final"].items():  # DDP kept the replicas in step
        assert torch.equal(value, rank1["final"][name]), name
    reference = RankDataNet(lambda p: torch.optim.SGD(p, lr=0.1))
    for step in range(0, STEPS, DDP_EVERY):
        (x0, y0), weights = rank0["seen"][step]
        (x1, y1), _ = rank1["seen"][step]
        assert not torch.equal(x0, x1)  # the ranks saw different samples
        reference.seen[step] = ([torch.cat([x0, x1]), torch.cat([y0, y1])], weights)
        hessian, _, _ = exact_hessian(reference, step)
        top = float(torch.linalg.eigvalsh(hessian)[-1])
        row = rows[step]
        assert row["curvature/hessian_max_eig"] == pytest.approx(top, rel=0.01)
        error = abs(row["curvature/hessian_trace"] - float(torch.trace(hessian)))
        assert error <= 3 * hutchinson_stderr(hessian, DDP_PROBES)
        assert rank0["calls"][step] == rank1["calls"][step] == 2


@RULE_TRIPS
def test_progressive_sharpening_trips_the_rule_before_the_loss_oscillates(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Full-batch GD: the sharpness ratio rises to 1 (2/lr) and stays near it; a warn rule at 0.8 on
    it trips before the loss first goes up."""
    module = SharpeningNet()
    rule = Rule("curvature/sharpness_ratio", max=0.8, action="warn")
    callback = GradientFlowCallback(
        log_curvature=True,
        curvature_every_n_steps=10,
        log_every_n_steps=10,
        curvature_probes=2,
        rules=[rule],
    )
    run = trainer(tmp_path, [callback], max_steps=350, max_epochs=-1)
    run.fit(module)
    rows = csv_metrics(run.logger.log_dir)
    ratio = {
        s: r["curvature/sharpness_ratio"]
        for s, r in rows.items()
        if "curvature/sharpness_ratio" in r
    }
    assert sorted(ratio) == list(range(0, 350, 10))
    assert ratio[0] < 0.3  # far from the edge at first
    late = [ratio[s] for s in ratio if 230 <= s <= 310]
    assert min(late) > 0.9 and max(late) < 1.4  # at the edge, and held there
    losses = [module.losses[s] for s in range(350)]
    first_rise = next(s for s in range(1, 350) if losses[s] > losses[s - 1])
    trips = [a.step for a in callback.alerts if a.metric == "curvature/sharpness_ratio"]
    assert trips and trips[0] < first_rise
    assert ratio[trips[0]] > 0.8 and all(ratio[s] <= 0.8 for s in ratio if s < trips[0])
    # The diagnosis names it, in the run and from the logs alone (`gradwatch report`).
    (edge,) = [f for f in callback.findings if f.name == "edge_of_stability"]
    recent = [ratio[s] for s in sorted(ratio)[-5:]]
    assert edge.figures["max_ratio"] == pytest.approx(max(recent))
    assert any("lower the learning rate" in line for line in edge.suggestions)
    assert main(["report", run.logger.log_dir, "--format", "json"]) == 0
    (logged,) = json.loads(capsys.readouterr().out)["runs"]
    names = [f["name"] for f in logged["diagnosis"]["findings"]]
    assert "edge_of_stability" in names


def test_edge_of_stability_needs_most_recent_ratios_at_the_edge() -> None:
    def history(ratios: list[float]) -> RunHistory:
        h = RunHistory(["a"])
        for i, r in enumerate(ratios):
            h.add(10 * i, [1.0], total_norm=1.0, sharpness_ratio=r)
        return h

    assert _edge(history([0.5, 0.95, 0.97, 1.0])) is not None
    assert _edge(history([0.95, 0.97, 1.0, 0.5, 0.6, 0.7, 0.95])) is None  # not the recent ones
    assert _edge(history([0.2, 0.3, 0.4])) is None


def _edge(history: RunHistory) -> Any:
    return edge_of_stability(history, summarize(history))


def test_tensorboard_layout_shows_sharpness_against_its_threshold() -> None:
    import re

    from lightning_gradwatch.report.pictures import CURVATURE_CATEGORY, custom_scalars_layout

    assert CURVATURE_CATEGORY not in custom_scalars_layout(["a", "b"])
    charts = custom_scalars_layout(["a", "b"], curvature=True)[CURVATURE_CATEGORY]
    tags = {title: chart[1] for title, chart in charts.items()}
    (sharpness,) = [t for title, t in tags.items() if "threshold" in title]
    (ratio,) = [t for title, t in tags.items() if "ratio" in title]
    for key in ("curvature/hessian_max_eig", "curvature/sharpness_threshold"):
        assert any(re.match(pattern, key) for pattern in sharpness)
        assert any(re.match(pattern, key + "/Adam") for pattern in sharpness)
    assert any(re.match(p, "curvature/sharpness_ratio") for p in ratio)
    assert not any(re.match(p, "curvature/sharpness_ratio_x") for p in ratio)


def test_a_curvature_rule_without_curvature_says_why_it_cannot_trip(tmp_path: Any) -> None:
    rule = Rule("curvature/sharpness_ratio", max=0.8, action="warn")
    callback = GradientFlowCallback(rules=[rule])
    with pytest.warns(
        UserWarning, match="cannot trip. Curvature keys are logged with log_curvature"
    ):
        trainer(tmp_path, [callback], max_steps=1).fit(
            TanhNet(lambda p: torch.optim.SGD(p, lr=0.1))
        )


class ManualNet(TanhNet):
    def __init__(self) -> None:
        super().__init__(lambda p: torch.optim.SGD(p, lr=0.1))
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        opt.zero_grad()  # type: ignore[union-attr]
        loss = nn.functional.mse_loss(self(batch[0]), batch[1])
        self.manual_backward(loss)
        opt.step()  # type: ignore[union-attr]
        return loss


def test_manual_optimization_warns_once_and_keeps_every_other_figure(tmp_path: Any) -> None:
    net = ManualNet()
    with pytest.warns(
        UserWarning, match="curvature is not measured under manual optimization"
    ) as caught:
        rows = _fit(tmp_path, net, steps=5)
    assert sum("curvature is not measured" in str(w.message) for w in caught) == 1
    assert all(not any(k.startswith("curvature/") for k in row) for row in rows.values())
    assert all("grad_norm_total" in rows[s] for s in (0, 2, 4))  # every other figure kept
