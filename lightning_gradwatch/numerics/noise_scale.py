"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
appendix A.1), from gradients measured at two batch sizes.

With ``|G_small|^2`` the squared norm of a gradient over ``B_small`` samples (averaged over several
such gradients, e.g. every DDP rank's local gradient) and ``|G_big|^2`` that of the gradient over
``B_big`` samples (the averaged gradient), both are unbiased::

    |G|^2     = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

where ``G`` is the true (full-data) gradient and ``Sigma`` the per-sample gradient covariance. Each
is smoothed by its own bias-corrected exponential moving average, and the simple noise scale
``B_simple = tr(Sigma) / |G|^2`` is the ratio of the two averages (the ratio of noisy estimates would
be biased). ``B_simple`` estimates the critical batch size in samples: far below it, a larger batch
cuts the number of steps almost proportionally; far above it, extra samples per step buy little.

Pure: floats in, floats out.
"""

from __future__ import annotations

import math
from typing import Any

from lightning_gradwatch.keys import (
    NOISE_B_SIMPLE_KEY,
    NOISE_BATCH_KEY,
    NOISE_GRAD_SQ_KEY,
    NOISE_TRACE_KEY,
)

__all__ = ["NOISE_EMA_DECAY", "NoiseScaleEstimator", "unbiased_estimates"]

#: EMA decay per measured step (about the last 10 measured steps dominate).
NOISE_EMA_DECAY = 0.9


def unbiased_estimates(
    small_sq: float, big_sq: float, b_small: float, b_big: float
) -> tuple[float, float]:
    """``(|G|^2, tr(Sigma))`` from one pair of measurements (either may come out negative: noise).

    Example::

        unbiased_estimates(small_sq=2.0, big_sq=1.25, b_small=16, b_big=64)  # (1.0, 16.0)
    """
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}.")
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


class NoiseScaleEstimator:
    """Bias-corrected EMAs of ``|G|^2`` and ``tr(Sigma)``, and their ratio ``B_simple``.

    Args:
        decay: EMA decay per update, in ``[0, 1)`` (default :data:`NOISE_EMA_DECAY`).

    Example::

        estimator = NoiseScaleEstimator()
        metrics = estimator.update(small_sq=2.0, big_sq=1.25, b_small=16, b_big=64)
        metrics["grad_noise/b_simple"]  # 16.0
    """

    def __init__(self, decay: float = NOISE_EMA_DECAY) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < 1:
            raise ValueError(f"`decay` must be a number in [0, 1), got {decay!r}.")
        self.decay = float(decay)
        self._grad_sq = 0.0
        self._trace = 0.0
        self._weight = 0.0  # 1 - decay^n: the bias correction of both averages

    @property
    def grad_sq(self) -> float:
        """Smoothed ``|G|^2`` (NaN before the first update)."""
        return self._grad_sq / self._weight if self._weight else math.nan

    @property
    def trace_sigma(self) -> float:
        """Smoothed ``tr(Sigma)`` (NaN before the first update)."""
        return self._trace / self._weight if self._weight else math.nan

    @property
    def b_simple(self) -> float:
        """``tr(Sigma) / |G|^2`` of the smoothed values; NaN until ``|G|^2`` is positive."""
        grad_sq = self.grad_sq
        return self.trace_sigma / grad_sq if grad_sq > 0 else math.nan

    def update(
        self, small_sq: float, big_sq: float, b_small: float, b_big: float
    ) -> dict[str, float]:
        """Fold one measurement in; returns the keys to log: the two smoothed components, the batch
        ``b_big`` and ``b_simple`` (only while the smoothed ``|G|^2`` is positive: before that the
        gradient signal is lost in the noise). A non-finite input leaves the averages unchanged and
        returns nothing."""
        values = (small_sq, big_sq, b_small, b_big)
        if not all(math.isfinite(v) for v in values):
            return {}
        grad_sq, trace = unbiased_estimates(*values)
        keep = self.decay
        self._grad_sq = keep * self._grad_sq + (1 - keep) * grad_sq
        self._trace = keep * self._trace + (1 - keep) * trace
        self._weight = keep * self._weight + (1 - keep)
        metrics = {
            NOISE_GRAD_SQ_KEY: self.grad_sq,
            NOISE_TRACE_KEY: self.trace_sigma,
            NOISE_BATCH_KEY: float(b_big),
        }
        if self.grad_sq > 0:
            metrics[NOISE_B_SIMPLE_KEY] = self.b_simple
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"grad_sq": self._grad_sq, "trace": self._trace, "weight": self._weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._grad_sq = float(state.get("grad_sq", 0.0))
        self._trace = float(state.get("trace", 0.0))
        self._weight = float(state.get("weight", 0.0))
