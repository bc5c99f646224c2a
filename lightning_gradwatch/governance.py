"""Rules over gradient metrics and the engine that turns one step's values into decisions.

Pure Python on plain floats: no tensors, no I/O, no Lightning. The callback hands the engine the
values of one step (already reduced across ranks), the engine says which rules tripped
(:meth:`RuleEngine.evaluate`), the callback agrees with the other ranks on what tripped, and
:meth:`RuleEngine.commit` updates the rolling windows and patience counters from that agreed answer and
returns the actions to take. Splitting the two keeps the state identical on every rank.
"""

from __future__ import annotations

import fnmatch
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_gradwatch.keys import (
    DEFAULT_EPS,
    KEY_PREFIXES,
    KNOWN_KEYS,
    NONFINITE,
    TOTAL_NORM_KEY,
    alert_key,
)

#: Actions in increasing strength; when several rules act at one step the strongest wins.
ACTIONS: tuple[str, ...] = ("warn", "clip", "skip", "halt")
CLIP_MODES: tuple[str, ...] = ("norm", "value")
#: ``patience`` of a ``nonfinite`` rule left at ``None`` while an enabled AMP GradScaler is active:
#: the scaler skips a non-finite step and lowers its scale by itself, so only a run of non-finite steps
#: means something is broken.
SCALER_NONFINITE_PATIENCE = 10
#: Action recorded for a trip that did not act (patience not reached, or a GradScaler handles it).
NO_ACTION = "none"
_GLOB_CHARS = frozenset("*?[")


