"""What reaches the loggers: TensorBoard event files (read back with tensorboard's EventAccumulator) and
CSVLogger's metrics.csv hold the reference values, at the callback's own interval."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from reference import (
    RefNet,
    assert_metrics_equal,
    csv_metrics,
    tensorboard_events,
    tensorboard_scalars,
    trainer,
)

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch.keys import HIST_BLOCK_PREFIX, HIST_PARAM_PREFIX

pytestmark = [RULE_TRIPS, WIRING_REPORT]

#: Prefixes and keys of the README's metric table (governance's own keys are tested with it).
TABLE_PREFIXES = (
    "grad_norm/",
    "grad_gain/",
    "grad_log_gain/",
    "grad_param_norm/",
    "grad_flow/",
    "grad_stats/",
)
TABLE_KEYS = ("grad_norm_total",)


def _ours(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith(TABLE_PREFIXES) or k in TABLE_KEYS}


@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_tensorboard_and_csv_hold_the_reference_values_at_the_interval(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = RefNet(activation="relu")
    tb = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    callback = GradientFlowCallback(log_every_n_steps=3, norm_type="mean", log_param_norms="head.*")
    # The Trainer's own interval (7) must not matter: the callback logs every 3 optimizer steps.
    trainer(tmp_path, [callback], logger=[tb, csv], max_steps=10, log_every_n_steps=7).fit(model)

    assert sorted(model.refs) == list(range(10))  # every step happened; only some are logged
    expected = {
        step: model.expected(step, "mean", param_keys=["head.weight", "head.bias"])
        for step in (0, 3, 6, 9)
    }
    assert callback.last is not None and callback.last.step == 9
    assert_metrics_equal(callback.last.metrics, expected[9])

    from_tb = {
        step: _ours(values)
        for step, values in tensorboard_scalars(tensorboard_events(tb.log_dir)).items()
    }
    from_csv = {step: _ours(values) for step, values in csv_metrics(csv.log_dir).items()}
    from_tb = {step: values for step, values in from_tb.items() if values}
    from_csv = {step: values for step, values in from_csv.items() if values}
    assert sorted(from_tb) == sorted(from_csv) == [0, 3, 6, 9]
    for step, want in expected.items():
        assert_metrics_equal(from_tb[step], want, rel=1e-6)  # TensorBoard stores float32
        assert_metrics_equal(from_csv[step], want, rel=1e-6)
    for key, value in callback.last.metrics.items():
        assert from_tb[9][key] == pytest.approx(value, rel=1e-6)
        assert from_csv[9][key] == pytest.approx(value, rel=1e-12)


def test_histograms_are_written_to_tensorboard(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = RefNet(depth=3)
    tb = TensorBoardLogger(tmp_path, name="tb")
    callback = GradientFlowCallback(log_every_n_steps=2, log_histograms=True)
    trainer(tmp_path, [callback], logger=tb, max_steps=3).fit(model)

    accumulator = tensorboard_events(tb.log_dir, histograms=0)
    tags = set(accumulator.Tags()["histograms"])
    block_tags = {f"{HIST_BLOCK_PREFIX}blocks.{i}": i for i in range(3)}
    param_tags = {f"{HIST_PARAM_PREFIX}{name}": name for name, _ in model.named_parameters()}
    assert tags == set(block_tags) | set(param_tags)

    def check(tag: str, grads: dict[int, torch.Tensor]) -> None:
        events = accumulator.Histograms(tag)
        assert [event.step for event in events] == [0, 2]
        for event in events:
            grad = grads[event.step].double()
            histogram = event.histogram_value
            assert histogram.num == grad.numel()
            assert histogram.sum == pytest.approx(grad.sum().item(), rel=1e-4, abs=1e-9)
            assert histogram.sum_squares == pytest.approx(grad.pow(2).sum().item(), rel=1e-4)
            assert histogram.min == pytest.approx(grad.min().item(), rel=1e-6)
            assert histogram.max == pytest.approx(grad.max().item(), rel=1e-6)

    for tag, index in block_tags.items():
        check(tag, {step: model.refs[step]["blocks"][index] for step in (0, 2)})
    for tag, name in param_tags.items():
        check(tag, {step: model.refs[step]["params"][name] for step in (0, 2)})


def test_no_histograms_by_default(tmp_path: Any) -> None:
    torch.manual_seed(0)
    tb = TensorBoardLogger(tmp_path, name="tb")
    trainer(tmp_path, [GradientFlowCallback(log_every_n_steps=1)], logger=tb, max_steps=1).fit(
        RefNet(depth=2)
    )
    accumulator = tensorboard_events(tb.log_dir, histograms=0)
    assert accumulator.Tags()["histograms"] == []
    assert "grad_norm/blocks.1" in accumulator.Tags()["scalars"]
