"""The update-ratio check (``log_updates=True``): blocks whose update-to-weight ratio
``||theta_after - theta_before|| / ||theta_before||`` sits outside ``[1e-4, 1e-2]`` on most of the
measured steps kept.

The range brackets the rule of thumb of about 1e-3 per step: Karpathy's "update:data ratio"
(makemore part 3, "Building makemore Part 3: Activations & Gradients, BatchNorm", 2022: log10 of
the ratio near -3 for every layer), the per-layer trust ratio ||w|| / ||update|| that LARS (You et
al. 2017, "Large Batch Training of Convolutional Networks") and LAMB (You et al. 2019, "Large Batch
Optimization for Deep Learning") rescale each layer's step by. Far above, the learning rate is too
high for that layer (or a warm-up is missing); far below, the layer barely learns (a learning rate
too low for it, weight decay holding large weights, or a gradient that does not reach it).

Pure: floats and names in, a finding out.
"""

from __future__ import annotations

import statistics
from typing import Optional

from lightning_gradwatch.diagnosis.findings import Finding, FlowSummary, fmt, short_list
from lightning_gradwatch.diagnosis.run_history import RunHistory

__all__ = ["UPDATE_MOST", "UPDATE_RATIO_HIGH", "UPDATE_RATIO_LOW", "update_ratio_range"]

#: The usual range of a block's update ratio per step (around 1e-3).
UPDATE_RATIO_LOW = 1e-4
UPDATE_RATIO_HIGH = 1e-2
#: Share of a block's measured steps outside the range that makes it "most of the run".
UPDATE_MOST = 0.5
#: A warm-up is suggested when the first third of the steps' median ratio exceeds the last
#: third's by this factor.
_WARMUP_FACTOR = 3.0


def _block_ratios(history: RunHistory) -> dict[str, list[float]]:
    """Each block's measured update ratios over the kept steps, in step order."""
    out: dict[str, list[float]] = {}
    for row in history.steps:
        for name, value in zip(history.block_names, row.update_ratios):
            if value is not None:
                out.setdefault(name, []).append(value)
    return out


#: One block out of range: name, median ratio, steps out of range, steps measured.
_Entry = tuple[str, float, int, int]


def _out_of_range(history: RunHistory) -> tuple[list[_Entry], list[_Entry], list[str]]:
    """The blocks above the range on most steps, those below it, and those of the first kind
    whose ratios are largest early on (a warm-up would help)."""
    high: list[_Entry] = []
    low: list[_Entry] = []
    warmup: list[str] = []
    for name, values in _block_ratios(history).items():
        n, median = len(values), statistics.median(values)
        above = sum(1 for v in values if v > UPDATE_RATIO_HIGH)
        below = sum(1 for v in values if v < UPDATE_RATIO_LOW)
        if above > UPDATE_MOST * n:
            high.append((name, median, above, n))
            third = max(1, n // 3)
            early, late = statistics.median(values[:third]), statistics.median(values[-third:])
            if n >= 3 and early > _WARMUP_FACTOR * late:
                warmup.append(name)
        elif below > UPDATE_MOST * n:
            low.append((name, median, below, n))
    return high, low, warmup


def _suggestions(high: list[_Entry], low: list[_Entry], warmup: list[str]) -> list[str]:
    suggestions = []
    if high:
        names = short_list([name for name, *_ in high], 4)
        warm = (
            f"; the ratios of {short_list(warmup, 4)} are largest early on: add a learning-rate "
            "warm-up"
            if warmup
            else ""
        )
        suggestions.append(
            f"lower the learning rate for {names} (a parameter group with its own lr), or use a "
            f"per-layer trust ratio (LAMB/LARS){warm}"
        )
    if low:
        names = short_list([name for name, *_ in low], 4)
        suggestions.append(
            f"raise the learning rate for {names}, or lower their weight decay (it holds large "
            "weights that small steps barely move); check that their gradient reaches them"
        )
    return suggestions


def update_ratio_range(history: RunHistory, s: FlowSummary) -> Optional[Finding]:
    """Blocks whose update ratio is above 1e-2, or below 1e-4, on most measured steps."""
    high, low, warmup = _out_of_range(history)
    if not high and not low:
        return None
    sides = ((high, "above", UPDATE_RATIO_HIGH), (low, "below", UPDATE_RATIO_LOW))
    evidence = [
        f"{name}: median update ratio {fmt(median)}, {side} {fmt(bound)} on {k} of {n} "
        "measured step(s)"
        for entries, side, bound in sides
        for name, median, k, n in entries[:6]
    ]
    evidence.append(
        "the usual range is about 1e-3 per step (between 1e-4 and 1e-2): the size of each step "
        "relative to the weights it changes"
    )
    counts = [n for *_, n in high + low]
    shares = [k / n for *_, k, n in high + low]
    confidence = "high" if min(counts) >= 10 and min(shares) >= 0.9 else "medium"
    confidence = confidence if min(counts) >= 3 else "low"
    title = (
        "Updates too large for the weights in some blocks (learning rate too high there)"
        if high and not low
        else "Updates too small for the weights in some blocks (they barely learn)"
        if low and not high
        else "Update-to-weight ratios outside the usual range in several blocks"
    )
    return Finding(
        "update_ratio_range",
        title,
        confidence,
        evidence,
        _suggestions(high, low, warmup),
        blocks=[name for name, *_ in high + low],
        figures={
            "low": UPDATE_RATIO_LOW,
            "high": UPDATE_RATIO_HIGH,
            "median_ratios": {name: median for name, median, *_ in high + low},
        },
    )
