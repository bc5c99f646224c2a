"""Recording what governance did: one :class:`~lightning_gradwatch.governance.alerts.Alert` per
decision, with its forensic fields (the batch, the rank it came from, the rerun's verdict), kept,
written to the JSONL audit trail (rank 0), and, for a step whose update was dropped, the batch
added to the skip list beside the trail (:mod:`~lightning_gradwatch.governance.skip_list`), unless
a rerun found the trip transient (the data is then not to blame)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_gradwatch._compat import scaler_enabled
from lightning_gradwatch.governance.alerts import Alert, build_alert
from lightning_gradwatch.governance.engine import Decision
from lightning_gradwatch.governance.evidence import LocalEvidence
from lightning_gradwatch.governance.forensics import batch_text, incident_fields, rerun_text
from lightning_gradwatch.governance.readings import nonfinite_report
from lightning_gradwatch.governance.skip_list import SkipEntry, SkipListFile, StepMatch
from lightning_gradwatch.governance.trail import JsonlAlertSink
from lightning_gradwatch.governance.verdict import Verdict

__all__ = ["IncidentRecorder", "SKIP_LIST_RULE"]

#: ``rule`` and ``metric`` of the record of a step skipped from a skip list.
SKIP_LIST_RULE = "skip_batches"
#: Actions whose step is added to the skip list (``halt`` drops the update too).
_LISTED_ACTIONS = ("skip", "halt")


class IncidentRecorder:
    """The alerts of a run: built from the decisions, kept in :attr:`alerts`, appended to the
    audit trail by rank 0; the batches of dropped updates appended to the skip list (rank 0)."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.sink: Optional[JsonlAlertSink] = None
        self.skip_list_path: Optional[str] = None
        self._skip_file: Optional[SkipListFile] = None
        self._skip_failed = False

    def setup(
        self, trainer: pl.Trainer, alerts_path: str, skip_list_path: Optional[str], rules: bool
    ) -> None:
        """Start a fit: the trail and the skip list (written by rank 0 only)."""
        self.skip_list_path = skip_list_path
        self.sink = JsonlAlertSink(alerts_path) if trainer.is_global_zero else None
        keep = trainer.is_global_zero and skip_list_path is not None
        self._skip_file = SkipListFile(skip_list_path) if keep else None  # type: ignore[arg-type]
        self._skip_failed = False
        if self.sink is not None and self.sink.spool_notice and rules:
            rank_zero_info(self.sink.spool_notice)

    def record(
        self,
        trainer: pl.Trainer,
        decisions: Sequence[Decision],
        verdict: Verdict,
        *,
        action: Optional[str],
        checkpoint: Optional[str],
        labels: Sequence[str],
        block_names: Sequence[str],
    ) -> list[Alert]:
        """One alert per decision (in order), kept and written to the trail."""
        measurement = verdict.measurement
        report = nonfinite_report(block_names, measurement) if measurement is not None else None
        listed = self._list_batch(trainer, decisions, verdict, action, labels)
        scaler = scaler_enabled(trainer)
        alerts = []
        for decision in decisions:
            fields, notes = _forensics(decision, verdict)
            if decision.action in _LISTED_ACTIONS and listed is not None:
                fields["skip_list"] = listed
            elif decision.action in _LISTED_ACTIONS and _transient(verdict):
                notes.append("the batch is not added to the skip list (the rerun did not trip)")
            alert = build_alert(
                decision,
                label=labels[decision.check.index],
                epoch=trainer.current_epoch,
                rank=trainer.global_rank,
                block_names=block_names,
                report=report,
                scaler=scaler,
                step_action=action,
                checkpoint=checkpoint,
                peer_value=_peer_value(verdict, decision),
                forensics=fields,
                notes=notes,
            )
            self._keep(alert)
            alerts.append(alert)
        return alerts

    def record_replay(
        self,
        trainer: pl.Trainer,
        evidence: LocalEvidence,
        fingerprints: Sequence[Optional[str]],
        match: StepMatch,
        source: str,
    ) -> Alert:
        """The record of a step skipped from the skip list ``source``."""
        entry = match.entry
        assert entry is not None
        where = batch_text(evidence.epoch, evidence.batch_idx)
        how = "its fingerprints match" if match.how == "fingerprint" else "its index matches"
        step = trainer.global_step
        alert = Alert(
            step=step,
            epoch=evidence.epoch,
            rank=trainer.global_rank,
            rule=SKIP_LIST_RULE,
            rule_repr=f"skip_batches={source!r}",
            metric=SKIP_LIST_RULE,
            value=None,
            condition="skipped from list",
            action="skip",
            batch_idx=evidence.batch_idx,
            dataloader_idx=evidence.dataloader_idx,
            fingerprints=list(fingerprints),
            skip_list=source,
            keys={},
            message=f"GradientFlowCallback: step {step}, batch ({where}) skipped from list "
            f"{source}: {how} the entry {entry.describe()}; optimizer step skipped (no weight "
            "changed).",
        )
        self._keep(alert)
        return alert

    def upload(self) -> None:
        """Copy a spooled trail to its URL (rank 0)."""
        if self.sink is not None:
            self.sink.upload()

    def _keep(self, alert: Alert) -> None:
        self.alerts.append(alert)
        if self.sink is not None:
            self.sink.write(alert)

    def _list_batch(
        self,
        trainer: pl.Trainer,
        decisions: Sequence[Decision],
        verdict: Verdict,
        action: Optional[str],
        labels: Sequence[str],
    ) -> Optional[str]:
        """Add the step's batch to the skip list when its update is dropped; the list's path
        (every rank says the same; rank 0 writes)."""
        acting = [d for d in decisions if d.action in _LISTED_ACTIONS]
        evidence = verdict.evidence
        if action not in _LISTED_ACTIONS or not acting or evidence is None:
            return None
        if self.skip_list_path is None or evidence.batch_idx is None or _transient(verdict):
            return None  # a transient trip is not the batch's fault: a replay would skip good data
        entry = SkipEntry(
            epoch=evidence.epoch,
            batch_idx=evidence.batch_idx,
            fingerprints=tuple(r.fingerprint for r in verdict.ranks_evidence) or None,
            step=trainer.global_step,
            rule=labels[acting[0].check.index],
            dataloader_idx=evidence.dataloader_idx,
        )
        if self._skip_file is not None and not self._skip_failed:
            try:
                self._skip_file.append(entry)
            except Exception as error:  # a filesystem error or a foreign file: never stop the run
                self._skip_failed = True
                rank_zero_warn(
                    f"GradientFlowCallback: could not add the skipped batch to the skip list "
                    f"{self.skip_list_path} ({type(error).__name__}: {error}); it is not written "
                    "for the rest of this fit (the alert trail still names every batch)."
                )
        return self.skip_list_path


def _forensics(decision: Decision, verdict: Verdict) -> tuple[dict[str, Any], list[str]]:
    """The forensic fields and sentences of one decision's alert (none without evidence)."""
    fields: dict[str, Any] = {}
    notes: list[str] = []
    if verdict.evidence is not None and verdict.ranks_evidence:
        fields, text = incident_fields(decision, verdict.evidence, verdict.ranks_evidence)
        notes.append(text)
    if decision.rule.rerun and verdict.rerun is not None:
        fields["rerun"] = verdict.rerun
        notes.append(rerun_text(verdict.rerun))
    return fields, notes


def _transient(verdict: Verdict) -> bool:
    return verdict.rerun is not None and verdict.rerun.get("verdict") == "transient"


def _peer_value(verdict: Verdict, decision: Decision) -> float:
    agreement = verdict.agreement
    if agreement is None:
        return float("nan")
    return agreement.peer_values.get(decision.check.index, float("nan"))