@dataclass
class Rule:
    """A condition on one gradient metric and what to do when it holds.

    A rule *trips* at a step when its metric's value is below ``min``, above ``max``, more than
    ``zscore`` standard deviations above the mean of its rolling ``window`` of past values, or NaN
    (a NaN is never "within bounds"; an infinite value trips a ``zscore`` rule, and a ``min`` /
    ``max`` bound only on the side it crosses). ``metric="nonfinite"`` trips on any NaN/Inf in a parameter
    gradient or a watched block's output gradient and needs no bound. After ``patience`` consecutive
    trips the rule acts: ``warn`` (record and warn), ``clip`` (scale all gradients by norm to
    ``clip_to``, or clamp them to ``[-clip_to, clip_to]`` with ``clip_mode="value"``), ``skip`` (set
    every gradient to ``None`` on every rank: the optimizer step changes no weight) or ``halt`` (save a
    checkpoint of the weights before the update, skip it and stop training). Every trip is recorded as
    an alert, with action ``"none"`` while patience is not reached.

    ``metric`` is a logged key (``grad_norm_total``, ``grad_norm/blocks.3``, ``grad_flow/max_gain``,
    ...), a ``*`` pattern over them (``grad_gain/*``: the rule trips when any matching key violates it;
    windows are kept per key, patience per rule) or ``nonfinite``. A single key the callback never
    logs raises ``ValueError`` here; a rule matching no key of the first measured step is warned
    about then.

    Cadence and cost: rules that can match ``grad_norm_total`` and ``nonfinite`` rules are checked on
    every ``check_every_n_steps``-th optimizer step with one batched norm pass over the parameter
    gradients (``torch._foreach_norm``) and one device-to-host copy of one float per parameter (about
    the cost of ``clip_grad_norm_``), plus, in multi-process runs, one all-reduce of a boolean. On
    measured steps the measurement is reused (no second pass). Rules on block metrics run on measured
    steps only, at no extra cost. Each z-score check costs O(``window``) Python float operations.

    Block-output gradients differ per rank; they are combined across ranks before rules see them (the
    norm over the global batch, the same on every rank and at least any one rank's share of it, so a
    ``max`` threshold is checked against the largest; it equals a single process on the whole
    batch, so thresholds do not depend on the number of ranks).

    Args:
        metric: logged key, ``*`` pattern over logged keys, or ``"nonfinite"`` (required).
        min: trip when the value is below this (default ``None``: no lower bound).
        max: trip when the value is above this (default ``None``: no upper bound).
        zscore: trip when ``(value - mean) / std > zscore`` over the window (spikes upwards;
            population std; default ``None``: off).
        window: number of past accepted values (steps where the rule did not trip) in the window
            (default 100, at least 2).
        warmup: values needed in the window before ``zscore`` may trip (default ``None``:
            ``min(window, 20)``).
        patience: consecutive trips before acting (default ``None``: 1; for ``nonfinite`` under an
            enabled GradScaler :data:`SCALER_NONFINITE_PATIENCE`, 10).
        action: ``"warn"`` (default), ``"clip"``, ``"skip"`` or ``"halt"``.
        clip_to: target of ``clip``: maximum total norm, or maximum absolute value (default
            ``None``; required when ``action="clip"``).
        clip_mode: ``"norm"`` (default, like ``clip_grad_norm_``) or ``"value"`` (like
            ``clip_grad_value_``).
        name: name in alerts and in the ``grad_alerts/<name>`` counter (default ``None``:
            ``metric``, then ``<metric>#2``, ... for further unnamed rules on the same metric).

    Example::

        from lightning_gradwatch import GradientFlowCallback, Rule

        callback = GradientFlowCallback(rules=[
            Rule("nonfinite", action="halt"),
            Rule("grad_norm_total", max=5.0, action="clip", clip_to=1.0),
            Rule("grad_gain/*", max=2.0, patience=3, action="warn"),
            Rule("grad_norm_total", zscore=6.0, window=200, action="skip", name="spike"),
        ])
    """

    metric: str
    min: Optional[float] = None
    max: Optional[float] = None
    zscore: Optional[float] = None
    window: int = 100
    warmup: Optional[int] = None
    patience: Optional[int] = None
    action: str = "warn"
    clip_to: Optional[float] = None
    clip_mode: str = "norm"
    name: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str):
            raise TypeError(
                f"Rule `metric` must be a string (a logged key, a '*' pattern or 'nonfinite'), "
                f"got {type(self.metric).__name__}: {self.metric!r}."
            )
        if not self.metric.strip():
            raise ValueError(
                f"Rule `metric` must be a non-empty string (a logged key, a '*' pattern or "
                f"'nonfinite'), got {self.metric!r}."
            )
        if not (self.is_pattern or self.is_nonfinite or _is_known_key(self.metric)):
            raise ValueError(
                f"Rule `metric` {self.metric!r} is not a key the callback logs: use 'nonfinite', "
                f"one of {sorted(KNOWN_KEYS)}, a key starting with one of {list(KEY_PREFIXES)} "
                "followed by a block or parameter name, or a '*' pattern over them."
            )
        if self.action not in ACTIONS:
            raise ValueError(
                f"Rule `action` must be one of {list(ACTIONS)}, got {self.action!r} "
                f"(rule on {self.metric!r})."
            )
        if self.clip_mode not in CLIP_MODES:
            raise ValueError(
                f"Rule `clip_mode` must be one of {list(CLIP_MODES)}, got {self.clip_mode!r}."
            )
        for key in ("min", "max", "zscore", "clip_to"):
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(
                    f"Rule `{key}` must be a number or None, got {type(value).__name__}: {value!r}."
                )
            if math.isnan(value):
                raise ValueError(f"Rule `{key}` must not be NaN.")
            setattr(self, key, float(value))
        self.window = _int_at_least(self.window, 2, "window")
        if self.warmup is not None:
            self.warmup = _int_at_least(self.warmup, 1, "warmup")
            if self.warmup > self.window:
                raise ValueError(
                    f"Rule `warmup` ({self.warmup}) must not exceed `window` ({self.window})."
                )
        if self.patience is not None:
            self.patience = _int_at_least(self.patience, 1, "patience")
        if self.zscore is not None and self.zscore <= 0:
            raise ValueError(f"Rule `zscore` must be > 0, got {self.zscore!r}.")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"Rule `min` ({self.min}) must not exceed `max` ({self.max}).")
        if self.is_nonfinite:
            if self.has_bound:
                raise ValueError(
                    "Rule on 'nonfinite' takes no `min`/`max`/`zscore` (it trips on any NaN/Inf)."
                )
            if self.action == "clip":
                raise ValueError(
                    "Rule `action` 'clip' cannot act on 'nonfinite': clipping a NaN/Inf gradient "
                    "makes every gradient NaN. Use 'skip' or 'halt'."
                )
        elif not self.has_bound:
            raise ValueError(
                f"Rule on {self.metric!r} needs a condition: set `min`, `max` or `zscore` "
                "(got none of them)."
            )
        if self.action == "clip":
            if self.clip_to is None:
                raise ValueError("Rule `clip_to` is required when `action` is 'clip', got None.")
            if not (math.isfinite(self.clip_to) and self.clip_to > 0):
                raise ValueError(
                    f"Rule `clip_to` must be a finite number > 0, got {self.clip_to!r}."
                )
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise TypeError(f"Rule `name` must be a non-empty string or None, got {self.name!r}.")

    @property
    def label(self) -> str:
        """The rule's own name: ``name``, else ``metric`` (in a list of rules,
        :func:`rule_labels` adds ``#2``, ``#3``, ... to unnamed rules sharing a metric)."""
        return self.name or self.metric

    @property
    def is_nonfinite(self) -> bool:
        return self.metric == NONFINITE

    @property
    def is_pattern(self) -> bool:
        """Whether ``metric`` is a glob pattern (``*``, ``?``, ``[...]``) rather than one key."""
        return not _GLOB_CHARS.isdisjoint(self.metric)

    @property
    def has_bound(self) -> bool:
        return self.min is not None or self.max is not None or self.zscore is not None

    @property
    def min_history(self) -> int:
        """Values needed in the window before ``zscore`` may trip."""
        return self.warmup if self.warmup is not None else min(self.window, 20)

    def matches(self, key: str) -> bool:
        """Whether the logged key ``key`` is one of this rule's metrics."""
        return not self.is_nonfinite and fnmatch.fnmatchcase(key, self.metric)

    @property
    def checks_every_step(self) -> bool:
        """Whether the rule runs on every check step (else on measured steps only)."""
        return self.is_nonfinite or self.matches(TOTAL_NORM_KEY)

    def effective_patience(self, scaler_active: bool) -> int:
        if self.patience is not None:
            return self.patience
        return SCALER_NONFINITE_PATIENCE if (self.is_nonfinite and scaler_active) else 1


