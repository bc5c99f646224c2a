"""What the rules read from one step's :class:`~lightning_gradwatch.measure.record.GradientMeasurement`:
the values by key, whether anything was non-finite, and where a NaN/Inf started."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

from lightning_gradwatch.keys import LOSS, TOTAL_NORM_KEY
from lightning_gradwatch.measure.nonfinite import NonFiniteReport, locate_nonfinite
from lightning_gradwatch.measure.record import GradientMeasurement

__all__ = ["has_nonfinite", "nonfinite_report", "rule_values"]


def rule_values(
    measurement: GradientMeasurement, measured: bool, total_key: str = TOTAL_NORM_KEY
) -> dict[str, float]:
    """The logged figures (an unmeasured step knows the total norm only, under ``total_key``, so
    nothing else may match there) and ``"loss"``."""
    values = dict(measurement.metrics) if measured else {total_key: measurement.total_norm}
    if not measurement.grads_measured:  # no parameter has a gradient: there is no total norm
        values.pop(total_key, None)
    if measurement.loss is not None:
        values[LOSS] = measurement.loss
    return values


def has_nonfinite(
    measurement: GradientMeasurement, measured: bool, params_measured: bool
) -> Optional[bool]:
    """A NaN/Inf in a parameter or block-output gradient or in the loss (``None``: unknown, the
    gradients are measured neither here nor by parameter, and the loss is finite or unread)."""
    loss = measurement.loss
    bad_loss = loss is not None and not math.isfinite(loss)
    if not (measured or params_measured):
        return True if bad_loss else None
    # Per parameter, not the total: with no gradient at all the total is NaN too.
    bad_params = bool(measurement.nonfinite_params)
    return bad_loss or bad_params or bool(measurement.nonfinite_blocks)


def nonfinite_report(
    block_names: Sequence[str], measurement: GradientMeasurement
) -> Optional[NonFiniteReport]:
    """Where a NaN/Inf in this rank's gradients or loss started (``None``: there is none)."""
    params = list(measurement.nonfinite_params)
    loss = measurement.loss
    bad_loss = None if loss is None else not math.isfinite(loss)
    if not (params or measurement.nonfinite_blocks or bad_loss):
        return None
    measured = bool(measurement.block_names)
    return locate_nonfinite(
        block_names,
        params,
        measurement.block_norms if measured else None,
        bad_loss,
        chained=measurement.chained if measured else None,
    )
