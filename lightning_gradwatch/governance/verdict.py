"""What the rules decided at one optimizer step, handed from deciding to acting."""

from __future__ import annotations

import dataclasses
from typing import Optional

from lightning_gradwatch.governance.agreement import Agreement
from lightning_gradwatch.governance.engine import Check, Decision
from lightning_gradwatch.measure.record import GradientMeasurement

__all__ = ["Verdict"]


@dataclasses.dataclass
class Verdict:
    """What the rules decided at one optimizer step (:meth:`RuleEnforcer.decide`), for
    :meth:`RuleEnforcer.act`.

    Attributes:
        measurement: what the rules read (``None``: nothing was checked at this step).
        measured: whether it is the step's full measurement (else parameter figures only).
        checks: every rule's reading.
        agreement: what the ranks agreed on.
        decisions: the rules that tripped, with their actions.
        stopping: a halt came earlier in this run: the update is skipped.
    """

    measurement: Optional[GradientMeasurement] = None
    measured: bool = False
    checks: list[Check] = dataclasses.field(default_factory=list)
    agreement: Optional[Agreement] = None
    decisions: list[Decision] = dataclasses.field(default_factory=list)
    stopping: bool = False
