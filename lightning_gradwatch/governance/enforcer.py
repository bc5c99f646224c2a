"""Governance inside a run: when the rules are checked and on what, agreement across ranks, the
actions, the alerts, the logged keys, and the state that goes through checkpoints."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Callable, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_gradwatch._compat import scaler_enabled
from lightning_gradwatch.governance.actions import (
    GradientActions,
    NamedParams,
    clip_to_decisions,
    save_halt_checkpoint,
)
from lightning_gradwatch.governance.after_step import AfterStepRules
from lightning_gradwatch.governance.agreement import agree
from lightning_gradwatch.governance.engine import Decision, RuleEngine, strongest
from lightning_gradwatch.governance.evidence import EvidenceRound, EvidenceSource
from lightning_gradwatch.governance.incidents import IncidentRecorder
from lightning_gradwatch.governance.intervals import IntervalAggregates, governance_keys
from lightning_gradwatch.governance.notices import StaleGradientWatch, warn_unmatched
from lightning_gradwatch.governance.readings import has_nonfinite, rule_values
from lightning_gradwatch.governance.rules import NO_ACTION, Rule
from lightning_gradwatch.governance.step_loss import StepLoss
from lightning_gradwatch.governance.verdict import Verdict
from lightning_gradwatch.keys import CLIPPED_KEY, for_optimizer, total_norm_key
from lightning_gradwatch.measure.record import GradientMeasurement, MeasurementSpec, measure_params

__all__ = ["RuleEnforcer"]


class RuleEnforcer:
    """Runs the rules of a :class:`GradientFlowCallback` and acts on what they decide.

    Args:
        rules: the validated rules.
        check_every_n_steps: check the rules that run every step (``grad_norm_total``, ``loss``,
            ``nonfinite``) every n optimizer steps.
        alerts_path: the JSONL audit trail the user asked for (``None``: the run's default, which
            the Lightning adapter resolves at fit start and passes to :meth:`setup`).
    """

    def __init__(
        self, rules: Sequence[Rule], check_every_n_steps: int, alerts_path: Optional[str]
    ) -> None:
        self.engine = RuleEngine(rules)
        self.after_rules = AfterStepRules(self.engine)
        self.check_every_n_steps = check_every_n_steps
        self.alerts_path = alerts_path
        self.spec = MeasurementSpec()
        self.halted = False
        self.halt_reason: Optional[str] = None
        self.block_names: list[str] = []
        self.incidents = IncidentRecorder()
        self._halt_dir = ""
        self.actions = GradientActions()
        self._loss = StepLoss(combine=self.engine.reads_loss)
        self._interval = IntervalAggregates()
        self._stopping = False  # halted in this run: every later update is skipped too
        self._checked_step = -1
        #: The stepping optimizer's name (its keys; ``None`` with one optimizer).
        self._optimizer: Optional[str] = None
        self._stale = StaleGradientWatch()
        self._matches_checked = False

    # -- lifecycle -------------------------------------------------------------------------------

    def setup(
        self,
        trainer: pl.Trainer,
        block_names: Sequence[str],
        spec: MeasurementSpec,
        *,
        alerts_path: str,
        halt_dir: str,
        skip_list_path: Optional[str] = None,
    ) -> None:
        """Start a fit: the watched blocks, what is measured, the audit trail (a local path or a
        URL), the folder of halt checkpoints and the skip list, resolved once for the fit."""
        self.block_names = list(block_names)
        self.spec = spec
        self._stopping = False
        self._checked_step = -1
        self._matches_checked = self.after_rules.checked = False
        self._stale = StaleGradientWatch()
        self._halt_dir = halt_dir
        self.incidents.setup(trainer, alerts_path, skip_list_path, bool(self.engine.rules))

    def end_step(self, trainer: pl.Trainer) -> None:
        """After the optimizer step: undo what a skipped step paused."""
        self.actions.end_step(trainer)

    def upload_trail(self) -> None:
        """Copy a spooled trail to its URL: at checkpoints and when the run ends (rank 0)."""
        self.incidents.upload()

    # -- backward --------------------------------------------------------------------------------

    def on_before_backward(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        loss: Tensor,
        groups: Sequence[NamedParams],
    ) -> None:
        """Before a backward: keep the loss; in manual optimization, look for gradients left from
        the previous step (``groups``: each optimizer's parameters)."""
        if self.engine.rules and isinstance(loss, Tensor):
            self._loss.add(trainer, loss)  # stays on the device until the step's host copy
        if not pl_module.automatic_optimization:
            self._stale.before_backward(groups)

    def step_loss(self, trainer: pl.Trainer) -> Optional[Tensor]:
        """This step's loss as a device scalar, to be copied to the host with the step's figures
        (``None`` without rules). Call it on every rank at the same steps (it may average)."""
        return self._loss.take(trainer) if self.engine.rules else None

    # -- optimizer step: decide, then act ----------------------------------------------------------

    def decide(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer_index: int,
        optimizer_name: Optional[str],
        params: NamedParams,
        measurement: Optional[GradientMeasurement],
        evidence: Optional[EvidenceSource] = None,
    ) -> Verdict:
        """Check the rules at this step: the same decisions on every rank.

        ``params`` are the stepping optimizer's (rules act on them only); ``optimizer_name`` is
        ``None`` with a single optimizer, else its keys end in the name. Without a measurement, the
        rules that run every step are checked on a parameter-only one (when due). ``evidence``
        is taken only when a rule tripped on some rank; it rides in the agreement's gather.
        """
        step = trainer.global_step
        self._optimizer = optimizer_name
        if not pl_module.automatic_optimization:
            warning = self._stale.at_step(optimizer_index, optimizer_name, step)
            if warning is not None:
                rank_zero_warn(warning)
        if self._stopping:
            return Verdict(stopping=True)
        measured = measurement is not None
        before = self.engine.checks_before_step  # rules on update figures come after the step
        if not before or step == self._checked_step or not (measured or self._due(step)):
            return Verdict()
        self._checked_step = step
        if measurement is None:
            measurement = self._measure_params(trainer, params, step)
        return self._decide(trainer, measurement, measured, evidence)

    def act(
        self, trainer: pl.Trainer, optimizer: Optimizer, params: NamedParams, verdict: Verdict
    ) -> dict[str, float]:
        """Apply the verdict (clip, skip or halt; a halted run skips every later update), record
        its alerts, and return the keys to log at this step."""
        measurement = verdict.measurement
        if verdict.stopping:
            self.actions.skip(trainer, optimizer, params)
            return {}
        if measurement is None or verdict.agreement is None:
            return {}
        extra = self._act(trainer, optimizer, params, verdict)
        if not verdict.measured and for_optimizer(CLIPPED_KEY, self._optimizer) in extra:
            # Log the pre-clip total next to the clipped one (measured steps log it anyway).
            extra[total_norm_key(self._optimizer)] = measurement.total_norm
        if self.engine.needs_every_step:
            self._interval.add_step(
                measurement, total_norm_key(self._optimizer), self.engine.reads_loss
            )
        keys = governance_keys(
            self.engine,
            self._interval,
            measurement,
            verdict.checks,
            measured=verdict.measured,
            tripped=bool(verdict.decisions),
        )
        return {**extra, **keys}

    def after_step(
        self,
        trainer: pl.Trainer,
        values: dict[str, float],
        measurement: GradientMeasurement,
        restore: Callable[[], None],
    ) -> dict[str, float]:
        """The rules on the update figures ``values`` of ``measurement``'s step, once the optimizer
        stepped: warn, or halt with the weights from before the update put back (``restore``)
        before the halt checkpoint. Returns the alert counters to log when a rule tripped."""
        decisions, agreement = self.after_rules.decide(
            trainer, values, step=measurement.step, block_names=self.block_names
        )
        if not decisions:
            return {}
        action, checkpoint = strongest(d.action for d in decisions), None
        if action == "halt":
            restore()
            checkpoint = save_halt_checkpoint(trainer, self._halt_dir, measurement.step)
        verdict = Verdict(measurement, True, [], agreement, decisions)  # no batch evidence here
        self._record(trainer, decisions, verdict, action, checkpoint)
        return self.engine.counters()

    def _due(self, step: int) -> bool:
        """Whether an unmeasured step is checked by the every-step rules: their step, and what they
        read is there (parameter figures where ``p.grad`` is the gradient, or the loss)."""
        return (
            self.engine.needs_every_step
            and step % self.check_every_n_steps == 0
            and (self.spec.measure_params or self.engine.reads_loss)
        )

    def _measure_params(
        self, trainer: pl.Trainer, params: NamedParams, step: int
    ) -> GradientMeasurement:
        named_grads = [(name, p.grad) for name, p in params if p.grad is not None]
        loss = self.step_loss(trainer)
        return measure_params(named_grads, self.spec, step=step, loss=loss)  # type: ignore[arg-type]

    def _decide(
        self,
        trainer: pl.Trainer,
        measurement: GradientMeasurement,
        measured: bool,
        evidence: Optional[EvidenceSource],
    ) -> Verdict:
        """Evaluate, agree across ranks (with each rank's evidence when something tripped),
        commit: the same decisions on every rank."""
        values = rule_values(measurement, measured, total_norm_key(self._optimizer))
        nonfinite = has_nonfinite(measurement, measured, self.spec.measure_params)
        checks = self.engine.evaluate(values, nonfinite=nonfinite, measured=measured)
        if measured and not self._matches_checked:
            self._matches_checked = True
            warn_unmatched(self.engine, checks, self.block_names, measurement.step)
        round_ = (
            EvidenceRound(evidence, lambda: self._loss.local(trainer), trainer)
            if evidence
            else None
        )
        agreement = agree(trainer, checks, len(self.engine), round_.payload if round_ else None)
        decisions = self.engine.commit(
            checks,
            agreement.tripped,
            step=measurement.step,
            scaler_active=scaler_enabled(trainer),
            ranks=agreement.ranks,
        )
        verdict = Verdict(measurement, measured, checks, agreement, decisions)
        if round_ is not None and any(agreement.tripped):
            verdict.evidence, verdict.ranks_evidence = round_.settle(
                agreement.extras, measurement, measured, self.spec.norm_type
            )
        return verdict

    # -- acting ----------------------------------------------------------------------------------

    def _act(
        self, trainer: pl.Trainer, optimizer: Optimizer, params: NamedParams, verdict: Verdict
    ) -> dict[str, float]:
        """Apply the strongest action of this step's decisions and record every decision."""
        measurement = verdict.measurement
        if not verdict.decisions or measurement is None:
            return {}
        total = measurement.total_norm
        # clip_grad_norm_ with an Inf total turns every gradient into NaN: never clip then.
        decisions = [
            dataclasses.replace(d, action=NO_ACTION)
            if d.action == "clip" and not math.isfinite(total)
            else d
            for d in verdict.decisions
        ]
        action = strongest(d.action for d in decisions)
        extra: dict[str, float] = {}
        checkpoint = None
        if action == "clip":
            clipped = clip_to_decisions(params, decisions, total, self.spec)
            extra[for_optimizer(CLIPPED_KEY, self._optimizer)] = clipped
        elif action in ("skip", "halt"):
            if action == "halt":
                checkpoint = save_halt_checkpoint(trainer, self._halt_dir, measurement.step)
            self.actions.skip(trainer, optimizer, params)
        self._record(trainer, decisions, verdict, action, checkpoint)
        return extra

    def _record(
        self,
        trainer: pl.Trainer,
        decisions: list[Decision],
        verdict: Verdict,
        action: Optional[str],
        checkpoint: Optional[str],
    ) -> None:
        """One alert per decision: kept, written to the audit trail, warned about (rate-limited)."""
        alerts = self.incidents.record(
            trainer,
            decisions,
            verdict,
            action=action,
            checkpoint=checkpoint,
            labels=self.engine.labels,
            block_names=self.block_names,
        )
        for decision, alert in zip(decisions, alerts):
            if decision.action == "halt":
                rank_zero_warn(alert.message)
                trainer.should_stop = True
                self.halted, self.halt_reason, self._stopping = True, alert.message, True
            elif _backoff(decision.count):
                rank_zero_warn(alert.message + " (this rule's trips are shown at 1, 2, 4, 8, ...)")

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain data: the rules' counters and statistics, whether training was halted, and the
        every-step figures gathered since the last measured step."""
        return {
            "rules": self.engine.state_dict(),
            "halted": self.halted,
            "halt_reason": self.halt_reason,
            "interval": self._interval.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state.get("rules", {}))
        self.halted = bool(state.get("halted", False))
        self.halt_reason = state.get("halt_reason")
        self._interval.load_state_dict(state.get("interval", {}))


def _backoff(count: int) -> bool:
    """Warn at a rule's 1st, 2nd, 4th, 8th, ... trip (rate limit for rules that trip every step)."""
    return count & (count - 1) == 0
