"""Float64 runs (``precision="64-true"``) and models mixing float32 and float64: every figure is
accumulated in float64 where a gradient is float64 (never narrower than the gradient), on every
path: block tensor hooks, batched parameter norms, gradient statistics, the every-step governance
norm, the gradient noise scale and the plain-PyTorch ``GradientGainMonitor``.

Tolerances: a float64 reduction over ``n`` elements in another order differs by at most about
``n * 2**-53`` relatively; the models here have a few hundred elements per figure, so ``REL64 =
1e-12`` is loose for float64 and about 10,000 times tighter than what a float32 accumulation gives
(~1e-8 on these gradients, checked by ``test_float32_accumulation_would_fail_these_tolerances``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from models import BlockNet, unwrap
from reference import csv_metrics, ref_grad_stats, ref_norm, trainer
from torch import Tensor, nn

from lightning_gradwatch import GradientFlowCallback, GradientGainMonitor, Rule
from lightning_gradwatch.governance.notices import holds_stale_gradients
from lightning_gradwatch.keys import NOISE_GRAD_SQ_KEY, NOISE_TRACE_KEY
from lightning_gradwatch.numerics.grad_stats import finalize_grad_stats, grad_stat_partials
from lightning_gradwatch.numerics.norms import (
    accumulation_dtype,
    finalize_norm,
    foreach_partial_norms,
    partial_norm,
)

pytestmark = [RULE_TRIPS, WIRING_REPORT]

#: Relative tolerance of float64 figures against a float64 reference (see the module docstring).
REL64 = 1e-12
ACCUMULATE, MAX_STEPS, LOG_EVERY = 2, 3, 2
NORM_TYPES = ("l2", "l1", "linf", "mean")


def float64_grads() -> list[Tensor]:
    """Gradients whose digits beyond float32's matter: float32 rounds each element by up to
    ``2**-24`` relatively, and ``1 + 1e-12`` (``> 1``: "large") to ``1.0`` (not large)."""
    generator = torch.Generator().manual_seed(0)
    grads = [
        torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((7, 5), (300,))
    ]
    return [*grads, torch.tensor([1.0 + 1e-12], dtype=torch.float64)]


# --------------------------------------------------------------------------------------------------
# Unit: the numerics
# --------------------------------------------------------------------------------------------------


def test_accumulation_dtype_is_never_narrower_than_the_gradient() -> None:
    assert accumulation_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert accumulation_dtype(dtype) == torch.float32
    assert accumulation_dtype(torch.float32, torch.float64, torch.bfloat16) == torch.float64
    assert accumulation_dtype() == torch.float32  # nothing to measure: the default


def test_partial_norm_of_a_float64_gradient_is_float64() -> None:
    # Before the fix: RuntimeError "... should be convertible without narrowing" (vector_norm was
    # asked for dtype=float32 on a float64 tensor).
    for grad in float64_grads():
        for norm_type in NORM_TYPES:
            partial = partial_norm(grad, norm_type)
            assert partial.dtype == torch.float64
            norm = finalize_norm(partial.item(), grad.numel(), norm_type)
            assert norm == pytest.approx(ref_norm(grad, norm_type), rel=REL64)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_batched_norms_of_float64_and_mixed_gradients(norm_type: str) -> None:
    grads = float64_grads()
    mixed = [grads[0].float(), grads[1], torch.zeros(0, dtype=torch.float64), grads[2].bfloat16()]
    for case in (grads, mixed):
        partials = foreach_partial_norms(case, norm_type)  # type: ignore[arg-type]
        assert partials.dtype == torch.float64  # the widest: one float64 gradient is enough
        for partial, grad in zip(partials.tolist(), case):
            if grad.numel() == 0:
                assert partial == 0.0
                continue
            norm = finalize_norm(partial, grad.numel(), norm_type)  # type: ignore[arg-type]
            # Each gradient in its own accumulation dtype: float64 ones to float64 accuracy, the
            # float32/bf16 ones to float32 accumulation of their (exactly representable) values.
            rel = REL64 if grad.dtype == torch.float64 else 1e-6
            assert norm == pytest.approx(ref_norm(grad, norm_type), rel=rel)


def test_grad_stats_of_float64_gradients_keep_float64_digits() -> None:
    grads = float64_grads()
    # Mixed: one row per dtype, combined in float64; the float32 gradient's sums are float32 ones
    # (relative error ~1e-7 over 35 elements), its extremes and counts exact.
    for case, rel in ((grads, REL64), ([grads[0].float(), *grads[1:]], 1e-6)):
        stats = finalize_grad_stats(grad_stat_partials(case, large_threshold=1.0).tolist())
        expected = ref_grad_stats(case, large_threshold=1.0)
        assert stats["std"] == pytest.approx(expected["std"], rel=rel)
        # The mean cancels: its error is relative to the spread of the summed elements.
        assert abs(stats["mean"] - expected["mean"]) <= rel * expected["std"]
        for key in ("min", "max", "large_fraction", "zero_fraction", "nonfinite_count"):
            assert stats[key] == pytest.approx(expected[key], rel=REL64), key
    # The CPU path that copies chunk by chunk into a reused buffer (more than CPU_STAT_CHUNK
    # elements) is float64 too.
    big = [torch.randn(1 << 19, dtype=torch.float64) for _ in range(2)] + grads[2:]
    stats = finalize_grad_stats(grad_stat_partials(big, large_threshold=1.0).tolist())
    expected = ref_grad_stats(big, large_threshold=1.0)
    for key in ("std", "min", "max", "large_fraction"):
        assert stats[key] == pytest.approx(expected[key], rel=REL64), key


def test_float32_accumulation_would_fail_these_tolerances() -> None:
    """The tolerances above tell float64 from float32 accumulation of the same gradients."""
    grads = float64_grads()
    for grad in grads[:2]:
        as_float32 = torch.linalg.vector_norm(grad.float()).item()
        assert as_float32 != pytest.approx(ref_norm(grad, "l2"), rel=REL64)
    rounded, exact = ref_grad_stats([g.float() for g in grads]), ref_grad_stats(grads)
    for key in ("std", "large_fraction"):
        assert rounded[key] != pytest.approx(exact[key], rel=REL64), key


def test_stale_gradient_check_sees_float64_values_below_float32_range() -> None:
    # 1e-300 is a float64 gradient that float32 rounds to 0: a stale gradient all the same.
    tiny = torch.full((3,), 1e-300, dtype=torch.float64)
    assert holds_stale_gradients([torch.zeros(2), tiny])
    assert not holds_stale_gradients([torch.zeros(2), torch.zeros(3, dtype=torch.float64)])


# --------------------------------------------------------------------------------------------------
# A real float64 fit
# --------------------------------------------------------------------------------------------------


class Capture(pl.Callback):
    """The reference: every micro-batch's block-output gradients (tensor hooks of its own, as the
    autograd engine hands them over) and the parameter gradients at ``on_before_optimizer_step``,
    and each micro-batch's parameter gradient (tensor hooks on the parameters), all as copies."""

    def __init__(self) -> None:
        self.blocks: dict[int, dict[int, list[Tensor]]] = {}  # step -> block -> micro-batch grads
        self.params: dict[int, dict[str, Tensor]] = {}
        self.micro: dict[int, list[dict[str, Tensor]]] = {}  # step -> micro-batch -> param grads
        self.batch_sizes: dict[int, list[int]] = {}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for index, block in enumerate(pl_module.blocks):  # type: ignore[union-attr]
            block.register_forward_hook(self._forward_hook(trainer, index))
        for name, param in pl_module.named_parameters():
            param.register_hook(self._param_hook(trainer, name))

    def _forward_hook(self, trainer: pl.Trainer, index: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            def store(grad: Tensor) -> None:
                step = self.blocks.setdefault(trainer.global_step, {})
                step.setdefault(index, []).append(grad.detach().clone())

            tensor = unwrap(output)
            if tensor.requires_grad:
                tensor.register_hook(store)

        return hook

    def _param_hook(self, trainer: pl.Trainer, name: str) -> Any:
        def hook(grad: Tensor) -> None:
            self.micro[trainer.global_step][-1][name] = grad.detach().clone()

        return hook

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.micro.setdefault(trainer.global_step, []).append({})
        batch = args[1]
        self.batch_sizes.setdefault(trainer.global_step, []).append(len(batch[0]))

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        module = trainer.lightning_module
        self.params[trainer.global_step] = {
            name: p.grad.detach().clone() for name, p in module.named_parameters()
        }


def float64_fit(tmp_path: Path) -> tuple[GradientFlowCallback, Capture, pl.Trainer]:
    torch.manual_seed(0)
    model = BlockNet(depth=4, width=8)
    callback = GradientFlowCallback(
        log_every_n_steps=LOG_EVERY,
        log_param_norms=True,
        noise_scale=True,
        # Trips at every step (a norm is never below 0): its alerts carry the every-step total
        # norm, measured on unmeasured steps too (the parameter-only path).
        rules=[Rule("grad_norm_total", max=0.0, action="warn", name="every_step")],
    )
    capture = Capture()
    fit = trainer(
        tmp_path,
        [capture, callback],
        max_steps=MAX_STEPS,
        precision="64-true",
        accumulate_grad_batches=ACCUMULATE,
    )
    fit.fit(model)
    return callback, capture, fit


def test_64_true_fit_figures_are_float64_exact(tmp_path: Path) -> None:
    callback, capture, fit = float64_fit(tmp_path)
    assert fit.global_step == MAX_STEPS
    grads = capture.params[0]
    assert all(g.dtype == torch.float64 for g in grads.values())  # really a float64 run
    logged = csv_metrics(str(tmp_path / "csv" / "version_0"))
    measured = list(range(0, MAX_STEPS, LOG_EVERY))
    assert [step for step in logged if "grad_norm_total" in logged[step]] == measured
    for step in measured:
        figures = logged[step]
        params = capture.params[step]
        total = ref_norm(list(params.values()), "l2")
        assert figures["grad_norm_total"] == pytest.approx(total, rel=REL64)
        for name, grad in params.items():
            assert figures[f"grad_param_norm/{name}"] == pytest.approx(
                ref_norm(grad, "l2"), rel=REL64
            )
        # Block norms over the step's micro-batches: the root of the summed squares.
        block_norms = [
            math.sqrt(sum(ref_norm(g, "l2") ** 2 for g in micro))
            for _, micro in sorted(capture.blocks[step].items())
        ]
        assert [len(micro) for micro in capture.blocks[step].values()] == [ACCUMULATE] * 4
        for index, norm in enumerate(block_norms):
            assert figures[f"grad_norm/blocks.{index}"] == pytest.approx(norm, rel=REL64)
            if index:  # a log-gain's error is absolute: the two norms' relative errors
                log_gain = math.log(block_norms[index - 1] / norm)
                assert figures[f"grad_log_gain/blocks.{index}"] == pytest.approx(
                    log_gain, abs=2 * REL64
                )
        stats = ref_grad_stats(list(params.values()))
        for key in ("std", "min", "max"):
            assert figures[f"grad_stats/{key}"] == pytest.approx(stats[key], rel=REL64), key
        # The mean cancels: its error is relative to the spread of the summed elements.
        spread = stats["std"] + abs(stats["mean"])
        assert abs(figures["grad_stats/mean"] - stats["mean"]) <= REL64 * spread
    # The every-step rule saw the float64 total norm at every step, measured or not.
    every_step = {a.step: a.value for a in callback.alerts if a.rule == "every_step"}
    assert sorted(every_step) == list(range(MAX_STEPS))
    for step, value in every_step.items():
        assert value == pytest.approx(
            ref_norm(list(capture.params[step].values()), "l2"), rel=REL64
        )


def test_64_true_noise_scale_matches_the_micro_batch_gradients(tmp_path: Path) -> None:
    _, capture, _ = float64_fit(tmp_path)
    logged = csv_metrics(str(tmp_path / "csv" / "version_0"))[0]
    # Step 0, the first estimate: the bias-corrected EMA of one value is that value.
    sizes = capture.batch_sizes[0]
    assert len(sizes) == ACCUMULATE and len(set(sizes)) == 1
    b_small, b_big = float(sizes[0]), float(sum(sizes))
    # Lightning divides each micro-batch loss by ACCUMULATE: undo it for each micro-batch's own
    # mean-loss gradient; the step's gradient is their sum (the mean of the undone ones).
    micro = [
        sum(ref_norm(g, "l2") ** 2 for g in grads.values()) * ACCUMULATE**2
        for grads in capture.micro[0]
    ]
    small = sum(micro) / len(micro)
    big = ref_norm(list(capture.params[0].values()), "l2") ** 2
    grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
    trace = (small - big) / (1 / b_small - 1 / b_big)
    # Differences of sums: the error is relative to the terms, not to the (smaller) difference.
    terms = (b_big * big + b_small * small) / (b_big - b_small)
    assert abs(logged[NOISE_GRAD_SQ_KEY] - grad_sq) <= REL64 * terms
    assert abs(logged[NOISE_TRACE_KEY] - trace) <= REL64 * (small + big) / (1 / b_small - 1 / b_big)


class GatedBlock(nn.Module):
    """A float32 ``Linear`` + tanh whose output is scaled by a float64 gate: a block with float32
    and float64 parameters, a float64 output, and gradients of both dtypes."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.gate = nn.Parameter(torch.full((width,), 0.9, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.linear(x.float())).double() * self.gate


class MixedNet(BlockNet):
    """``BlockNet`` of :class:`GatedBlock` blocks (float32 stem and head)."""

    def __init__(self) -> None:
        super().__init__(depth=3, width=8)
        self.blocks = nn.ModuleList(GatedBlock(8) for _ in range(3))

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h.float())


def test_mixed_float32_and_float64_parameters(tmp_path: Path) -> None:
    callback = GradientFlowCallback(log_every_n_steps=1, log_param_norms=True, rules=[])
    capture = Capture()
    torch.manual_seed(0)
    trainer(tmp_path, [capture, callback], max_steps=1).fit(MixedNet())
    params = capture.params[0]
    assert params["blocks.0.gate"].dtype == torch.float64
    assert params["blocks.0.linear.weight"].dtype == torch.float32
    metrics = callback.last.metrics  # type: ignore[union-attr]
    # Block outputs are float64: their norms to float64 accuracy.
    for index, (grad,) in sorted(capture.blocks[0].items()):
        assert grad.dtype == torch.float64
        norm = ref_norm(grad, "l2")
        assert metrics[f"grad_norm/blocks.{index}"] == pytest.approx(norm, rel=REL64)
    # Each parameter's norm in its own accumulation dtype (float32 sums over a few dozen elements:
    # relative error ~1e-7), the total and the statistics combined in float64.
    for name, grad in params.items():
        rel = REL64 if grad.dtype == torch.float64 else 1e-6
        assert metrics[f"grad_param_norm/{name}"] == pytest.approx(ref_norm(grad, "l2"), rel=rel)
    total = ref_norm(list(params.values()), "l2")
    assert metrics["grad_norm_total"] == pytest.approx(total, rel=1e-6)
    stats = ref_grad_stats(list(params.values()))
    assert metrics["grad_stats/std"] == pytest.approx(stats["std"], rel=1e-6)
    assert metrics["grad_stats/max"] == pytest.approx(stats["max"], rel=REL64)


# --------------------------------------------------------------------------------------------------
# Plain PyTorch
# --------------------------------------------------------------------------------------------------


def test_gradient_gain_monitor_on_a_float64_model() -> None:
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)).double()
    outputs: list[Tensor] = []
    x = torch.randn(32, 16, dtype=torch.float64)
    with GradientGainMonitor(blocks) as monitor:
        h = x
        for block in blocks:
            h = block(h)
            h.retain_grad()
            outputs.append(h)
        h.pow(2).mean().backward()
        norms = monitor.norms()
        log_gains = monitor.log_gains()
    expected = [ref_norm(out.grad, "l2") for out in outputs]  # type: ignore[arg-type]
    for norm, want in zip(norms, expected):
        assert norm == pytest.approx(want, rel=REL64)
    for log_gain, before, after in zip(log_gains, expected[:-1], expected[1:]):
        assert log_gain == pytest.approx(math.log(before / after), abs=2 * REL64)
    # ... where the same gradients rounded to float32 are measurably off.
    as_float32 = [torch.linalg.vector_norm(out.grad.float()).item() for out in outputs]  # type: ignore[union-attr]
    assert any(v != pytest.approx(w, rel=REL64) for v, w in zip(as_float32, expected))