def _is_known_key(metric: str) -> bool:
    return metric in KNOWN_KEYS or any(
        metric.startswith(prefix) and len(metric) > len(prefix) for prefix in KEY_PREFIXES
    )


def default_rules() -> list[Rule]:
    """What ``rules=None`` means: halt on the first non-finite gradient."""
    return [Rule(NONFINITE, action="halt")]


def validate_rules(rules: Optional[Iterable[Any]]) -> list[Rule]:
    """``None`` -> :func:`default_rules`, else a list of :class:`Rule` (explicit ``name`` values
    must be distinct; unnamed rules on the same metric are told apart by :func:`rule_labels`)."""
    if rules is None:
        return default_rules()
    if isinstance(rules, (str, Rule)) or not isinstance(rules, Iterable):
        raise TypeError(
            f"`rules` must be a list of Rule or None, got {type(rules).__name__}: {rules!r}."
        )
    out = list(rules)
    for rule in out:
        if not isinstance(rule, Rule):
            raise TypeError(
                f"`rules` must contain Rule objects, got {type(rule).__name__}: {rule!r}."
            )
    names = [rule.name for rule in out if rule.name]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(
            f"`rules` need distinct names, but `name` {duplicates} is used more than once."
        )
    return out


def rule_labels(rules: Sequence[Rule]) -> list[str]:
    """Each rule's name in alerts, ``grad_alerts/`` counters and checkpoints, one per rule, unique.

    A named rule keeps its ``name``; an unnamed one gets its ``metric``, and when an earlier rule
    already took that, ``<metric>#2``, ``#3``, ... (``[Rule("grad_norm_total", max=5.0, ...),
    Rule("grad_norm_total", zscore=6.0, ...)]`` are ``grad_norm_total`` and ``grad_norm_total#2``).
    """
    taken = {rule.name for rule in rules if rule.name}
    labels: list[str] = []
    for rule in rules:
        label = rule.label
        if not rule.name:
            k = 1
            while label in taken:
                k += 1
                label = f"{rule.metric}#{k}"
            taken.add(label)
        labels.append(label)
    return labels


def _int_at_least(value: Any, low: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"Rule `{name}` must be an int >= {low}, got {type(value).__name__}: {value!r}."
        )
    if value < low:
        raise ValueError(f"Rule `{name}` must be an int >= {low}, got {value!r}.")
    return value


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


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
    """A rule evaluated at one step on this rank (nothing committed yet)."""

    index: int
    rule: Rule
    values: dict[str, float]  # every matched key and its value
    violations: list[Violation]

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
    threshold = violation.threshold or 0.0
    return abs(violation.value - threshold)


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

    @property
    def acts(self) -> bool:
        return self.action != NO_ACTION


class RolledWindow:
    """The last ``size`` accepted values of one metric with their mean and standard deviation."""

    def __init__(self, size: int, values: Iterable[float] = ()) -> None:
        self.values: deque[float] = deque(values, maxlen=size)

    def __len__(self) -> int:
        return len(self.values)

    def append(self, value: float) -> None:
        self.values.append(value)

    def zscore(self, value: float) -> float:
        """``(value - mean) / std`` (population std); ``inf`` above a constant window."""
        n = len(self.values)
        mean = sum(self.values) / n
        var = sum((v - mean) ** 2 for v in self.values) / n
        std = math.sqrt(var)
        # A constant window has std 0: anything above it is infinitely unusual, anything else is not.
        floor = 1e-12 * max(abs(mean), DEFAULT_EPS)
        if std <= floor:
            return math.inf if value - mean > floor else 0.0
        return (value - mean) / std


