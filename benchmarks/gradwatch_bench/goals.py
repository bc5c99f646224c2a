"""The overhead goals and their verdicts: met, not met, or not measurable at this noise.

A figure is a median over the rounds with its 95 % bootstrap CI (:mod:`gradwatch_bench.stats`), so
the noise level is the spread of the repeated measurements the harness takes: a cost whose CI
reaches zero or below is not told apart from no cost at all. A ratio built on such a cost (it can
even come out negative) is reported as not measurable at this noise, with the CIs, never as met.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: How a goal is measured: the figure's name, its statistic and the 95 % CI of that statistic.
MEASURES = (
    ("own time", "own_median_ms", "own_ci"),
    ("paired wall Δ", "delta_ms", "delta_ci"),
    ("paired CPU Δ", "cpu_delta_ms", "cpu_delta_ci"),
)

MET, NOT_MET, NOISE = "met", "not met", "not measurable at this noise"


def resolved(ci: Sequence[float]) -> bool:
    """Whether a cost stands out of the noise: the 95 % bootstrap CI of its median over the rounds
    (the spread of the repeated measurements) lies above zero. A cost whose CI reaches zero or below
    is at the noise level: a ratio built on it says nothing (it may even be negative)."""
    return len(ci) == 2 and all(math.isfinite(x) for x in ci) and ci[0] > 0


def verdict(interval: Sequence[float], limit: float, at_least: bool = False) -> str:
    """``MET`` when the whole interval meets the limit, ``NOT_MET`` when none of it does, else
    ``NOISE`` (the spread straddles the limit)."""
    ok = [x >= limit if at_least else x <= limit for x in interval]
    return MET if all(ok) else NOT_MET if not any(ok) else NOISE


def judge(
    num: tuple[float, Sequence[float]],
    den: tuple[float, Sequence[float]],
    limit: float,
    at_least: bool = False,
    den_exact: bool = False,
) -> dict[str, Any]:
    """The verdict on ``num / den`` against ``limit``, each figure a ``(median, 95 % CI)`` pair.

    Both figures must stand out of the noise (:func:`resolved`; ``den_exact``: the denominator is
    taken as exact, e.g. the baseline step); then the ratio's interval runs from the smallest to the
    largest ratio the two CIs allow and decides the verdict. Otherwise the verdict is ``NOISE``,
    never met, with no interval: the spread is the figures' own CIs.
    """
    (top, top_ci), (bottom, bottom_ci) = num, den
    value = top / bottom if bottom else math.nan
    measurable = resolved(top_ci) and resolved((bottom, bottom) if den_exact else bottom_ci)
    if not measurable:
        return {"value": value, "interval": None, "verdict": NOISE, "met": None}
    low, high = (bottom, bottom) if den_exact else (bottom_ci[0], bottom_ci[1])
    interval = (top_ci[0] / high, top_ci[1] / low)
    decided = verdict(interval, limit, at_least)
    return {
        "value": value,
        "interval": interval,
        "verdict": decided,
        "met": None if decided == NOISE else decided == MET,
    }


def goals(model: dict[str, Any]) -> list[dict[str, Any]]:
    """The overhead goals, each by own time and by the paired wall-clock and CPU-time differences,
    each with its verdict (:func:`judge`): met, not met, or not measurable at this noise."""
    s = model["stats"]
    out: list[dict[str, Any]] = []

    def figure(name: str, key: str, ci: str) -> tuple[float, Sequence[float]]:
        return s[name][key], s[name].get(ci, (math.nan, math.nan))

    def add(
        goal: str, how: str, limit: float, spread: dict[str, Any], judged: dict[str, Any]
    ) -> None:
        out.append(
            {"model": model["name"], "goal": goal, "limit": limit, "how": how}
            | judged
            | {"spread": spread}
        )

    def ratio(goal: str, num: str, den: str, limit: float, at_least: bool = False) -> None:
        if num not in s or den not in s:
            return
        for how, key, ci in MEASURES:
            top, bottom = figure(num, key, ci), figure(den, key, ci)
            spread = {num: top[1], den: bottom[1]}
            add(goal, how, limit, spread, judge(top, bottom, limit, at_least))

    for measured in ("measured", "measured_no_stats"):
        ratio(f"{measured} / (floor + block norms)", measured, "floor_blocks", 1.5)
        ratio(f"built-in / {measured} (at least)", "builtin", measured, 5.0, at_least=True)
    ratio("governance / floor", "governance", "floor", 1.2)
    if "unmeasured" in s:
        base = s["baseline"]["median_ms"]
        for how, key, ci in MEASURES:
            top = figure("unmeasured", key, ci)
            judged = judge(top, (base / 100, ()), 0.5, den_exact=True)
            add("unmeasured step cost, % of the step", how, 0.5, {"unmeasured": top[1]}, judged)
    return out
