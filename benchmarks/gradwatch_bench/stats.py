"""Statistics over the timed steps: medians, paired differences to the baseline with a bootstrap
confidence interval, and the derived "every 50 steps" variants."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class StepRecord:
    """One timed step of one variant in one round (milliseconds)."""

    variant: str
    round: int
    wall_ms: float
    cpu_ms: float
    own_ms: float


def bootstrap_ci(values: Sequence[float], seed: int, n: int = 2000) -> tuple[float, float]:
    """95 % bootstrap confidence interval of the median."""
    if len(values) < 2:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return medians[int(0.025 * n)], medians[int(0.975 * n) - 1]


@dataclass
class VariantStats:
    name: str
    steps: int
    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    delta_ms: float
    delta_ci: tuple[float, float]
    delta_min: float
    delta_max: float
    ratio: float
    cpu_delta_ms: float
    own_median_ms: float
    own_mean_ms: float
    #: 95 % bootstrap CIs of the paired CPU-time difference and of the own time (medians over the
    #: rounds): the spread the goals' verdicts weigh (``writer.goals``). Defaults for results
    #: written before they were recorded; :func:`summarize` always fills them.
    cpu_delta_ci: tuple[float, float] = (math.nan, math.nan)
    own_ci: tuple[float, float] = (math.nan, math.nan)
    derived: bool = False


def summarize(records: Sequence[StepRecord], seed: int) -> dict[str, VariantStats]:
    by_variant: dict[str, dict[int, StepRecord]] = {}
    for record in records:
        by_variant.setdefault(record.variant, {})[record.round] = record
    base = by_variant.get("baseline", {})
    base_median = statistics.median(r.wall_ms for r in base.values()) if base else math.nan
    out: dict[str, VariantStats] = {}
    for name, rounds in by_variant.items():
        walls = [r.wall_ms for r in rounds.values()]
        paired = [(r, base[k]) for k, r in rounds.items() if k in base]
        deltas = [r.wall_ms - b.wall_ms for r, b in paired]
        cpu_deltas = [r.cpu_ms - b.cpu_ms for r, b in paired]
        own = [r.own_ms for r in rounds.values()]
        delta = statistics.median(deltas) if deltas else math.nan
        out[name] = VariantStats(
            name=name,
            steps=len(walls),
            median_ms=statistics.median(walls),
            mean_ms=statistics.fmean(walls),
            min_ms=min(walls),
            max_ms=max(walls),
            delta_ms=delta,
            delta_ci=bootstrap_ci(deltas, seed),
            delta_min=min(deltas) if deltas else math.nan,
            delta_max=max(deltas) if deltas else math.nan,
            ratio=1.0 + delta / base_median if base_median else math.nan,
            cpu_delta_ms=statistics.median(cpu_deltas) if cpu_deltas else math.nan,
            own_median_ms=statistics.median(own),
            own_mean_ms=statistics.fmean(own),
            cpu_delta_ci=bootstrap_ci(cpu_deltas, seed),
            own_ci=bootstrap_ci(own, seed),
        )
    for cheap in ("unmeasured", "governance"):
        if cheap in out and "measured" in out:
            out[f"every50_{cheap}"] = _derived(out[cheap], out["measured"], 50, base_median)
    return out


def _derived(cheap: VariantStats, measured: VariantStats, n: int, base: float) -> VariantStats:
    def mix(a: float, b: float) -> float:
        return ((n - 1) * a + b) / n

    def mix_ci(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
        return (mix(a[0], b[0]), mix(a[1], b[1]))

    delta = mix(cheap.delta_ms, measured.delta_ms)
    return VariantStats(
        name=f"every{n}_{cheap.name}",
        steps=0,
        median_ms=mix(cheap.median_ms, measured.median_ms),
        mean_ms=mix(cheap.mean_ms, measured.mean_ms),
        min_ms=math.nan,
        max_ms=math.nan,
        delta_ms=delta,
        delta_ci=mix_ci(cheap.delta_ci, measured.delta_ci),
        delta_min=math.nan,
        delta_max=math.nan,
        ratio=1.0 + delta / base,
        cpu_delta_ms=mix(cheap.cpu_delta_ms, measured.cpu_delta_ms),
        own_median_ms=mix(cheap.own_median_ms, measured.own_median_ms),
        own_mean_ms=mix(cheap.own_mean_ms, measured.own_mean_ms),
        cpu_delta_ci=mix_ci(cheap.cpu_delta_ci, measured.cpu_delta_ci),
        own_ci=mix_ci(cheap.own_ci, measured.own_ci),
        derived=True,
    )
