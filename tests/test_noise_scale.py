"""The gradient noise scale: the unbiased two-batch-size estimator of McCandlish et al. (2018, A.1),
checked against gradients computed by hand (per rank under DDP over gloo on 2 processes, per
micro-batch with gradient accumulation), and against the analytic answer of a linear regression
whose per-sample gradient noise is known."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from dist_worker import ACCUMULATE as DDP_ACCUMULATE
from dist_worker import DEPTH, WIDTH
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from models import BlockNet
from parallel import global_batch_reference, run_worker
from reference import RefNet, csv_metrics, trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch_features import needs_model_parallel_strategy

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch.keys import (
    NOISE_B_SIMPLE_KEY,
    NOISE_BATCH_KEY,
    NOISE_GRAD_SQ_KEY,
    NOISE_TRACE_KEY,
)
from lightning_gradwatch.numerics.noise_scale import NOISE_EMA_DECAY, NoiseScaleEstimator
from lightning_gradwatch.report.reader import read_run
from lightning_gradwatch.report.summary import build_report

pytestmark = [RULE_TRIPS, WIRING_REPORT]

D, SIGMA2, MICRO, ACCUMULATE, STEPS = 8, 4.0, 128, 4, 60
#: Per-sample gradient of (x.w - y)^2 at w = w* + delta, x ~ N(0, I), y = x.w* + N(0, SIGMA2):
#: g = 2 r x, r = x.delta - noise, so G = 2 delta and tr(Sigma) = 4 ((D + 1)|delta|^2 + SIGMA2 D).
GRAD_SQ = 4.0  # |delta| = 1
TRACE = 4.0 * ((D + 1) + SIGMA2 * D)
B_SIMPLE = TRACE / GRAD_SQ  # 41 samples


def reference_ema(pairs: list[tuple[float, float, float, float]]) -> list[dict[str, float]]:
    """Paper formulas and a bias-corrected EMA, written out (shares nothing with the package)."""
    out, grad_ema, trace_ema, weight = [], 0.0, 0.0, 0.0
    for small, big, b_small, b_big in pairs:
        grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
        trace = (small - big) / (1 / b_small - 1 / b_big)
        grad_ema = NOISE_EMA_DECAY * grad_ema + (1 - NOISE_EMA_DECAY) * grad_sq
        trace_ema = NOISE_EMA_DECAY * trace_ema + (1 - NOISE_EMA_DECAY) * trace
        weight = NOISE_EMA_DECAY * weight + (1 - NOISE_EMA_DECAY)
        g, t = grad_ema / weight, trace_ema / weight
        out.append({NOISE_GRAD_SQ_KEY: g, NOISE_TRACE_KEY: t, NOISE_B_SIMPLE_KEY: t / g})
    return out


def sq_norm(grads: Any) -> float:
    return sum(g.double().pow(2).sum().item() for g in grads)


def assert_noise_equal(logged: dict[str, float], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-4), key


class NoisyRegression(pl.LightningModule):
    """``y = x.w* + noise`` fitted by a bias-free linear layer that never moves (lr 0), so every
    step samples the same gradient distribution."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(D, 1, bias=False)
        delta = torch.ones(D) / math.sqrt(D)
        w_star = self.linear.weight.detach()[0] - delta
        generator = torch.Generator().manual_seed(1)
        n = MICRO * ACCUMULATE * STEPS
        self.x = torch.randn(n, D, generator=generator)
        noise = torch.randn(n, generator=generator) * math.sqrt(SIGMA2)
        self.y = self.x @ w_star + noise

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.linear(x).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=MICRO)

    def micro_gradient(self, index: int) -> Tensor:
        """The gradient of micro-batch ``index``'s mean loss, in closed form."""
        x = self.x[index * MICRO : (index + 1) * MICRO].double()
        y = self.y[index * MICRO : (index + 1) * MICRO].double()
        w = self.linear.weight.detach()[0].double()
        return 2 * x.T @ (x @ w - y) / MICRO


