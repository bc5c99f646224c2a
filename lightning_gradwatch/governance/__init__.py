"""Governance: rules over a training step's figures, and what the callback does when they trip.

The pure part, identical on every rank: :mod:`.rules` (what a rule is), :mod:`.rule_set` (the list
of rules of a run), :mod:`.statistics` (running window, EMA), :mod:`.engine` (values + state ->
decisions), :mod:`.intervals` (max/mean between measured steps), :mod:`.readings` (what rules read
from a measurement). The part that touches a run: :mod:`.step_loss` (the loss the rules read),
:mod:`.agreement` (what tripped on any rank), :mod:`.actions` (clip, skip, halt), :mod:`.notices`
(wiring warnings) and :mod:`.enforcer` (the glue the callback calls). Alert records live in
:mod:`lightning_gradwatch.governance.alerts`; where an incident came from in :mod:`.fingerprints`,
:mod:`.evidence`, :mod:`.forensics`, :mod:`.skip_list` and :mod:`.incidents`.
"""

from lightning_gradwatch.governance.engine import Check, Decision, RuleEngine, Violation, strongest
from lightning_gradwatch.governance.rule_set import default_rules, rule_labels, validate_rules
from lightning_gradwatch.governance.rules import (
    ACTIONS,
    CLIP_MODES,
    NO_ACTION,
    SCALER_NONFINITE_PATIENCE,
    Rule,
)

__all__ = [
    "ACTIONS",
    "CLIP_MODES",
    "NO_ACTION",
    "SCALER_NONFINITE_PATIENCE",
    "Check",
    "Decision",
    "Rule",
    "RuleEngine",
    "Violation",
    "default_rules",
    "rule_labels",
    "strongest",
    "validate_rules",
]
