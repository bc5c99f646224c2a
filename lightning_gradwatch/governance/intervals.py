"""What governance logs: its counters and thresholds, and what happened between two measured steps
(the maximum and mean of the figures the every-step check computed, so a spike between two logged
points still shows on the chart). Host floats only."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from lightning_gradwatch.keys import LOSS_KEY, interval_max_key, interval_mean_key

if TYPE_CHECKING:
    from lightning_gradwatch.governance.engine import Check, RuleEngine
    from lightning_gradwatch.measure.record import GradientMeasurement

__all__ = ["IntervalAggregates", "governance_keys"]


class IntervalAggregates:
    """Count, sum and maximum of each figure since the last :meth:`flush`.

    Non-finite values are left out (an AMP-skipped step's overflow, a NaN the ``nonfinite`` rule
    records), so one of them does not blank a whole interval.

    Example::

        interval = IntervalAggregates()
        interval.add("grad_norm_total", 1.0)
        interval.add("grad_norm_total", 3.0)
        interval.flush()  # {"grad_norm_total_max": 3.0, "grad_norm_total_mean": 2.0}
    """

    def __init__(self) -> None:
        self._figures: dict[str, list[float]] = {}  # key -> [count, sum, max]

    def add(self, key: str, value: float) -> None:
        if not math.isfinite(value):
            return
        entry = self._figures.setdefault(key, [0.0, 0.0, -math.inf])
        entry[0] += 1
        entry[1] += value
        entry[2] = max(entry[2], value)

    def flush(self) -> dict[str, float]:
        """``<key>_max`` and ``<key>_mean`` of every figure seen since the last flush; starts over."""
        out: dict[str, float] = {}
        for key, (count, total, peak) in self._figures.items():
            if count > 0:
                out[interval_max_key(key)] = peak
                out[interval_mean_key(key)] = total / count
        # Keys stay (reset in place): the same small dict for the whole run.
        for entry in self._figures.values():
            entry[:] = [0.0, 0.0, -math.inf]
        return out

    def state_dict(self) -> dict[str, list[float]]:
        return {key: list(entry) for key, entry in self._figures.items()}

    def load_state_dict(self, state: Mapping[str, list[float]]) -> None:
        self._figures = {key: [float(v) for v in entry] for key, entry in state.items()}

    def add_step(self, measurement: GradientMeasurement, total_key: str, reads_loss: bool) -> None:
        """Keep what a checked step computed (its total norm under ``total_key``, and its loss when
        a rule reads it) for the next measured step's max and mean."""
        if measurement.grads_measured:
            self.add(total_key, measurement.total_norm)
        if reads_loss and measurement.loss is not None:
            self.add(LOSS_KEY, measurement.loss)


def governance_keys(
    engine: RuleEngine,
    interval: IntervalAggregates,
    measurement: GradientMeasurement,
    checks: list[Check],
    *,
    measured: bool,
    tripped: bool,
) -> dict[str, float]:
    """Counters and thresholds on measured steps (every one, so charts are continuous) and on
    steps where something tripped; the interval's max/mean and the loss on measured steps."""
    if measurement.skipped_by_scaler:  # not logged (unless halted): the interval goes on
        return engine.counters() if tripped else {}
    if not (measured or tripped):
        return {}
    keys = {**engine.counters(), **engine.clip_thresholds(checks)}
    if measured:
        keys.update(interval.flush())
        if engine.reads_loss and measurement.loss is not None:
            keys[LOSS_KEY] = measurement.loss
    return keys