def test_accumulation_matches_micro_batch_gradients_and_the_known_answer(tmp_path: Path) -> None:
    model = NoisyRegression()
    callbacks = [
        GradientFlowCallback(
            blocks=["linear"], log_every_n_steps=1, rules=[], noise_scale=True, norm_type=norm
        )
        for norm in ("l2", "l1")  # l1: |G_big|^2 is not the logged norm, the monitor's own pass
    ]
    trainer(tmp_path, callbacks, max_steps=STEPS, accumulate_grad_batches=ACCUMULATE).fit(model)
    pairs = []
    for step in range(STEPS):
        micro = [model.micro_gradient(step * ACCUMULATE + k) for k in range(ACCUMULATE)]
        small = sum(sq_norm([g]) for g in micro) / ACCUMULATE
        big = sq_norm([torch.stack(micro).mean(0)])
        pairs.append((small, big, MICRO, MICRO * ACCUMULATE))
    expected = reference_ema(pairs)
    logged = csv_metrics(str(tmp_path / "csv" / "version_0"))
    for step in range(STEPS):
        assert_noise_equal(logged[step], expected[step])
    for callback in callbacks:
        assert callback.last is not None
        assert_noise_equal(callback.last.metrics, expected[-1])
    # A resumed run goes on from the same averages.
    resumed = GradientFlowCallback(noise_scale=True)
    resumed.load_state_dict(callbacks[0].state_dict())
    assert resumed._extras.noise.estimator.b_simple == callbacks[0]._extras.noise.estimator.b_simple
    # The known answer, within the estimator's noise (std about 7% here, simulated).
    assert expected[-1][NOISE_B_SIMPLE_KEY] == pytest.approx(B_SIMPLE, rel=0.2)
    assert expected[-1][NOISE_GRAD_SQ_KEY] == pytest.approx(GRAD_SQ, rel=0.2)
    assert expected[-1][NOISE_TRACE_KEY] == pytest.approx(TRACE, rel=0.2)
    # A batch of 512 is about 12x the noise scale: the diagnosis says so, and the report on the
    # logs alone agrees.
    (finding,) = callbacks[0].findings
    assert finding.name == "batch_vs_noise_scale" and finding.confidence == "medium"
    assert finding.figures["batch_size"] == MICRO * ACCUMULATE
    assert finding.figures["ratio"] > 10 and "more steps" in finding.suggestions[0]
    report = build_report(read_run(tmp_path / "csv" / "version_0"))  # type: ignore[arg-type]
    assert report.diagnosis is not None
    (read,) = report.diagnosis.findings
    assert_same_finding(read.to_dict(), finding.to_dict())


#: A number as the findings print it.
NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?")


def assert_same_finding(read: dict[str, Any], live: dict[str, Any]) -> None:
    """The same finding, with figures that took different paths. Both callbacks log
    ``grad_noise/*`` at the same steps, so the logged row may hold the L1 callback's figures, from
    its own norm pass over the gradients (other float32 sums, relative error ~1e-6 amplified a few
    times by the estimator's differences): equal to ``rel=1e-4`` as in :func:`assert_noise_equal`,
    and the text equal but for numbers printed to 3 significant digits (one unit in the last
    printed digit is at most 1% relative)."""
    for key in ("name", "title", "confidence", "blocks"):
        assert read[key] == live[key], key
    assert read["figures"].keys() == live["figures"].keys()
    for key, value in live["figures"].items():
        assert read["figures"][key] == pytest.approx(value, rel=1e-4), key
    for key in ("evidence", "suggestions"):
        assert len(read[key]) == len(live[key]), key
        for text, want in zip(read[key], live[key]):
            assert NUMBER.split(text) == NUMBER.split(want), (text, want)
            numbers = [float(n) for n in NUMBER.findall(text)]
            assert numbers == pytest.approx([float(n) for n in NUMBER.findall(want)], rel=1e-2)


