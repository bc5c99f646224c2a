"""Deciding: one step's values and the rules' state in, which rules tripped and what to do out.

Pure Python on plain floats: no tensors, no I/O, no Lightning, so every rank that sees the same
values and the same agreed trips keeps the same state and takes the same decisions.
:meth:`RuleEngine.evaluate` checks the rules (no state change); the caller agrees with the other ranks
on what tripped; :meth:`RuleEngine.commit` updates statistics and patience from that agreed answer and
returns the decisions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_gradwatch.governance.rule_set import rule_labels
from lightning_gradwatch.governance.rules import ACTIONS, NO_ACTION, Rule
from lightning_gradwatch.governance.statistics import Band, RunningStatistics, restore_statistics
from lightning_gradwatch.keys import LOSS, NONFINITE, alert_key, clip_threshold_key

__all__ = ["Check", "Decision", "RuleEngine", "Violation", "strongest"]


@dataclass
class Violation:
    """One key of one rule that tripped: its value and the bound it crossed."""

    key: str
    value: float
    threshold: Optional[float]
    condition: str  # "min", "max", "zscore" or "nonfinite"
    zscore: Optional[float] = None


@dataclass
class Check:
    """A rule evaluated at one step on this rank (nothing committed yet).

    ``bars`` holds, for an adaptive clip rule, the bound in force per key: ``mean + zscore * std``
    once warm, capped by ``max`` (only ``max`` before that).
    """

    index: int
    rule: Rule
    values: dict[str, float]  # every matched key and its value
    violations: list[Violation]
    bars: dict[str, float] = field(default_factory=dict)

    @property
    def tripped(self) -> bool:
        return bool(self.violations)

    @property
    def worst(self) -> Optional[Violation]:
        return max(self.violations, key=_severity) if self.violations else None


def _severity(violation: Violation) -> float:
    if not math.isfinite(violation.value):
        return math.inf
    if violation.zscore is not None:
        return violation.zscore
    return abs(violation.value - (violation.threshold or 0.0))


@dataclass
class Decision:
    """A rule that tripped at one step (agreed across ranks) and what to do about it."""

    rule: Rule
    step: int
    check: Check
    consecutive: int  # trips in a row, this one included
    patience: int
    action: str  # the rule's action, or NO_ACTION while patience is not reached / scaler handles it
    ranks: list[int] = field(default_factory=list)
    count: int = 0  # the rule's trips so far, this one included
    clip_to: Optional[float] = None  # a clip rule's target (`clip_to`, or the adaptive bar)

    @property
    def acts(self) -> bool:
        return self.action != NO_ACTION


class RuleEngine:
    """Evaluate :class:`~lightning_gradwatch.governance.rules.Rule` objects on one step's values and
    keep their state: running statistics per (rule, key) for ``zscore`` rules, and a
    consecutive-trip counter and a trip count per rule (:meth:`state_dict`).

    Example::

        engine = RuleEngine([Rule("grad_norm_total", max=5.0)])
        checks = engine.evaluate({"grad_norm_total": 7.0}, nonfinite=False)
        decisions = engine.commit(checks, tripped=[c.tripped for c in checks], step=0)
    """

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)
        self.labels = rule_labels(self.rules)
        self.statistics: list[dict[str, RunningStatistics]] = [{} for _ in self.rules]
        self.consecutive = [0] * len(self.rules)
        self.counts = [0] * len(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def checks_before_step(self) -> bool:
        """Whether any rule reads figures known before the update (not only update figures)."""
        return any(not rule.after_step for rule in self.rules)

    @property
    def needs_every_step(self) -> bool:
        """Whether any rule runs on every check step (not only on measured steps)."""
        return any(rule.checks_every_step for rule in self.rules)

    @property
    def reads_loss(self) -> bool:
        """Whether any rule watches the loss."""
        return any(rule.metric == LOSS for rule in self.rules)

    def evaluate(
        self,
        values: Mapping[str, float],
        *,
        nonfinite: Optional[bool],
        measured: bool = True,
        after_step: bool = False,
    ) -> list[Check]:
        """Check every applicable rule against ``values`` (key -> value); no state changes.

        ``nonfinite`` is whether any gradient (or the loss) held a NaN/Inf (``None``: unknown,
        ``nonfinite`` rules are not checked). On an unmeasured step (``measured=False``) only rules
        that run on every step are checked, whatever keys ``values`` holds. ``after_step``: the
        update figures, after the optimizer step (only the rules on them; else only the others).
        """
        checks = []
        for index, rule in enumerate(self.rules):
            if rule.after_step != after_step:
                continue
            if measured or rule.checks_every_step:
                check = self._check(index, rule, values, nonfinite)
                if check is not None:
                    checks.append(check)
        return checks

    def _check(
        self, index: int, rule: Rule, values: Mapping[str, float], nonfinite: Optional[bool]
    ) -> Optional[Check]:
        if rule.is_nonfinite:
            if nonfinite is None:
                return None
            violations = [Violation(NONFINITE, 1.0, None, NONFINITE)] if nonfinite else []
            return Check(index, rule, {NONFINITE: float(nonfinite)}, violations)
        matched = {key: value for key, value in values.items() if rule.matches(key)}
        if not matched:
            return None
        check = Check(index, rule, matched, [])
        for key, value in matched.items():
            band = self._band(index, rule, key)
            violation = _violation(rule, key, value, band)
            if violation is not None:
                check.violations.append(violation)
            bar = _bar(rule, band)
            if bar is not None:
                check.bars[key] = bar
        return check

    def _band(self, index: int, rule: Rule, key: str) -> Optional[Band]:
        """The key's mean and std once ``warmup`` values were seen (``None`` before, or no zscore)."""
        stats = self.statistics[index].get(key)
        if rule.zscore is None or stats is None or len(stats) < rule.min_history:
            return None
        return stats.band()

    def commit(
        self,
        checks: Sequence[Check],
        tripped: Sequence[bool],
        *,
        step: int,
        scaler_active: bool = False,
        ranks: Optional[Sequence[Sequence[int]]] = None,
    ) -> list[Decision]:
        """Update statistics and counters from the agreed trips and return one decision per trip.

        ``tripped[i]`` says whether ``checks[i]`` tripped on any rank (the callback reduces that
        across ranks), ``ranks[i]`` which ranks. A ``zscore`` rule that tripped takes its values in
        capped at the bound in force (an adaptive clip: the value it clips to), so a spike does not
        widen the band that should catch the next one, and a lasting shift is accepted in time.
        """
        decisions = []
        for i, (check, trip) in enumerate(zip(checks, tripped)):
            if not trip:
                self._accept(check)
                continue
            on = list(ranks[i]) if ranks is not None else []
            decisions.append(self._trip(check, step, scaler_active, on))
        return decisions

    def _accept(self, check: Check) -> None:
        self.consecutive[check.index] = 0
        if check.rule.zscore is None:
            return
        for key, value in check.values.items():
            if math.isfinite(value):
                self._statistics(check, key).append(value)

    def _trip(self, check: Check, step: int, scaler_active: bool, ranks: list[int]) -> Decision:
        index, rule = check.index, check.rule
        self.consecutive[index] += 1
        self.counts[index] += 1
        self._take_in_capped(check)
        clip_to = (
            rule.clip_to if rule.clip_to is not None else min(check.bars.values(), default=None)
        )
        patience = rule.effective_patience(scaler_active)
        acts = self.consecutive[index] >= patience and (
            rule.action != "clip" or clip_to is not None
        )
        return Decision(
            rule=rule,
            step=step,
            check=check,
            consecutive=self.consecutive[index],
            patience=patience,
            action=rule.action if acts else NO_ACTION,
            ranks=ranks,
            count=self.counts[index],
            clip_to=clip_to if rule.action == "clip" else None,
        )

    def _take_in_capped(self, check: Check) -> None:
        """A tripped ``zscore`` rule takes each value in capped at the bound in force (an adaptive
        clip: the value it clips to), not the spike itself: one spike barely moves the band that
        should catch the next one, yet a lasting shift (a new learning rate, a new data mix) is
        accepted after a number of trips instead of tripping, and skipping, forever."""
        rule = check.rule
        if rule.zscore is None:
            return
        for key, value in check.values.items():
            bar = check.bars.get(key)  # adaptive clip: the bar, the same on every rank
            if bar is None:
                band = self._band(check.index, rule, key)
                if band is None:  # still warming up: a value that tripped stays out
                    continue
                bar = min(value, band.upper(rule.zscore))
            if math.isfinite(bar):
                self._statistics(check, key).append(bar)

    def _statistics(self, check: Check, key: str) -> RunningStatistics:
        stats = self.statistics[check.index]
        if key not in stats:
            rule = check.rule
            stats[key] = restore_statistics(rule.window, rule.ema, rule.min_history, None)
        return stats[key]

    def counters(self) -> dict[str, float]:
        """``grad_alerts/<rule label>`` -> number of trips so far."""
        return {alert_key(label): float(n) for label, n in zip(self.labels, self.counts)}

    @staticmethod
    def clip_thresholds(checks: Iterable[Check]) -> dict[str, float]:
        """``<key>_clip_threshold`` -> the bar adaptive clip rules had in force (the lowest)."""
        out: dict[str, float] = {}
        for check in checks:
            for key, bar in check.bars.items():
                name = clip_threshold_key(key)
                out[name] = min(bar, out.get(name, math.inf))
        return out

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Per rule (by label): trip count, consecutive trips and, per key, its running statistics
        (``windows``: a window's values, or an EMA's ``count``/``mean``/``var``/``pending``)."""
        return {
            label: {
                "count": self.counts[i],
                "consecutive": self.consecutive[i],
                "windows": {key: s.state_dict() for key, s in self.statistics[i].items()},
            }
            for i, label in enumerate(self.labels)
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; rules are matched by label, unknown labels are ignored."""
        for i, (rule, label) in enumerate(zip(self.rules, self.labels)):
            entry = state.get(label)
            if not entry:
                continue
            self.counts[i] = int(entry.get("count", 0))
            self.consecutive[i] = int(entry.get("consecutive", 0))
            self.statistics[i] = {
                key: restore_statistics(rule.window, rule.ema, rule.min_history, saved)
                for key, saved in entry.get("windows", {}).items()
            }


