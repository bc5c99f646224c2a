"""Running statistics of one figure for ``zscore`` rules: a rolling window of the last values, or
exponential moving averages (ZClip). Pure Python floats; state as plain lists and dicts."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

from lightning_gradwatch.keys import DEFAULT_EPS

__all__ = ["Band", "EmaStatistics", "RollingWindow", "RunningStatistics", "restore_statistics"]

#: What a statistics object's ``state_dict`` is: a window's values, or an EMA's fields.
StatisticsState = Union[list[float], dict[str, Any]]


@dataclass(frozen=True)
class Band:
    """The mean and standard deviation a value is compared with."""

    mean: float
    std: float

    @property
    def _floor(self) -> float:
        # Below this the std is rounding noise: the values were constant.
        return 1e-12 * max(abs(self.mean), DEFAULT_EPS)

    def zscore(self, value: float) -> float:
        """``(value - mean) / std``; above a constant history ``inf``, at or below it 0."""
        if self.std <= self._floor:
            return math.inf if value - self.mean > self._floor else 0.0
        return (value - self.mean) / self.std

    def upper(self, zscore: float) -> float:
        """``mean + zscore * std``: the largest value that does not trip ``zscore``."""
        return self.mean + zscore * self.std


class RunningStatistics(Protocol):
    """What a ``zscore`` rule keeps per key: values seen, a :class:`Band`, a plain state."""

    def __len__(self) -> int: ...

    def append(self, value: float) -> None: ...

    def band(self) -> Band: ...

    def state_dict(self) -> StatisticsState: ...


class RollingWindow:
    """The last ``size`` accepted values; population mean and standard deviation over them."""

    def __init__(self, size: int, values: Iterable[float] = ()) -> None:
        self.values: deque[float] = deque(values, maxlen=size)

    def __len__(self) -> int:
        return len(self.values)

    def append(self, value: float) -> None:
        self.values.append(value)

    def band(self) -> Band:
        return _band(self.values)

    def state_dict(self) -> list[float]:
        return list(self.values)


class EmaStatistics:
    """Exponential moving averages of the mean and variance, as ZClip keeps them (O(1) state).

    The first ``warmup`` values are kept and give the initial mean and (population) variance; each
    later value ``g`` updates ``mean = alpha * mean + (1 - alpha) * g``, then
    ``var = alpha * var + (1 - alpha) * (g - mean)**2`` with the updated mean (ZClip's order).
    """

    def __init__(self, alpha: float, warmup: int) -> None:
        self.alpha = alpha
        self.warmup = warmup
        self.count = 0
        self.mean = math.nan
        self.var = math.nan
        self.pending: list[float] = []  # the first values, until there are `warmup` of them

    def __len__(self) -> int:
        return self.count

    def append(self, value: float) -> None:
        self.count += 1
        if self.count <= self.warmup:
            self.pending.append(value)
            if self.count == self.warmup:
                band = _band(self.pending)
                self.mean, self.var, self.pending = band.mean, band.std**2, []
            return
        self.mean = self.alpha * self.mean + (1 - self.alpha) * value
        self.var = self.alpha * self.var + (1 - self.alpha) * (value - self.mean) ** 2

    def band(self) -> Band:
        if self.count < self.warmup:
            return _band(self.pending)
        return Band(self.mean, math.sqrt(self.var))

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "var": self.var, "pending": self.pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        self.mean = float(state.get("mean", math.nan))
        self.var = float(state.get("var", math.nan))
        self.pending = [float(v) for v in state.get("pending", [])]


def restore_statistics(
    window: Optional[int], alpha: Optional[float], warmup: int, state: Optional[StatisticsState]
) -> RunningStatistics:
    """New statistics for a rule (``window`` or ``alpha`` set), filled from a saved ``state``.

    A saved list of values (a window's state) fills either kind, value by value; an EMA's dict
    only an EMA.
    """
    stats: RunningStatistics
    if alpha is not None:
        stats = EmaStatistics(alpha, warmup)
        if isinstance(state, dict):
            stats.load_state_dict(state)
            return stats
    else:
        assert window is not None, "a rule keeps a window or an EMA"
        stats = RollingWindow(window)
    for value in state if isinstance(state, list) else ():
        stats.append(float(value))
    return stats


def _band(values: Iterable[float]) -> Band:
    values = list(values)
    n = len(values)
    if n == 0:
        return Band(math.nan, math.nan)
    mean = sum(values) / n
    return Band(mean, math.sqrt(sum((v - mean) ** 2 for v in values) / n))