class RuleEngine:
    """Evaluate :class:`Rule` objects on one step's values and keep their state.

    State: a rolling window per (rule, key) for ``zscore`` rules, a consecutive-trip counter and a
    trip count per rule. :meth:`state_dict` / :meth:`load_state_dict` carry it through checkpoints.

    Example::

        engine = RuleEngine([Rule("grad_norm_total", max=5.0)])
        checks = engine.evaluate({"grad_norm_total": 7.0}, nonfinite=False)
        decisions = engine.commit(checks, tripped=[c.tripped for c in checks], step=0)
    """

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)
        self.labels = rule_labels(self.rules)
        self.windows: list[dict[str, RolledWindow]] = [{} for _ in self.rules]
        self.consecutive = [0] * len(self.rules)
        self.counts = [0] * len(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def needs_every_step(self) -> bool:
        """Whether any rule runs on every check step (not only on measured steps)."""
        return any(rule.checks_every_step for rule in self.rules)

    def evaluate(
        self, values: Mapping[str, float], *, nonfinite: Optional[bool], measured: bool = True
    ) -> list[Check]:
        """Check every applicable rule against ``values`` (logged key -> value); no state changes.

        ``nonfinite`` is whether any gradient held a NaN/Inf (``None``: unknown, ``nonfinite`` rules
        are not checked). On an unmeasured step (``measured=False``) only rules that run on every
        step are checked, whatever keys ``values`` holds.
        """
        checks = []
        for index, rule in enumerate(self.rules):
            if not measured and not rule.checks_every_step:
                continue
            if rule.is_nonfinite:
                if nonfinite is None:
                    continue
                violations = [Violation(NONFINITE, 1.0, None, NONFINITE)] if nonfinite else []
                checks.append(Check(index, rule, {NONFINITE: float(nonfinite)}, violations))
                continue
            matched = {key: value for key, value in values.items() if rule.matches(key)}
            if not matched:
                continue
            violations = [
                v
                for key, value in matched.items()
                if (v := self._violation(index, rule, key, value)) is not None
            ]
            checks.append(Check(index, rule, matched, violations))
        return checks

    def _violation(self, index: int, rule: Rule, key: str, value: float) -> Optional[Violation]:
        if math.isnan(value):
            bound = rule.max if rule.max is not None else rule.min
            return Violation(key, value, bound, "nonfinite")
        if rule.max is not None and value > rule.max:
            return Violation(key, value, rule.max, "max")
        if rule.min is not None and value < rule.min:
            return Violation(key, value, rule.min, "min")
        if rule.zscore is not None:
            if math.isinf(value):
                return Violation(key, value, rule.zscore, "zscore", math.inf)
            window = self.windows[index].get(key)
            if window is not None and len(window) >= rule.min_history:
                z = window.zscore(value)
                if z > rule.zscore:
                    return Violation(key, value, rule.zscore, "zscore", z)
        return None

    def commit(
        self,
        checks: Sequence[Check],
        tripped: Sequence[bool],
        *,
        step: int,
        scaler_active: bool = False,
        ranks: Optional[Sequence[Sequence[int]]] = None,
    ) -> list[Decision]:
        """Update windows and counters from the agreed trips and return one decision per trip.

        ``tripped[i]`` says whether ``checks[i]`` tripped on any rank (the callback reduces that
        across ranks), ``ranks[i]`` which ranks. Values of steps where a rule tripped stay out of its
        windows, so a spike does not widen the band that should catch the next one.
        """
        decisions = []
        for i, (check, trip) in enumerate(zip(checks, tripped)):
            index, rule = check.index, check.rule
            if not trip:
                self.consecutive[index] = 0
                if rule.zscore is not None:
                    windows = self.windows[index]
                    for key, value in check.values.items():
                        if math.isfinite(value):
                            windows.setdefault(key, RolledWindow(rule.window)).append(value)
                continue
            self.consecutive[index] += 1
            self.counts[index] += 1
            patience = rule.effective_patience(scaler_active)
            acts = self.consecutive[index] >= patience
            decisions.append(
                Decision(
                    rule=rule,
                    step=step,
                    check=check,
                    consecutive=self.consecutive[index],
                    patience=patience,
                    action=rule.action if acts else NO_ACTION,
                    ranks=list(ranks[i]) if ranks is not None else [],
                    count=self.counts[index],
                )
            )
        return decisions

    def counters(self) -> dict[str, float]:
        """``grad_alerts/<rule label>`` -> number of trips so far."""
        return {alert_key(label): float(n) for label, n in zip(self.labels, self.counts)}

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Per rule (by label): trip count, consecutive trips and window contents."""
        return {
            label: {
                "count": self.counts[i],
                "consecutive": self.consecutive[i],
                "windows": {key: list(w.values) for key, w in self.windows[i].items()},
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
            self.windows[i] = {
                key: RolledWindow(rule.window, values)
                for key, values in entry.get("windows", {}).items()
            }


def strongest(actions: Iterable[str]) -> Optional[str]:
    """The strongest of ``actions`` (``halt > skip > clip > warn``), ignoring ``"none"``."""
    ranked = [a for a in actions if a in ACTIONS]
    return max(ranked, key=ACTIONS.index) if ranked else None