def _violation(rule: Rule, key: str, value: float, band: Optional[Band]) -> Optional[Violation]:
    if math.isnan(value):
        return Violation(key, value, rule.max if rule.max is not None else rule.min, "nonfinite")
    if rule.max is not None and value > rule.max:
        return Violation(key, value, rule.max, "max")
    if rule.min is not None and value < rule.min:
        return Violation(key, value, rule.min, "min")
    if rule.zscore is not None:
        if math.isinf(value):
            return Violation(key, value, rule.zscore, "zscore", math.inf)
        if band is not None:
            z = band.zscore(value)
            if z > rule.zscore:
                return Violation(key, value, rule.zscore, "zscore", z)
    return None


def _bar(rule: Rule, band: Optional[Band]) -> Optional[float]:
    """An adaptive clip rule's bound: ``mean + zscore * std`` once warm, capped by ``max``."""
    if not rule.adaptive_clip:
        return None
    upper = band.upper(rule.zscore) if band is not None and rule.zscore is not None else None
    return min((b for b in (upper, rule.max) if b is not None), default=None)


def strongest(actions: Iterable[str]) -> Optional[str]:
    """The strongest of ``actions`` (``halt > skip > clip > warn``), ignoring ``"none"``."""
    ranked = [a for a in actions if a in ACTIONS]
    return max(ranked, key=ACTIONS.index) if ranked else None
