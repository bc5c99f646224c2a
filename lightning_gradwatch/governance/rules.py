"""What a rule is: :class:`Rule` and its validation (the list of rules a callback runs is
:mod:`lightning_gradwatch.governance.rule_set`)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

from lightning_gradwatch.keys import (
    ADAPTIVE_CLIP_METRICS,
    KEY_PREFIXES,
    KNOWN_KEYS,
    LOSS,
    LOSS_KEY,
    NONFINITE,
    TOTAL_NORM_KEY,
    UPDATE_TOTAL_KEYS,
    clip_threshold_key,
    interval_max_key,
    interval_mean_key,
    is_update_metric,
    optimizer_of,
)
from lightning_gradwatch.validation import (
    check_choice,
    check_int_at_least,
    check_open_unit,
    check_optional_number,
    check_type,
)

__all__ = [
    "ACTIONS",
    "CLIP_MODES",
    "DEFAULT_EMA_WARMUP",
    "DEFAULT_WINDOW",
    "NO_ACTION",
    "SCALER_NONFINITE_PATIENCE",
    "Rule",
]

#: Actions in increasing strength; when several rules act at one step the strongest wins.
ACTIONS: tuple[str, ...] = ("warn", "clip", "skip", "halt")
CLIP_MODES: tuple[str, ...] = ("norm", "value")
#: ``patience`` of a ``nonfinite`` rule left at ``None`` while an enabled AMP GradScaler is active:
#: the scaler skips a non-finite step and lowers its scale by itself, so only a run of non-finite steps
#: means something is broken.
SCALER_NONFINITE_PATIENCE = 10
#: Action recorded for a trip that did not act (patience not reached, or a GradScaler handles it).
NO_ACTION = "none"
#: ``window`` when neither ``window`` nor ``ema`` is given.
DEFAULT_WINDOW = 100
#: ``warmup`` of an ``ema`` rule left at ``None``: ZClip's 25 steps.
DEFAULT_EMA_WARMUP = 25
_GLOB_CHARS = frozenset("*?[")
#: Keys logged for charts only (rules read the figure itself).
_CHART_ONLY: frozenset[str] = frozenset(
    [LOSS_KEY]
    + [f(key) for key in (TOTAL_NORM_KEY, LOSS_KEY) for f in (interval_max_key, interval_mean_key)]
    + [clip_threshold_key(metric) for metric in ADAPTIVE_CLIP_METRICS]
)


@dataclass
class Rule:
    """A condition on one figure of a training step and what to do when it holds.

    A rule *trips* at a step when its metric is below ``min``, above ``max``, more than ``zscore``
    standard deviations above its running mean, or NaN. After ``patience`` trips in a row it acts:
    ``warn``, ``clip`` the gradients, ``skip`` the optimizer step (every gradient set to ``None``) or
    ``halt`` training (checkpoint of the weights before the update, update skipped, ``fit`` returns).
    Every trip is recorded as an alert, with action ``"none"`` while patience is not reached. The
    README's governance section says when rules are checked and what that costs.

    The running mean and standard deviation of a ``zscore`` rule come from the last ``window``
    values, or, with ``ema``, from exponential moving averages (ZClip:
    ``mean = ema * mean + (1 - ema) * value``, ``var = ema * var + (1 - ema) * (value - mean)**2``,
    started from the mean and variance of the first ``warmup`` values). A value that tripped enters
    them capped at the bound in force, ``mean + zscore * std``: one spike barely widens the band,
    and a lasting shift is accepted after some trips. A ``clip`` rule with a ``zscore`` and no
    ``clip_to`` is an *adaptive clip*: it clips the total norm to that bound (capped by ``max``),
    and the clipped value enters its statistics.

    Args:
        metric: what the rule watches (required): a logged key (``"grad_norm_total"``,
            ``"grad_norm/blocks.3"``, ``"grad_flow/max_gain"``, ...), a ``*`` pattern over logged
            keys (``"grad_gain/*"``: trips when any matching key does; statistics per key, patience
            per rule), ``"loss"`` (the step's training loss) or ``"nonfinite"`` (a NaN/Inf in any
            parameter or block-output gradient or in the loss; takes no condition).
        min: trip when the value is below this (default ``None``: no lower bound).
        max: trip when the value is above this (default ``None``: no upper bound).
        zscore: trip when ``(value - mean) / std > zscore`` (upward spikes, population std;
            default ``None``: off).
        window: number of past values the mean and std are taken over (default ``None``:
            100; at least 2; not together with ``ema``).
        warmup: values seen before ``zscore`` may trip (default ``None``: ``min(window, 20)``, or
            25 with ``ema``; at most ``window``).
        patience: trips in a row before acting (default ``None``: 1; for ``nonfinite`` under an
            enabled GradScaler :data:`SCALER_NONFINITE_PATIENCE`, 10).
        action: ``"warn"`` (default), ``"clip"``, ``"skip"`` or ``"halt"``.
        clip_to: target of ``clip``: the maximum total norm, or the maximum absolute value with
            ``clip_mode="value"`` (default ``None``: required for ``clip`` unless ``zscore`` is set,
            which makes it an adaptive clip of ``grad_norm_total``).
        clip_mode: ``"norm"`` (default, like ``clip_grad_norm_``) or ``"value"`` (like
            ``clip_grad_value_``).
        name: name in alerts and in the ``grad_alerts/<name>`` counter (default ``None``:
            ``metric``, then ``<metric>#2``, ... for further unnamed rules on the same metric).
        ema: weight of the old mean in exponential moving averages, in (0, 1), used instead of a
            window (default ``None``: a window; ZClip uses 0.97).
        rerun: on a trip, re-execute the step's forward and backward on every rank from the RNG
            state of the batch's start, into temporary buffers, before acting, and record whether
            the figures came back the same (``"reproducible"``: the data or the model state) or
            not (``"transient"``: hardware or non-determinism) in the alert's ``rerun`` (default
            ``False``; see docs/forensics.md for what it costs and where it is unavailable).

    Example::

        from lightning_gradwatch import GradientFlowCallback, Rule

        callback = GradientFlowCallback(rules=[
            Rule("nonfinite", action="halt"),
            Rule("grad_norm_total", zscore=2.5, ema=0.97, warmup=25, action="clip"),  # ZClip
            Rule("loss", zscore=6.0, window=128, warmup=64, action="skip"),  # OLMo-core
            Rule("grad_gain/*", max=2.0, patience=3, action="warn"),
        ])
    """

    metric: str
    min: Optional[float] = None
    max: Optional[float] = None
    zscore: Optional[float] = None
    window: Optional[int] = None
    warmup: Optional[int] = None
    patience: Optional[int] = None
    action: str = "warn"
    clip_to: Optional[float] = None
    clip_mode: str = "norm"
    name: Optional[str] = None
    ema: Optional[float] = None
    rerun: bool = False

    def __post_init__(self) -> None:
        _check_metric(self.metric)
        with _about(self.metric):
            self._check_arguments()
            self._check_conditions()
            self._check_after_step()
            self._check_clip()
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise TypeError(f"Rule `name` must be a non-empty string or None, got {self.name!r}.")

    def _check_arguments(self) -> None:
        self.action = check_choice(self.action, ACTIONS, "action")
        self.clip_mode = check_choice(self.clip_mode, CLIP_MODES, "clip_mode")
        self.min = check_optional_number(self.min, "min")
        self.max = check_optional_number(self.max, "max")
        self.zscore = check_optional_number(self.zscore, "zscore")
        self.clip_to = check_optional_number(self.clip_to, "clip_to")
        self.rerun = check_type(self.rerun, bool, "rerun")
        if self.ema is not None:
            self.ema = check_open_unit(self.ema, "ema")
            if self.window is not None:
                raise ValueError(
                    f"`ema` ({self.ema}) and `window` ({self.window!r}) are two ways to keep the "
                    "running statistics: set one of them."
                )
        elif self.window is None:
            self.window = DEFAULT_WINDOW
        if self.window is not None:
            self.window = check_int_at_least(self.window, 2, "window")
        if self.warmup is not None:
            self.warmup = check_int_at_least(self.warmup, 1, "warmup")
            if self.window is not None and self.warmup > self.window:
                raise ValueError(
                    f"`warmup` ({self.warmup}) must not exceed `window` ({self.window})."
                )
        if self.patience is not None:
            self.patience = check_int_at_least(self.patience, 1, "patience")

    def _check_conditions(self) -> None:
        if self.zscore is not None and self.zscore <= 0:
            raise ValueError(f"`zscore` must be > 0, got {self.zscore!r}.")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"`min` ({self.min}) must not exceed `max` ({self.max}).")
        if self.ema is not None and self.zscore is None:
            raise ValueError("`ema` keeps the statistics of a `zscore` condition: set `zscore`.")
        if self.is_nonfinite:
            if self.has_bound:
                raise ValueError(
                    "a 'nonfinite' rule takes no `min`/`max`/`zscore` (it trips on any NaN/Inf)."
                )
            if self.action == "clip":
                raise ValueError(
                    "`action` 'clip' cannot act on 'nonfinite': clipping a NaN/Inf gradient makes "
                    "every gradient NaN. Use 'skip' or 'halt'."
                )
        elif not self.has_bound:
            raise ValueError("a rule needs a condition: set `min`, `max` or `zscore` (got none).")

    def _check_after_step(self) -> None:
        if self.after_step and self.action in ("clip", "skip"):
            raise ValueError(
                f"`action` {self.action!r} cannot act on {self.metric!r}: update figures are known "
                "only after the optimizer step, when there is nothing left to clip or skip. Use "
                "'warn' or 'halt' (a halt puts the weights from before that update back)."
            )

    def _check_clip(self) -> None:
        if self.action != "clip":
            return
        if self.clip_to is not None:
            if not (math.isfinite(self.clip_to) and self.clip_to > 0):
                raise ValueError(f"`clip_to` must be a finite number > 0, got {self.clip_to!r}.")
            return
        if self.zscore is None:
            raise ValueError(
                "`clip_to` is required when `action` is 'clip', got None (or set `zscore` for an "
                "adaptive clip of 'grad_norm_total' to the rule's own threshold)."
            )
        adaptive = "an adaptive clip (`action` 'clip' without `clip_to`)"
        if self.metric not in ADAPTIVE_CLIP_METRICS and optimizer_of(self.metric) is None:
            raise ValueError(
                f"{adaptive} clips the total norm to the rule's own threshold, so `metric` must be "
                f"one of {list(ADAPTIVE_CLIP_METRICS)}, got {self.metric!r}. Set `clip_to` to clip "
                "to a fixed norm when this metric trips."
            )
        if self.clip_mode != "norm":
            raise ValueError(f"{adaptive} scales the total norm: `clip_mode` must be 'norm'.")
        if self.min is not None:
            raise ValueError(f"{adaptive} clips down to the rule's upper bound: drop `min`.")

    @property
    def label(self) -> str:
        """The rule's own name: ``name``, else ``metric`` (in a list of rules,
        :func:`~lightning_gradwatch.governance.rule_set.rule_labels` adds ``#2``, ``#3``, ... to
        unnamed rules sharing a metric)."""
        return self.name or self.metric

    @property
    def is_nonfinite(self) -> bool:
        return self.metric == NONFINITE

    @property
    def after_step(self) -> bool:
        """Whether the rule reads update figures (``log_updates=True``), known only once the
        optimizer stepped: it is checked then, and may ``warn`` or ``halt`` only."""
        return is_update_metric(self.metric)

    @property
    def is_pattern(self) -> bool:
        """Whether ``metric`` is a glob pattern (``*``, ``?``, ``[...]``) rather than one key."""
        return not _GLOB_CHARS.isdisjoint(self.metric)

    @property
    def has_bound(self) -> bool:
        return self.min is not None or self.max is not None or self.zscore is not None

    @property
    def adaptive_clip(self) -> bool:
        """Whether this rule clips to its own threshold (``clip`` with ``zscore``, no ``clip_to``)."""
        return self.action == "clip" and self.clip_to is None and self.zscore is not None

    @property
    def min_history(self) -> int:
        """Values needed before ``zscore`` may trip."""
        if self.warmup is not None:
            return self.warmup
        return DEFAULT_EMA_WARMUP if self.window is None else min(self.window, 20)

    def matches(self, key: str) -> bool:
        """Whether ``key`` (a logged key, or ``"loss"``) is one of this rule's metrics. Patterns
        match logged keys only: the loss is watched by rules that name it."""
        if self.is_nonfinite or key == LOSS:
            return key == self.metric == LOSS
        if self.metric == TOTAL_NORM_KEY and optimizer_of(key) is not None:
            return True  # several optimizers: a rule on the total watches each one's
        if self.metric in UPDATE_TOTAL_KEYS and key.startswith(self.metric + "/"):
            return True  # the same for the update totals
        return fnmatch.fnmatchcase(key, self.metric)

    @property
    def checks_every_step(self) -> bool:
        """Whether the rule runs on every check step (else on measured steps only)."""
        return (
            self.is_nonfinite
            or self.metric == LOSS
            or self.matches(TOTAL_NORM_KEY)
            or optimizer_of(self.metric) is not None
        )

    def effective_patience(self, scaler_active: bool) -> int:
        if self.patience is not None:
            return self.patience
        return SCALER_NONFINITE_PATIENCE if (self.is_nonfinite and scaler_active) else 1


@contextmanager
def _about(metric: str) -> Iterator[None]:
    """Say which rule a bad argument belongs to (the shared checks name only the argument)."""
    try:
        yield
    except (TypeError, ValueError) as error:
        raise type(error)(f"Rule on {metric!r}: {error}") from None


def _check_metric(metric: Any) -> None:
    what = "a logged key, a '*' pattern, 'loss' or 'nonfinite'"
    if not isinstance(metric, str):
        raise TypeError(
            f"Rule `metric` must be a string ({what}), got {type(metric).__name__}: {metric!r}."
        )
    if not metric.strip():
        raise ValueError(f"Rule `metric` must be a non-empty string ({what}), got {metric!r}.")
    if metric in _CHART_ONLY:
        raise ValueError(
            f"Rule `metric` {metric!r} is logged for charts only; rules read the figure itself: "
            f"{TOTAL_NORM_KEY!r} or {LOSS!r}."
        )
    known = metric in (NONFINITE, LOSS) or metric in KNOWN_KEYS
    prefixed = any(metric.startswith(p) and len(metric) > len(p) for p in KEY_PREFIXES)
    prefixed = prefixed or optimizer_of(metric) is not None or _per_optimizer_update(metric)
    if not (known or prefixed or not _GLOB_CHARS.isdisjoint(metric)):
        raise ValueError(
            f"Rule `metric` {metric!r} is not a key the callback logs: use 'nonfinite', 'loss', "
            f"one of {sorted(KNOWN_KEYS)}, a key starting with one of {list(KEY_PREFIXES)} "
            "followed by a block or parameter name, 'grad_norm_total/<optimizer>' (or an update "
            "total, 'update_ratio_total/<optimizer>') with several optimizers, or a '*' pattern."
        )


def _per_optimizer_update(metric: str) -> bool:
    """``update_ratio_total/<optimizer>`` and the other update totals of one optimizer."""
    return any(
        metric.startswith(key + "/") and len(metric) > len(key) + 1 for key in UPDATE_TOTAL_KEYS
    )
