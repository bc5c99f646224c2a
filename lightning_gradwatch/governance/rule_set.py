"""The list of rules a callback runs: what ``rules=None`` means, checking a user's list, and the
unique name each rule goes by in alerts, counters and checkpoints."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

from lightning_gradwatch.governance.rules import Rule
from lightning_gradwatch.keys import NONFINITE

__all__ = ["default_rules", "rule_labels", "validate_rules"]


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
