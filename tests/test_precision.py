"""Mixed precision: block-output figures are those of the unscaled gradient.

With a real ``GradScaler`` (``16-mixed``; on CPU the plugin is built with a scaler by hand, since
``precision="16-mixed"`` alone falls back to bf16 there) the tensor hooks see ``scale * gradient``
while parameter gradients are unscaled before ``on_before_optimizer_step``. The reference is the
module's own ``retain_grad`` copies (scaled, divided by the scale in the test) and an fp32 run.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from global_batch import BLOCKS
from lightning.pytorch.plugins import MixedPrecision
from models import BlockNet
from parallel import assert_figures_equal
from reference import RefNet, ref_metrics, trainer
from torch import Tensor
from torch_features import needs_cpu_bf16_mse, needs_cpu_fused_optimizer

from lightning_gradwatch import GradientFlowCallback

pytestmark = [RULE_TRIPS, WIRING_REPORT]

SCALE = 2.0**10


def scaler_plugin(init_scale: float, **kwargs: Any) -> MixedPrecision:
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, **kwargs)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def run(tmp_path: Path, **trainer_kwargs: Any) -> tuple[RefNet, GradientFlowCallback, Any]:
    torch.manual_seed(0)
    model = RefNet()
    callback = GradientFlowCallback(log_every_n_steps=1, log_param_norms=True, rules=[])
    fit = trainer(tmp_path, [callback], max_steps=1, **trainer_kwargs)
    fit.fit(model)
    return model, callback, fit


def logged_steps(tmp_path: Path) -> list[int]:
    path = tmp_path / "csv" / "version_0" / "metrics.csv"
    if not path.exists():
        return []
    with open(path) as handle:
        return [int(row["step"]) for row in csv.DictReader(handle) if row.get("grad_norm/blocks.0")]


def test_16_mixed_with_scaler_divides_block_norms_by_the_scale(tmp_path: Path) -> None:
    model, callback, fit = run(tmp_path / "amp", plugins=[scaler_plugin(SCALE)])
    assert fit.precision_plugin.scaler.get_scale() == SCALE  # no overflow: the step was taken
    ref = model.refs[0]
    assert ref["blocks"][0].dtype == torch.float16  # the hooks really saw fp16 gradients
    unscaled = [grad.double() / SCALE for grad in ref["blocks"]]
    params = ref["params"]
    expected = ref_metrics(model.block_names(), unscaled, params, param_keys=list(params))
    assert_figures_equal(callback.last.metrics, expected, rel=1e-5)  # type: ignore[union-attr]
    # The undivided figures would be 1024x too large.
    raw = ref_metrics(model.block_names(), ref["blocks"], params)
    assert raw["grad_norm/blocks.0"] == pytest.approx(SCALE * expected["grad_norm/blocks.0"])

    # ... and they match an fp32 run up to fp16 rounding; gains are unaffected by the scale.
    _, fp32, _ = run(tmp_path / "fp32")
    for key, value in fp32.last.metrics.items():  # type: ignore[union-attr]
        if key.startswith(("grad_norm/", "grad_gain/", "grad_norm_total")):
            assert callback.last.metrics[key] == pytest.approx(value, rel=2e-2), key  # type: ignore[union-attr]


def test_bf16_mixed_just_works(tmp_path: Path) -> None:
    model, callback, _ = run(tmp_path / "bf16", precision="bf16-mixed")
    ref = model.refs[0]
    assert ref["blocks"][0].dtype == torch.bfloat16
    params = ref["params"]
    expected = ref_metrics(model.block_names(), ref["blocks"], params, param_keys=list(params))
    assert_figures_equal(callback.last.metrics, expected, rel=1e-5)  # type: ignore[union-attr]
    _, fp32, _ = run(tmp_path / "fp32")
    for key in ("grad_norm/blocks.0", "grad_norm/blocks.3", "grad_norm_total"):
        assert callback.last.metrics[key] == pytest.approx(fp32.last.metrics[key], rel=5e-2)  # type: ignore[union-attr]


def test_step_skipped_by_the_scaler_is_not_logged(tmp_path: Path) -> None:
    # 2**40 overflows fp16 in backward: the scaler skips step 0 and backs off to 2**40 / 2**30.
    plugin = scaler_plugin(2.0**40, backoff_factor=2.0**-30)
    torch.manual_seed(0)
    model = RefNet()
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[])
    fit = trainer(tmp_path, [callback], max_steps=2, plugins=[plugin])
    fit.fit(model)
    assert fit.precision_plugin.scaler.get_scale() == 2.0**10
    step0 = model.refs[0]["params"].values()
    assert not all(bool(torch.isfinite(grad).all()) for grad in step0)  # step 0 overflowed
    assert logged_steps(tmp_path) == [1]  # step 0 (skipped by the scaler) is not logged
    last = callback.last
    assert last is not None and last.step == 1 and not last.skipped_by_scaler
    unscaled = [grad.double() / 2.0**10 for grad in model.refs[1]["blocks"]]
    expected = ref_metrics(model.block_names(), unscaled, model.refs[1]["params"])
    assert_figures_equal(last.metrics, expected, rel=1e-5)
    assert all(math.isfinite(value) for value in last.metrics.values())


@needs_cpu_bf16_mse
def test_bf16_true_gradients_are_measured(tmp_path: Path) -> None:
    model, callback, _ = run(tmp_path, precision="bf16-true")
    ref = model.refs[0]
    assert ref["params"]["stem.weight"].dtype == torch.bfloat16
    expected = ref_metrics(
        model.block_names(), ref["blocks"], ref["params"], param_keys=list(ref["params"])
    )
    assert_figures_equal(callback.last.metrics, expected, rel=1e-5)  # type: ignore[union-attr]


class FusedAdamNet(RefNet):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)


@needs_cpu_fused_optimizer
def test_optimizer_unscaling_in_step_is_warned_about(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FusedAdamNet()
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[])
    fit = trainer(tmp_path, [callback], max_steps=1, plugins=[scaler_plugin(SCALE)])
    with pytest.warns(UserWarning, match=r"unscales gradients inside its own step\(\)"):
        fit.fit(model)
    ref = model.refs[0]  # Lightning left these gradients scaled: the optimizer unscales them
    unscaled = [grad.double() / SCALE for grad in ref["blocks"]]
    expected = ref_metrics(model.block_names(), unscaled, ref["params"])
    for key, value in expected.items():  # block figures and gains are still right
        if key.startswith(("grad_norm/", "grad_gain/", "grad_flow/")):
            assert callback.last.metrics[key] == pytest.approx(value, rel=1e-5, nan_ok=True), key  # type: ignore[union-attr]


def test_step_skipped_by_the_scaler_is_not_a_measurement_with_default_rules(tmp_path: Path) -> None:
    plugin = scaler_plugin(2.0**40, backoff_factor=2.0**-30)  # step 0 overflows fp16, as above
    torch.manual_seed(0)
    model = RefNet()
    callback = GradientFlowCallback(log_every_n_steps=1)  # default rules: nonfinite -> halt
    fit = trainer(tmp_path, [callback], max_steps=1, plugins=[plugin])
    fit.fit(model)
    assert fit.precision_plugin.scaler.get_scale() == 2.0**10  # the scaler did skip step 0
    assert not callback.halted  # the scaler's job, not a halt
    assert callback.last is None  # nothing was measured
    assert [a.action for a in callback.alerts] == ["none"]  # but the trip is on record
    path = tmp_path / "csv" / "version_0" / "metrics.csv"
    logged: set[str] = set()
    if path.exists():
        with open(path) as handle:
            for row in csv.DictReader(handle):
                logged |= {key for key, value in row.items() if key.startswith("grad") and value}
    assert logged == set()


class MicroBatchRecorder(BlockNet):
    """Keeps ``retain_grad`` copies of every block output of every micro-batch of each step."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(depth=4, width=8)
        self._outputs: list[list[Tensor]] = []
        self.refs: dict[int, dict[str, Any]] = {}

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        outputs = []
        for block in self.blocks:
            h = block(h)
            h.retain_grad()
            outputs.append(h)
        self._outputs.append(outputs)
        return self.head(h)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        per_block = zip(*[[o.grad.clone() for o in outs] for outs in self._outputs])  # type: ignore[union-attr]
        self.refs[self.trainer.global_step] = {
            "blocks": [list(grads) for grads in per_block],
            "params": {n: p.grad.clone() for n, p in self.named_parameters()},  # type: ignore[union-attr]
            "micro_batches": len(self._outputs),
        }
        self._outputs = []


def test_16_mixed_scaler_with_accumulation_combines_unscaled_micro_batches(
    tmp_path: Path,
) -> None:
    scale = 2.0**10
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    model = MicroBatchRecorder()
    callback = GradientFlowCallback(log_every_n_steps=1, log_param_norms=True)
    fit = trainer(
        tmp_path,
        [callback],
        max_steps=1,
        accumulate_grad_batches=3,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    fit.fit(model)
    assert fit.precision_plugin.scaler.get_scale() == scale  # no overflow: the step was taken
    ref = model.refs[0]
    assert ref["micro_batches"] == 3 and ref["blocks"][0][0].dtype == torch.float16
    # Block b's reference: the unscaled gradients of all three micro-batches as one vector.
    blocks = [torch.cat([g.double().reshape(-1) / scale for g in grads]) for grads in ref["blocks"]]
    params = ref["params"]
    expected = ref_metrics(BLOCKS, blocks, params, param_keys=list(params))
    assert_figures_equal(callback.last.metrics, expected, rel=1e-5)  # type: ignore[union-attr]
