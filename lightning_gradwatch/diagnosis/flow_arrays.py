"""Vectorised numpy twins of :mod:`lightning_gradwatch.numerics.norms`'s gain helpers, for many measured steps
at once (the offline report and the heatmap). Rows are steps, columns blocks; NaN is a missing norm.

They follow :func:`~lightning_gradwatch.numerics.norms.compute_gains`,
:func:`~lightning_gradwatch.numerics.norms.compute_log_gains` and
:func:`~lightning_gradwatch.numerics.norms.classify_gain` exactly (missing -> NaN, a norm ``<= eps`` on the
output side -> ``inf``); ``tests/test_report.py`` checks that element by element.
"""

from __future__ import annotations

import numpy as np

from lightning_gradwatch.keys import DEFAULT_EPS
from lightning_gradwatch.numerics.norms import Category


def gains_array(norms: np.ndarray, eps: float = DEFAULT_EPS) -> np.ndarray:
    """``norm[..., i-1] / norm[..., i]`` along the last axis."""
    previous, current = norms[..., :-1], norms[..., 1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        gains = previous / current
    gains = np.where(current <= eps, np.inf, gains)
    return np.where(np.isnan(previous) | np.isnan(current), np.nan, gains)


def log_gains_array(norms: np.ndarray, eps: float = DEFAULT_EPS) -> np.ndarray:
    """``log(norm[..., i-1]) - log(norm[..., i])``: ``+inf`` into a zero norm, ``-inf`` out of one."""
    previous, current = norms[..., :-1], norms[..., 1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(previous) - np.log(current)
    logs = np.where(previous <= 0.0, -np.inf, logs)  # only an exact zero, as compute_log_gains
    logs = np.where(current <= eps, np.inf, logs)
    return np.where(np.isnan(previous) | np.isnan(current), np.nan, logs)


def category_masks(
    gains: np.ndarray, damping_threshold: float = 0.5, amplifying_threshold: float = 2.0
) -> dict[Category, np.ndarray]:
    """One boolean array per :class:`~lightning_gradwatch.numerics.norms.Category` (they partition ``gains``)."""
    missing = np.isnan(gains)
    vanishing = np.isinf(gains)
    finite = ~missing & ~vanishing
    amplifying = finite & (gains > amplifying_threshold)
    damping = finite & (gains < damping_threshold)
    return {
        Category.AMPLIFYING: amplifying,
        Category.DAMPING: damping,
        Category.HEALTHY: finite & ~amplifying & ~damping,
        Category.VANISHING: vanishing,
        Category.MISSING: missing,
    }
