"""The pure math of ``lightning_gradwatch.numerics.norms`` against references computed in the test."""

from __future__ import annotations

import math

import pytest
import torch
from reference import (
    FLOAT32_SUM_REL,
    NORM_TYPES,
    STAT_KEYS,
    SUMMARY_KEYS,
    assert_floats_equal,
    close_to,
    ref_category,
    ref_gains,
    ref_grad_stats,
    ref_log_gains,
    ref_norm,
    ref_summary,
)

from lightning_gradwatch import keys
from lightning_gradwatch.keys import GRAD_STAT_KEYS
from lightning_gradwatch.numerics import norms
from lightning_gradwatch.numerics.grad_stats import finalize_grad_stats, grad_stat_partials
from lightning_gradwatch.numerics.norms import (
    Category,
    classify_gain,
    combine_partials,
    compute_gains,
    compute_log_gains,
    end_to_end_gain,
    finalize_norm,
    foreach_partial_norms,
    partial_norm,
    summarize_gains,
    validate_norm_type,
)


def _tensors() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [
        torch.randn(7, 5, generator=generator),
        torch.randn(3, generator=generator) * 10,
        torch.randn(2, 2, 2, generator=generator) * 0.01,
    ]


def test_public_constants() -> None:
    assert norms.NORM_TYPES == NORM_TYPES
    assert keys.SUMMARY_KEYS == SUMMARY_KEYS
    assert GRAD_STAT_KEYS == STAT_KEYS


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_partial_norm_finalizes_to_the_norm(norm_type: str) -> None:
    for tensor in _tensors():
        partial = partial_norm(tensor, norm_type)  # type: ignore[arg-type]
        assert partial.dtype == torch.float32 and partial.dim() == 0
        value = finalize_norm(partial.item(), tensor.numel(), norm_type)  # type: ignore[arg-type]
        assert value == pytest.approx(ref_norm(tensor, norm_type), rel=FLOAT32_SUM_REL)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_partials_combine_across_pieces(norm_type: str) -> None:
    # Splitting a gradient (micro-batches, shards) and combining the partials gives the whole norm.
    tensors = _tensors()
    partials = torch.stack([partial_norm(t, norm_type) for t in tensors])  # type: ignore[arg-type]
    combined = combine_partials(partials, norm_type).item()  # type: ignore[arg-type]
    numel = sum(t.numel() for t in tensors)
    value = finalize_norm(combined, numel, norm_type)  # type: ignore[arg-type]
    assert value == pytest.approx(ref_norm(tensors, norm_type), rel=FLOAT32_SUM_REL)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_foreach_partial_norms_mixed_dtypes(norm_type: str) -> None:
    # Mixed dtypes go through separate _foreach_norm groups but come back in the input order.
    base = _tensors()
    grads = [base[0], base[1].to(torch.bfloat16), base[2].double(), base[0].half() * 100]
    partials = foreach_partial_norms(grads, norm_type)  # type: ignore[arg-type]
    # The widest accumulation dtype: one float64 gradient makes the vector float64.
    assert partials.dtype == torch.float64 and partials.shape == (len(grads),)
    for grad, partial in zip(grads, partials.tolist()):
        value = finalize_norm(partial, grad.numel(), norm_type)  # type: ignore[arg-type]
        assert value == pytest.approx(ref_norm(grad, norm_type), rel=1e-5)


def test_foreach_partial_norms_fp16_does_not_overflow() -> None:
    # 4096 elements of 300 in fp16: sum of squares = 3.7e8, far beyond fp16's 65504.
    grad = torch.full((4096,), 300.0, dtype=torch.float16)
    (partial,) = foreach_partial_norms([grad], "l2").tolist()
    assert math.isfinite(partial)
    assert finalize_norm(partial, grad.numel(), "l2") == pytest.approx(300.0 * 64, rel=1e-4)


def test_foreach_partial_norms_empty() -> None:
    assert foreach_partial_norms([], "l2").numel() == 0


@pytest.mark.parametrize("large_threshold", [1.0, 0.05])
def test_grad_stats_match_reference(large_threshold: float) -> None:
    base = _tensors()
    grads = [base[0], torch.zeros(4), base[1].double(), base[2].to(torch.bfloat16)]
    partials = grad_stat_partials(grads, large_threshold)
    stats = finalize_grad_stats(partials.tolist())
    assert list(stats) == list(GRAD_STAT_KEYS)
    # The reference sees the same (bf16-rounded) values the library sees.
    expected = ref_grad_stats(grads, large_threshold)
    for key in GRAD_STAT_KEYS:
        assert stats[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-9), key
    assert stats["zero_fraction"] > 0 and stats["large_fraction"] > 0


def test_grad_stats_count_non_finite() -> None:
    grads = [torch.tensor([1.0, math.inf, -2.0]), torch.tensor([math.nan, 0.5])]
    stats = finalize_grad_stats(grad_stat_partials(grads, 1.0).tolist())
    assert stats["nonfinite_count"] == 2


GAIN_CASES = [
    [1.0, 0.5, 2.0, 2.0],
    [3.0, None, 1.0, 4.0],
    [0.0, 0.0, 1.0, 1e-3],
    [1e-40, 2.0, 0.25],
    [None, None],
    [5.0],
]


@pytest.mark.parametrize("values", GAIN_CASES)
def test_gains_log_gains_summary_against_reference(values: list) -> None:
    gains = compute_gains(values)
    log_gains = compute_log_gains(values)
    assert len(gains) == len(log_gains) == max(len(values) - 1, 0)
    # Float64 inputs: the package's figures differ from the reference's by float64 rounding only.
    assert_floats_equal(gains, ref_gains(values), rel=1e-12, key="grad_gain/")
    assert_floats_equal(log_gains, ref_log_gains(values), rel=1e-12, key="grad_log_gain/")
    summary = summarize_gains(gains, log_gains)
    expected = ref_summary(values)
    assert tuple(summary) == SUMMARY_KEYS
    for key in SUMMARY_KEYS:
        assert summary[key] == close_to(expected[key], f"grad_flow/{key}", rel=1e-12), key
    assert end_to_end_gain(values) == pytest.approx(
        expected["end_to_end_gain"] if len(values) >= 2 else math.nan, nan_ok=True
    )


def test_eps_decides_vanishing() -> None:
    assert compute_gains([1.0, 1e-8], eps=1e-6) == [math.inf]
    assert compute_gains([1.0, 1e-8], eps=1e-12) == pytest.approx([1e8])


@pytest.mark.parametrize("gain", [None, math.nan, math.inf, 0.0, 0.49, 0.5, 1.0, 2.0, 2.01, 1e6])
def test_classify_gain_boundaries(gain: object) -> None:
    expected = "missing" if gain is not None and math.isnan(gain) else ref_category(gain)  # type: ignore[arg-type]
    assert classify_gain(gain).value == expected  # type: ignore[arg-type]
    assert isinstance(classify_gain(gain), Category)  # type: ignore[arg-type]


def test_classify_gain_custom_thresholds() -> None:
    assert classify_gain(0.9, 0.95, 4.0) is Category.DAMPING
    assert classify_gain(3.0, 0.95, 4.0) is Category.HEALTHY
    assert classify_gain(4.5, 0.95, 4.0) is Category.AMPLIFYING


def test_validate_norm_type() -> None:
    for norm_type in NORM_TYPES:
        assert validate_norm_type(norm_type) == norm_type
    with pytest.raises(ValueError, match=r"`norm_type` must be one of .*'l2'.*got 'l3'"):
        validate_norm_type("l3")
    with pytest.raises(ValueError, match="norm_type"):
        validate_norm_type(2)