@pytest.mark.slow
def test_ddp_noise_scale_from_per_rank_gradients(tmp_path: Path) -> None:
    records = run_worker("gns", tmp_path)
    assert [r["user_hook_calls"] > 0 for r in records] == [True, True]  # the user's hook ran too
    pairs = []
    for step in (0, 2):
        model = RefNet(depth=DEPTH, width=WIDTH)
        locals_ = []
        for record in records:  # this rank's gradient: its own micro-batches only
            model.load_state_dict(record["weights"][step])
            model.zero_grad()
            x = torch.cat([x for x, _ in record["batches"][step]])
            y = torch.cat([y for _, y in record["batches"][step]])
            nn.functional.mse_loss(model(x), y).backward()
            locals_.append(sq_norm(p.grad for p in model.parameters()))
        _, global_grads = global_batch_reference(records, step)
        per_rank = len(records[0]["batches"][step]) * records[0]["batches"][step][0][0].shape[0]
        assert len(records[0]["batches"][step]) == DDP_ACCUMULATE
        pairs.append((sum(locals_) / 2, sq_norm(global_grads.values()), per_rank, 2 * per_rank))
    expected = reference_ema(pairs)
    for index, step in enumerate((0, 2)):
        for record in records:  # the same figures on both ranks
            assert_noise_equal(record["measured"]["l2"][step], expected[index])
    # Python-level collectives per step: the gradient all-reduce through the hooks (the model fits
    # one bucket), and on measured steps the measurement's all_gather plus one extra all_reduce.
    assert records[0]["collectives"] == {0: 3, 1: 1, 2: 3}


def test_noise_scale_needs_two_batch_sizes(tmp_path: Path) -> None:
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[], noise_scale=True)
    with pytest.warns(UserWarning, match="not measured with one process and no gradient"):
        trainer(tmp_path, [callback], max_steps=1).fit(BlockNet(depth=2))
    assert callback.last is not None
    assert not any(key.startswith("grad_noise/") for key in callback.last.metrics)


@needs_model_parallel_strategy
def test_sharded_strategies_say_not_measured() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_gradwatch.lightning.noise_monitor import NoiseScaleMonitor
    from lightning_gradwatch.measure.reduction import ReductionPlan

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    fit = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False)
    monitor = NoiseScaleMonitor(enabled=True)
    with pytest.warns(UserWarning, match="not measured under ModelParallelStrategy"):
        monitor.start(fit, BlockNet(), ReductionPlan())
    assert monitor.mode is None


def test_a_hook_registered_elsewhere_is_reported_not_crashed(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from lightning_gradwatch.lightning.noise_monitor import NoiseScaleMonitor

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = DistributedDataParallel(nn.Linear(2, 2))
        model.register_comm_hook(None, allreduce_hook)  # not through DDPStrategy(ddp_comm_hook=)
        monitor = NoiseScaleMonitor(enabled=True)
        with pytest.warns(UserWarning, match="a DDP communication hook is already registered"):
            assert not monitor._register(model)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_noise_scale_must_be_a_bool(value: Any) -> None:
    with pytest.raises(TypeError, match="`noise_scale` must be a bool"):
        GradientFlowCallback(noise_scale=value)


def test_estimator_formulas_and_arguments() -> None:
    estimator = NoiseScaleEstimator(decay=0.5)
    metrics = estimator.update(small_sq=2.0, big_sq=1.25, b_small=16, b_big=64)
    assert metrics == {
        NOISE_GRAD_SQ_KEY: 1.0,
        NOISE_TRACE_KEY: 16.0,
        NOISE_B_SIMPLE_KEY: 16.0,
        NOISE_BATCH_KEY: 64.0,
    }
    # Noise-dominated: the |G|^2 estimate is negative, so no b_simple is claimed.
    fresh = NoiseScaleEstimator()
    assert NOISE_B_SIMPLE_KEY not in fresh.update(2.0, 0.4, 16, 64)
    assert fresh.update(math.nan, 1.0, 16, 64) == {}
    with pytest.raises(ValueError, match="b_small < b_big"):
        fresh.update(1.0, 1.0, 64, 64)
    with pytest.raises(ValueError, match="`decay`"):
        NoiseScaleEstimator(decay=1.0)
