"""What a finding is, and the run's history boiled down to what the checks compare.

A :class:`Finding` names a problem, gives the evidence (sentences with the numbers, plus the numbers
themselves), says how sure it is (``low`` / ``medium`` / ``high``) and suggests one or two changes.
:func:`summarize` reduces a :class:`~lightning_gradwatch.diagnosis.run_history.RunHistory` to medians
over the measured steps kept (the recent window: per transition, end to end, total norm, zero
fraction): medians, because one odd step must not make or hide a finding.

Pure: floats and names in, dataclasses out (no tensors, no Lightning).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_gradwatch.diagnosis.run_history import RunHistory
from lightning_gradwatch.numerics.norms import (
    Category,
    classify_gain,
    compute_gains,
    end_to_end_gain,
)

__all__ = [
    "Finding",
    "FlowSummary",
    "diagnosis_dict",
    "fmt",
    "format_findings",
    "healthy_summary",
    "quantile",
    "short_list",
    "summarize",
]


@dataclass
class Finding:
    """One diagnosis: what looks wrong, why we think so, and what to change.

    Attributes:
        name: stable identifier (``"vanishing_flow"``, ``"exploding_flow"``, ...).
        title: one line for people.
        confidence: ``"low"``, ``"medium"`` or ``"high"``.
        evidence: sentences, each with the numbers and blocks that support the finding.
        suggestions: one or two changes to try, most promising first.
        blocks: the blocks (or parameters) concerned.
        figures: the supporting numbers, machine-readable.

    Example::

        for finding in diagnose(history):
            print(finding.text())
    """

    name: str
    title: str
    confidence: str
    evidence: list[str]
    suggestions: list[str]
    blocks: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def text(self, indent: str = "  ") -> str:
        """The finding on a few lines: title with confidence, evidence, suggestions."""
        lines = [f"{indent}[{self.confidence}] {self.title} ({self.name})"]
        lines += [f"{indent}  evidence: {line}" for line in self.evidence]
        lines += [f"{indent}  try: {line}" for line in self.suggestions]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "confidence": self.confidence,
            "evidence": list(self.evidence),
            "suggestions": list(self.suggestions),
            "blocks": list(self.blocks),
            "figures": dict(self.figures),
        }


@dataclass
class FlowSummary:
    """Medians over the measured steps kept (the window of the last ones).

    Attributes:
        steps: measured steps seen (all of them); ``window``: those in the window, whose range is
            ``first`` .. ``last``.
        transitions: the block each transition goes into (``block_names[1:]``).
        gains: per transition, the median gain (``inf``: no gradient at the block's output;
            ``None``: never measured).
        categories: the category of each median gain.
        end_to_end: median of first block norm / last block norm (``None``: never measured).
        totals: the window's finite total norms, in step order; ``infinite_totals``: how many were
            inf; ``early_totals``: the finite total norms of the run's first measured steps.
        zero_fraction: median of ``grad_stats/zero_fraction`` (``None``: not measured).
        noise: ``(b_simple, batch size, how many measured steps had both)`` at the last measured
            step with a gradient noise scale (``None``: never measured).
    """

    steps: int
    window: int
    first: Optional[int]
    last: Optional[int]
    transitions: list[str]
    gains: list[Optional[float]]
    categories: list[Category]
    end_to_end: Optional[float]
    totals: list[float]
    infinite_totals: int
    zero_fraction: Optional[float]
    early_totals: list[float] = field(default_factory=list)
    noise: Optional[tuple[float, float, int]] = None

    def count(self, *categories: Category) -> int:
        return sum(1 for category in self.categories if category in categories)

    @property
    def span(self) -> str:
        """``"12 measured step(s) (0 .. 550)"`` or ``"the last 32 of 400 measured steps (...)"``."""
        where = f"({self.first} .. {self.last})"
        if self.window < self.steps:
            return f"the last {self.window} of {self.steps} measured steps {where}"
        return f"{self.steps} measured step(s) {where}"

    @property
    def present(self) -> int:
        """Transitions with a gain (not missing)."""
        return len(self.categories) - self.count(Category.MISSING)

    def gain_list(self, limit: int = 6) -> str:
        """``blocks.1 0.112, blocks.2 0.105, ...``: the median gains of present transitions."""
        pairs = [
            f"{name} {fmt(gain)}"
            for name, gain in zip(self.transitions, self.gains)
            if gain is not None
        ]
        return short_list(pairs, limit)


def summarize(history: RunHistory) -> FlowSummary:
    """Reduce ``history`` to medians (see :class:`FlowSummary`)."""
    settings = history.settings
    per_transition: list[list[float]] = [[] for _ in history.block_names[1:]]
    end_to_end: list[float] = []
    for row in history.steps:
        for values, gain in zip(per_transition, compute_gains(row.block_norms, settings.eps)):
            if gain is not None and not math.isnan(gain):
                values.append(gain)
        e2e = end_to_end_gain(row.block_norms, settings.eps)
        if not math.isnan(e2e):
            end_to_end.append(e2e)
    gains = [statistics.median(values) if values else None for values in per_transition]
    totals = [row.total_norm for row in history.steps if row.total_norm is not None]
    zeros = [row.zero_fraction for row in history.steps if row.zero_fraction is not None]
    steps = [row.step for row in history.steps]
    return FlowSummary(
        steps=history.measured,
        window=len(history.steps),
        first=steps[0] if steps else None,
        last=steps[-1] if steps else None,
        transitions=list(history.block_names[1:]),
        gains=gains,
        categories=[
            classify_gain(gain, settings.damping_threshold, settings.amplifying_threshold)
            for gain in gains
        ],
        end_to_end=statistics.median(end_to_end) if end_to_end else None,
        totals=[t for t in totals if math.isfinite(t)],
        infinite_totals=sum(1 for t in totals if not math.isfinite(t)),
        zero_fraction=statistics.median(zeros) if zeros else None,
        early_totals=[
            row.total_norm
            for row in history.first
            if row.total_norm is not None and math.isfinite(row.total_norm)
        ],
        noise=_noise(history),
    )


def _noise(history: RunHistory) -> Optional[tuple[float, float, int]]:
    pairs = [
        (row.noise_scale, row.batch_size)
        for row in history.steps
        if row.noise_scale is not None and row.batch_size is not None
    ]
    return (*pairs[-1], len(pairs)) if pairs else None


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation, like ``numpy.quantile``)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def fmt(value: Optional[float]) -> str:
    """Three significant digits (``n/a`` for ``None``)."""
    return "n/a" if value is None else f"{value:.3g}"


def short_list(items: Sequence[str], limit: int = 6) -> str:
    """``a, b, c, ... (+n)``."""
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit})" if len(items) > limit else "")


def healthy_summary(history: RunHistory, summary: Optional[FlowSummary] = None) -> str:
    """What the history shows when no check found anything: the numbers behind "looks healthy"."""
    s = summary or summarize(history)
    if s.steps == 0:
        return "No measured step yet: nothing to diagnose."
    span = s.span
    if not s.transitions:
        watched = "Only one block is" if history.block_names else "No block is"
        return f"{watched} watched: no transition to judge over {span}."
    finite = [g for g in s.gains if g is not None and math.isfinite(g)]
    counts = ", ".join(f"{s.count(c)} {c.value}" for c in Category if s.count(c))
    parts = [
        f"No problem found over {span}.",
        f"Median end-to-end gain {fmt(s.end_to_end)} (first block / last block);",
        f"{len(s.transitions)} transitions: {counts}"
        + (f" (median gains {fmt(min(finite))} .. {fmt(max(finite))});" if finite else ";"),
    ]
    if s.zero_fraction is not None:
        parts.append(f"gradient zero fraction {s.zero_fraction:.1%};")
    if s.totals:
        parts.append(f"median total norm {fmt(quantile(s.totals, 0.5))}.")
    if s.noise is not None:
        parts.append(f"Gradient noise scale {fmt(s.noise[0])} at a batch of {fmt(s.noise[1])}.")
    bounds = history.settings.clip_bounds
    if bounds and s.totals:
        over = sum(1 for t in s.totals if t > min(b.threshold for b in bounds))
        parts.append(f"Clipping acted on {over} of {len(s.totals)} measured step(s).")
    return "Gradient flow looks healthy by these figures. " + " ".join(parts)


def format_findings(
    findings: Sequence[Finding], history: RunHistory, markdown: bool = False
) -> str:
    """The findings (or the healthy summary) as text, or as Markdown for TensorBoard's TEXT tab."""
    if not findings:
        return healthy_summary(history)
    if not markdown:
        return "\n".join(finding.text() for finding in findings)
    lines = []
    for finding in findings:
        lines.append(f"**{finding.title}** ({finding.name}, confidence: {finding.confidence})")
        lines += [f"- evidence: {line}" for line in finding.evidence]
        lines += [f"- try: {line}" for line in finding.suggestions]
        lines.append("")
    return "\n".join(lines)


def diagnosis_dict(findings: Sequence[Finding], history: RunHistory) -> dict[str, Any]:
    """``{"findings": [...], "healthy": bool, "summary": str}`` (the report's ``"diagnosis"``)."""
    return {
        "healthy": not findings,
        "summary": format_findings(findings, history) if not findings else "",
        "measured_steps": history.measured,
        "findings": [finding.to_dict() for finding in findings],
    }
