"""The shortcuts taken for speed give what the plain way gives: the in-place grad-stats passes leave the
gradients alone, the one-group ``_foreach_norm`` stack equals per-tensor norms, and TensorBoard scalars
written as one event read back like ``add_scalar`` per key."""

from __future__ import annotations

import math
from typing import Any, Optional

import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from reference import FLOAT32_SUM_REL, approx_stats, ref_grad_stats, ref_norm
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradwatch.keys import GRAD_STAT_KEYS
from lightning_gradwatch.lightning.sinks import log_metrics
from lightning_gradwatch.lightning.tensorboard import write_scalars
from lightning_gradwatch.numerics import grad_stats
from lightning_gradwatch.numerics.grad_stats import (
    finalize_grad_stats,
    grad_stat_partials,
    stat_partials_finite,
)
from lightning_gradwatch.numerics.norms import foreach_partial_norms


def _grads() -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=g) * 2
    odd = torch.randn(3, 4, generator=g)
    odd[1, 2] = math.inf
    odd[0, 0] = math.nan
    return [
        [weight],  # one tensor: must not be stats-ed in place
        [weight, torch.zeros(7), weight.t()],  # a transposed (non-contiguous) view
        [odd, weight.to(torch.bfloat16), torch.randn(9, generator=g).double()],  # three groups
    ]


@pytest.mark.parametrize("chunk", [None, 7, 30])
@pytest.mark.parametrize("case", range(3))
def test_grad_stats_leave_gradients_untouched_and_match_reference(
    case: int, chunk: Optional[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunk is not None:  # the CPU path that reduces chunk by chunk through one reused buffer
        monkeypatch.setattr(grad_stats, "CPU_STAT_CHUNK", chunk)
    grads = _grads()[case]
    before = [g.clone() for g in grads]
    stats = finalize_grad_stats(grad_stat_partials(grads, 1.0).tolist())
    for grad, copy in zip(grads, before):
        assert torch.equal(grad.isnan(), copy.isnan())
        assert torch.equal(grad.nan_to_num(), copy.nan_to_num())
    expected = ref_grad_stats(grads, 1.0)
    assert set(stats) == set(GRAD_STAT_KEYS)
    assert stats == approx_stats(expected)


@pytest.mark.parametrize("chunk", [None, 7, 30])
@pytest.mark.parametrize("case", range(3))
def test_cheap_finite_stats_pass_matches_reference_or_says_it_cannot(
    case: int, chunk: Optional[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    if chunk is not None:
        monkeypatch.setattr(grad_stats, "CPU_STAT_CHUNK", chunk)
    grads = _grads()[case]
    before = [g.clone() for g in grads]
    partials = grad_stat_partials(grads, 1.0, assume_finite=True).tolist()
    for grad, copy in zip(grads, before):
        assert torch.equal(grad.isnan(), copy.isnan())
        assert torch.equal(grad.nan_to_num(), copy.nan_to_num())
    has_nonfinite = not all(bool(torch.isfinite(g).all()) for g in grads)
    assert stat_partials_finite(partials) is not has_nonfinite
    if not has_nonfinite:  # trusted: every figure equals the reference (zeros included)
        stats = finalize_grad_stats(partials)
        expected = ref_grad_stats(grads, 1.0)
        assert expected["zero_fraction"] > 0 or case == 0
        assert stats == approx_stats(expected)


def test_an_overflowing_sum_of_squares_is_not_trusted() -> None:
    huge = [torch.full((4,), 3e38)]  # finite, but its square overflows float32
    assert not stat_partials_finite(grad_stat_partials(huge, 1.0, assume_finite=True).tolist())
    exact = finalize_grad_stats(grad_stat_partials(huge, 1.0).tolist())
    assert exact["nonfinite_count"] == 0 and exact["large_fraction"] == 1.0


@pytest.mark.parametrize("norm_type", ["l2", "l1", "linf", "mean"])
def test_one_group_stack_equals_per_tensor_norms(norm_type: str) -> None:
    grads = _grads()[1]
    partials = foreach_partial_norms(grads, norm_type).tolist()  # type: ignore[arg-type]
    for grad, partial in zip(grads, partials):
        norm = ref_norm(grad, "l1" if norm_type == "mean" else norm_type)
        assert (math.sqrt(partial) if norm_type == "l2" else partial) == pytest.approx(
            norm, rel=FLOAT32_SUM_REL
        )


def test_tensorboard_scalars_in_one_event_read_back_like_add_scalar(tmp_path: Any) -> None:
    metrics = {"grad_norm/blocks.0": 1.5, "grad_gain/blocks.1": math.inf, "grad_flow/x": -2.0}
    ours = TensorBoardLogger(tmp_path, name="ours", prefix="fit")
    plain = TensorBoardLogger(tmp_path, name="plain", prefix="fit")
    for step in (0, 3):
        log_metrics([ours], {k: v * (step + 1) for k, v in metrics.items()}, step)
        plain.log_metrics({k: v * (step + 1) for k, v in metrics.items()}, step)
    read = {}
    for logger in (ours, plain):
        logger.experiment.flush()
        events = EventAccumulator(logger.log_dir)
        events.Reload()
        read[logger.name] = {
            tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]
        }
    assert set(read["ours"]) == {f"fit-{key}" for key in metrics}
    assert read["ours"] == read["plain"]
    # ... and the one-event path is the one taken for a plain TensorBoardLogger.
    assert write_scalars(ours, metrics, 4)
