"""Applying governance inside a Lightning run: the per-step check, the cross-rank agreement, the
actions (clip / skip / halt), alerts and diagnosis reports.

:class:`~lightning_gradwatch.callback.GradientFlowCallback` forwards three hooks here; the rules
themselves live in :mod:`lightning_gradwatch.governance` (pure), the records in
:mod:`lightning_gradwatch.alerts`, the diagnosis in :mod:`lightning_gradwatch.diagnosis`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_gradwatch.alerts import ALERTS_FILENAME, Alert, JsonlAlertSink
from lightning_gradwatch.diagnosis import (
    MANUAL_ZERO_GRAD_WARNING,
    FirstStepReport,
    NonFiniteReport,
    first_step_report,
    holds_stale_gradients,
    locate_nonfinite,
)
from lightning_gradwatch.distributed import ReductionPlan
from lightning_gradwatch.governance import (
    NO_ACTION,
    Check,
    Decision,
    Rule,
    RuleEngine,
    strongest,
)
from lightning_gradwatch.keys import CLIPPED_KEY, PARAM_NORM_PREFIX, TOTAL_NORM_KEY
from lightning_gradwatch.measurement import (
    GradientMeasurement,
    MeasurementSpec,
    measure_params,
)
from lightning_gradwatch.strategies import scaler_enabled

NamedParams = Sequence[tuple[str, nn.Parameter]]
#: Manual optimization: how many first steps always get the missing-``zero_grad()`` check.
ZERO_GRAD_CHECK_STEPS = 3


class RuleEnforcer:
    """Runs the rules of a :class:`GradientFlowCallback` and acts on what they decide.

    Args:
        rules: the validated rules.
        check_every_n_steps: check ``grad_norm_total`` / ``nonfinite`` rules every n optimizer steps.
        alerts_path: JSONL audit trail (``None``: ``gradwatch_alerts.jsonl`` in the first logger's
            ``log_dir``, else in ``trainer.default_root_dir``).
        spec: the callback's measuring spec (its ``norm_type`` is the norm of ``grad_norm_total``).
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        check_every_n_steps: int,
        alerts_path: Optional[str],
    ) -> None:
        self.engine = RuleEngine(rules)
        self.check_every_n_steps = check_every_n_steps
        self.alerts_path = alerts_path
        self.spec = MeasurementSpec()
        self.plan = ReductionPlan()
        self.alerts: list[Alert] = []
        self.halted = False
        self.halt_reason: Optional[str] = None
        self.first_step_report: Optional[FirstStepReport] = None
        self._sink: Optional[JsonlAlertSink] = None
        self.block_names: list[str] = []
        self._stopping = False  # halted in this run: every later update is skipped too
        self._checked_step = -1
        self._loss_nonfinite: Optional[Tensor] = None
        self._new_step = False
        self._warned_zero_grad = False
        self._paused_clip_val: Optional[float] = None
        self._matches_checked = False

    # -- lifecycle -------------------------------------------------------------------------------

    def setup(
        self,
        trainer: pl.Trainer,
        block_names: Sequence[str],
        spec: MeasurementSpec,
        plan: ReductionPlan,
    ) -> None:
        """Start a fit: the watched blocks, what is measured and how it reduces across ranks."""
        self.block_names = list(block_names)
        self.spec, self.plan = spec, plan
        self._stopping = False
        self._checked_step = -1
        self._loss_nonfinite = None
        self._new_step = False
        self._matches_checked = False
        if trainer.is_global_zero:
            self._sink = JsonlAlertSink(self.alerts_path or default_alerts_path(trainer))

    def end_step(self, trainer: pl.Trainer) -> None:
        """After the optimizer step: give back a ``gradient_clip_val`` paused by a dropped step."""
        if self._paused_clip_val is not None:
            trainer.gradient_clip_val, self._paused_clip_val = self._paused_clip_val, None

    @property
    def sink_path(self) -> Optional[str]:
        return self._sink.path if self._sink is not None else None

    # -- backward --------------------------------------------------------------------------------

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor, params: NamedParams
    ) -> None:
        if self.engine.rules and isinstance(loss, Tensor):
            # Kept on the device and read only when a non-finite alert needs it: no sync here.
            bad = ~torch.isfinite(loss.detach()).all()
            self._loss_nonfinite = (
                bad if self._loss_nonfinite is None else self._loss_nonfinite | bad
            )
        if self._new_step and not pl_module.automatic_optimization:
            self._new_step = False
            step = trainer.global_step
            if not self._warned_zero_grad and step <= ZERO_GRAD_CHECK_STEPS:
                grads = [p.grad for _, p in params if p.grad is not None]
                if holds_stale_gradients(grads):  # type: ignore[arg-type]
                    self._warned_zero_grad = True
                    rank_zero_warn(MANUAL_ZERO_GRAD_WARNING.format(step=step))

    # -- optimizer step --------------------------------------------------------------------------

    def on_before_optimizer_step(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Optimizer,
        params: NamedParams,
        measurement: Optional[GradientMeasurement],
    ) -> dict[str, float]:
        """Check the rules at this step and act. Returns extra metrics to log at this step."""
        step = trainer.global_step
        self._new_step = True
        if measurement is not None and self.first_step_report is None:
            self._report_first_step(measurement, params)
        if self._stopping:
            self._drop_gradients(trainer, optimizer, params)
            return {}
        if not self.engine.rules or step == self._checked_step:
            return {}
        measured = measurement is not None
        # Where p.grad is not the gradient (FSDP1, DeepSpeed) only measured block figures count.
        if not measured and not (
            self.spec.measure_params
            and self.engine.needs_every_step
            and step % self.check_every_n_steps == 0
        ):
            self._loss_nonfinite = None
            return {}
        self._checked_step = step
        if measurement is None:
            named_grads = [(name, p.grad) for name, p in params if p.grad is not None]
            measurement = measure_params(named_grads, self.spec, self.plan, step=step)  # type: ignore[arg-type]
        # Unmeasured steps know the total norm only (no block figures): nothing else may match.
        values = dict(measurement.metrics) if measured else {TOTAL_NORM_KEY: measurement.total_norm}
        if not measurement.param_norms:  # no parameter has a gradient: there is no total norm
            values.pop(TOTAL_NORM_KEY, None)
        nonfinite_params = [n for n, v in measurement.param_norms.items() if not math.isfinite(v)]
        # Per-parameter norms, not the total: with no gradient at all the total is NaN too.
        nonfinite = bool(nonfinite_params or measurement.nonfinite_blocks)
        checks = self.engine.evaluate(values, nonfinite=nonfinite, measured=measured)
        if measured and not self._matches_checked:
            self._matches_checked = True
            self._warn_unmatched(checks, step)
        tripped, ranks, peer_values = self._agree(trainer, checks)
        scaler = scaler_enabled(trainer)
        decisions = self.engine.commit(
            checks, tripped, step=step, scaler_active=scaler, ranks=ranks
        )
        loss_flag = self._loss_nonfinite
        self._loss_nonfinite = None
        if not decisions:
            return {}
        report = None
        if nonfinite:
            report = locate_nonfinite(
                self.block_names,
                nonfinite_params,
                measurement.block_norms if measured else None,
                bool(loss_flag) if loss_flag is not None else None,
                chained=measurement.chained if measured else None,
            )
        extra = self._act(
            trainer, optimizer, params, decisions, measurement, report, scaler, peer_values
        )
        if not measured and CLIPPED_KEY in extra:
            # Log the pre-clip total next to the clipped one (measured steps log it anyway).
            extra[TOTAL_NORM_KEY] = measurement.total_norm
        return {**self.engine.counters(), **extra}

    def _drop_gradients(
        self, trainer: pl.Trainer, optimizer: Optimizer, params: NamedParams
    ) -> None:
        _drop_gradients(optimizer, params)
        # torch's clip_grad_value_ raises on a list without any gradient, so Lightning's own value
        # clipping (which runs after this hook) would crash a skipped step: pause it until the step
        # ends (`end_step`). Norm clipping copes with no gradients.
        if (
            self._paused_clip_val is None
            and trainer.gradient_clip_val
            and trainer.gradient_clip_algorithm == "value"
        ):
            self._paused_clip_val = trainer.gradient_clip_val
            trainer.gradient_clip_val = None

    def _agree(
        self, trainer: pl.Trainer, checks: Sequence[Check]
    ) -> tuple[list[bool], list[list[int]], dict[int, float]]:
        """Which checks tripped on any rank, on which ranks, and a value from a tripping rank.

        One boolean all-reduce per check step (``reduce_boolean_decision(all=False)``); only when
        something tripped somewhere, one ``all_gather`` of a (rules x 2) vector. Every rank calls the
        same collectives in the same order, so a trip on one rank never leaves another waiting.
        """
        local = [check.tripped for check in checks]
        rank = trainer.global_rank
        anywhere = trainer.strategy.reduce_boolean_decision(any(local), all=False)
        if trainer.world_size <= 1 or not anywhere:
            return local, [[rank] if t else [] for t in local], {}
        n = len(self.engine)
        row = torch.zeros(n, 2, dtype=torch.float64, device=trainer.strategy.root_device)
        for check in checks:
            worst = check.worst
            if worst is not None:
                row[check.index, 0] = 1.0
                row[check.index, 1] = worst.value
        gathered = trainer.strategy.all_gather(row).reshape(-1, n, 2).tolist()
        tripped, ranks = [], []
        peer_values: dict[int, float] = {}
        for check in checks:
            on = [r for r, rows in enumerate(gathered) if rows[check.index][0] > 0]
            tripped.append(bool(on))
            ranks.append(on)
            if on:
                peer_values[check.index] = gathered[on[0]][check.index][1]
        return tripped, ranks, peer_values

    # -- acting ----------------------------------------------------------------------------------

    def _act(
        self,
        trainer: pl.Trainer,
        optimizer: Optimizer,
        params: NamedParams,
        decisions: list[Decision],
        measurement: GradientMeasurement,
        report: Optional[NonFiniteReport],
        scaler: bool,
        peer_values: dict[int, float],
    ) -> dict[str, float]:
        extra: dict[str, float] = {}
        total = measurement.total_norm
        action = strongest(d.action for d in decisions)
        checkpoint = None
        if action == "clip" and not math.isfinite(total):
            # clip_grad_norm_ with an Inf total turns every gradient into NaN: never clip then.
            for d in decisions:
                if d.action == "clip":
                    d.action = NO_ACTION
            action = strongest(d.action for d in decisions)
        if action == "clip":
            extra[CLIPPED_KEY] = self._clip(
                params, [d.rule for d in decisions if d.action == "clip"], total
            )
        elif action in ("skip", "halt"):
            if action == "halt":
                checkpoint = self._save_halt_checkpoint(trainer, measurement.step)
            self._drop_gradients(trainer, optimizer, params)
        alerts = [
            self._alert(trainer, d, measurement, report, scaler, peer_values, action, checkpoint)
            for d in decisions
        ]
        for alert in alerts:
            self.alerts.append(alert)
            if self._sink is not None:
                self._sink.write(alert)
        for d, alert in zip(decisions, alerts):
            if d.action == "halt" or _backoff(d.count):
                rank_zero_warn(
                    alert.message
                    + (
                        ""
                        if d.action == "halt"
                        else " (this rule's trips are shown at 1, 2, 4, 8, ...)"
                    )
                )
        if action == "halt":
            reason = next(a.message for a in alerts if a.action == "halt")
            trainer.should_stop = True
            self.halted, self.halt_reason, self._stopping = True, reason, True
        return extra

    def _clip(self, params: NamedParams, rules: list[Rule], total: float) -> float:
        """Clip gradients in place by the tightest acting rule per mode; the total norm after it."""
        grads = [p.grad for _, p in params if p.grad is not None]
        if not grads:
            return total
        by_norm = [r.clip_to for r in rules if r.clip_mode == "norm" and r.clip_to is not None]
        by_value = [r.clip_to for r in rules if r.clip_mode == "value" and r.clip_to is not None]
        if by_value:
            torch.nn.utils.clip_grad_value_(
                [p for _, p in params if p.grad is not None], min(by_value)
            )
        if by_norm:
            if by_value:  # the total changed: measure it again (one more sync, clip steps only)
                total = self._total_norm(params)
            # The same coefficient as clip_grad_norm_, from the total already on the host.
            coef = min(by_norm) / (total + 1e-6)
            if coef < 1.0:
                torch._foreach_mul_(grads, coef)  # type: ignore[arg-type]
                return total * coef
            return total
        return self._total_norm(params)

    def _total_norm(self, params: NamedParams) -> float:
        """The total norm of the gradients as they are now (combined across ranks)."""
        named_grads = [(name, p.grad) for name, p in params if p.grad is not None]
        return measure_params(named_grads, self.spec, self.plan, step=-1).total_norm  # type: ignore[arg-type]

    def _save_halt_checkpoint(self, trainer: pl.Trainer, step: int) -> str:
        """Save the weights before the bad update; called on every rank (rank 0 writes)."""
        directory = os.path.dirname(self.sink_path or "") or trainer.default_root_dir
        path = trainer.strategy.broadcast(
            os.path.join(directory, f"gradwatch_halt_step{step}.ckpt")
        )
        trainer.save_checkpoint(path)
        return path

    def _alert(
        self,
        trainer: pl.Trainer,
        decision: Decision,
        measurement: GradientMeasurement,
        report: Optional[NonFiniteReport],
        scaler: bool,
        peer_values: dict[int, float],
        action: Optional[str],
        checkpoint: Optional[str],
    ) -> Alert:
        rule, check = decision.rule, decision.check
        worst = check.worst
        value = worst.value if worst is not None else peer_values.get(check.index, math.nan)
        alert = Alert(
            step=decision.step,
            epoch=trainer.current_epoch,
            rank=decision.ranks[0] if decision.ranks else trainer.global_rank,
            ranks=decision.ranks,
            rule=self.engine.labels[check.index],
            rule_repr=repr(rule),
            metric=worst.key if worst is not None else rule.metric,
            value=value,
            threshold=worst.threshold if worst is not None else None,
            condition=worst.condition
            if worst is not None
            else ("nonfinite" if rule.is_nonfinite else ""),
            zscore=worst.zscore if worst is not None else None,
            action=decision.action,
            consecutive=decision.consecutive,
            patience=decision.patience,
            keys={v.key: v.value for v in check.violations},
            checkpoint=checkpoint if decision.action == "halt" else None,
        )
        block_names = self.block_names
        alert.blocks = [
            b for b in block_names if any(v.key.endswith("/" + b) for v in check.violations)
        ]
        if report is not None and (rule.is_nonfinite or (worst and worst.condition == "nonfinite")):
            alert.block, alert.blocks, alert.params = report.block, report.blocks, report.params
            alert.loss_nonfinite = report.loss_nonfinite
        else:
            alert.block = alert.blocks[0] if alert.blocks else None
            alert.params = [
                v.key[len(PARAM_NORM_PREFIX) :]
                for v in check.violations
                if v.key.startswith(PARAM_NORM_PREFIX)
            ]
        alert.where = list(dict.fromkeys([*([alert.block] if alert.block else []), *alert.blocks]))
        alert.where += alert.params
        alert.message = _message(alert, report, scaler, action)
        return alert

    # -- first measured step ---------------------------------------------------------------------

    def _warn_unmatched(self, checks: Sequence[Check], step: int) -> None:
        """A rule whose metric names no key of the first measured step can never trip: say so
        once (a misspelt key or block name would otherwise guard nothing, silently)."""
        matched = {check.index for check in checks}
        blocks = ", ".join(self.block_names[:3]) + (", ..." if len(self.block_names) > 3 else "")
        for index, rule in enumerate(self.engine.rules):
            if rule.is_nonfinite or index in matched:
                continue
            hint = (
                "Rules see the logged keys: per-parameter norms are logged for the parameters "
                "that `log_param_norms` selects (default: none)."
                if rule.metric.startswith(PARAM_NORM_PREFIX)
                else f"Block keys look like 'grad_norm/<block>' with blocks {blocks}."
            )
            rank_zero_warn(
                f"GradientFlowCallback: rule {self.engine.labels[index]!r} (metric "
                f"{rule.metric!r}) matches none of the keys logged at step {step}, so it cannot "
                f"trip. {hint}"
            )

    def _report_first_step(self, measurement: GradientMeasurement, params: NamedParams) -> None:
        self.first_step_report = first_step_report(
            measurement.step,
            [name for name, p in params if p.grad is None],
            measurement.param_norms,
            measurement.block_names,
            measurement.categories,
        )
        if self.first_step_report.ok:
            rank_zero_info(self.first_step_report.message())
        else:
            rank_zero_warn(self.first_step_report.message())

    # -- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "rules": self.engine.state_dict(),
            "halted": self.halted,
            "halt_reason": self.halt_reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state.get("rules", {}))
        self.halted = bool(state.get("halted", False))
        self.halt_reason = state.get("halt_reason")


