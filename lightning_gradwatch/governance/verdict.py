"""What the rules decided at one optimizer step, handed from deciding to acting."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from lightning_gradwatch.governance.agreement import Agreement
from lightning_gradwatch.governance.engine import Check, Decision
from lightning_gradwatch.governance.evidence import LocalEvidence, RankEvidence
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
        evidence: this rank's forensic evidence, taken because a rule tripped on some rank.
        ranks_evidence: every rank's, in rank order, as gathered with the agreement.
        rerun: the rerun's record (``verdict`` and both executions' figures), when a tripped
            rule asked for one (filled in by the Lightning adapter before acting).
    """

    measurement: Optional[GradientMeasurement] = None
    measured: bool = False
    checks: list[Check] = dataclasses.field(default_factory=list)
    agreement: Optional[Agreement] = None
    decisions: list[Decision] = dataclasses.field(default_factory=list)
    stopping: bool = False
    evidence: Optional[LocalEvidence] = None
    ranks_evidence: list[RankEvidence] = dataclasses.field(default_factory=list)
    rerun: Optional[dict[str, Any]] = None

    @property
    def wants_rerun(self) -> bool:
        """Whether a rule that tripped at this step asked for a rerun."""
        return any(decision.rule.rerun for decision in self.decisions)