def _message(
    alert: Alert, report: Optional[NonFiniteReport], scaler: bool, action: Optional[str]
) -> str:
    what = (
        report.message()
        if report is not None and alert.condition == "nonfinite"
        else f"{alert.metric} = {alert.value:.6g} ({alert.condition} {alert.threshold})"
    )
    if alert.zscore is not None:
        what += f", z = {alert.zscore:.3g}"
    if alert.action == NO_ACTION:
        if scaler and alert.condition == "nonfinite":
            done = "recorded; the AMP GradScaler skips this step"
        else:
            done = f"recorded, not acting yet ({alert.consecutive}/{alert.patience} consecutive)"
    elif alert.action == "halt":
        done = f"training halted, weights before the update saved to {alert.checkpoint}"
    elif alert.action == "skip" or action in ("skip", "halt"):
        done = "optimizer step skipped (no weight changed)"
    else:
        done = {"warn": "warning", "clip": "gradients clipped"}[alert.action]
    ranks = f" on rank(s) {alert.ranks}" if len(alert.ranks) > 0 else ""
    return f"GradientFlowCallback: rule {alert.rule!r} tripped at step {alert.step}{ranks}: {what}; {done}."


def _backoff(count: int) -> bool:
    """Warn at a rule's 1st, 2nd, 4th, 8th, ... trip (rate limit for rules that trip every step)."""
    return count & (count - 1) == 0


def _drop_gradients(optimizer: Optimizer, params: NamedParams) -> None:
    """``grad = None`` everywhere: SGD, Adam(W) (foreach, fused) then leave weights and state as
    they are. Zeros would not do: Adam still moves weights with zero gradients."""
    for _, p in params:
        p.grad = None
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def default_alerts_path(trainer: pl.Trainer) -> str:
    """``gradwatch_alerts.jsonl`` in the first logger's ``log_dir``, else ``default_root_dir``."""
    directory = None
    if trainer.loggers:
        directory = getattr(trainer.loggers[0], "log_dir", None)
    return os.path.join(directory or trainer.default_root_dir, ALERTS_FILENAME)
