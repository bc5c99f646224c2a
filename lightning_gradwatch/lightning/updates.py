"""The update figures inside a run (``log_updates=True``): what each measured ``optimizer.step()``
did to the weights and to the optimizer's state, measured around the real step.

At fit start one step post-hook is registered on each of the Trainer's optimizers
(``Optimizer.register_step_post_hook``). On a measured step, once the rules have acted
(``on_before_optimizer_step``: after accumulation, AMP unscaling and the rules' clip or skip), the
local values of the stepping optimizer's parameters are copied (:func:`take_snapshot`); the post
hook compares them with the updated parameters (:func:`measure_update`), logs the figures, lets the
rules on them warn or halt, feeds the diagnosis and frees the copy. An AMP ``GradScaler`` that skips
an overflowing step never calls ``optimizer.step()``: the post hook does not fire, and the batch end
logs that step's update as 0. On every other step the hook returns at once: no copy, no tensor work.

Why the snapshot is taken in ``on_before_optimizer_step`` rather than in a step *pre*-hook: with
Lightning's default precision plugin ``optimizer.step(closure)`` runs its pre-hooks before the
closure, i.e. before the forward and backward of the step, when it is not yet known whether the
step is measured.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_gradwatch.governance.enforcer import RuleEnforcer
from lightning_gradwatch.governance.rules import Rule
from lightning_gradwatch.keys import UPDATE_RATIO_TOTAL_KEY, for_optimizer
from lightning_gradwatch.lightning.context import FitContext
from lightning_gradwatch.lightning.diagnosis import RunDiagnosis
from lightning_gradwatch.lightning.sinks import log_metrics
from lightning_gradwatch.measure.record import GradientMeasurement
from lightning_gradwatch.measure.updates import (
    UpdateMeasurement,
    UpdateSnapshot,
    adam_state,
    measure_update,
    restore,
    take_snapshot,
)

__all__ = ["UpdateWatch", "check_update_rules"]


def check_update_rules(rules: Sequence[Rule], log_updates: bool) -> None:
    """Raise ``ValueError`` for rules on update figures without ``log_updates=True``."""
    after = [rule.metric for rule in rules if rule.after_step]
    if after and not log_updates:
        raise ValueError(
            f"rules on update figures ({', '.join(map(repr, after))}) need `log_updates=True`: "
            "the update figures are measured only then (got log_updates=False)."
        )


@dataclass
class _Pending:
    """A measured step between its snapshot and its figures."""

    snapshot: UpdateSnapshot
    measurement: GradientMeasurement
    blocks: list[tuple[str, list[int]]]


class UpdateWatch:
    """Measures, logs and governs the update figures of a fit (see the module docstring).

    Args:
        enabled: ``log_updates``.
        rules: the callback's rules (those on update figures need ``enabled``).
    """

    def __init__(self, enabled: bool, rules: Sequence[Rule]) -> None:
        check_update_rules(rules, enabled)
        self.enabled = enabled
        #: The latest measured step's update figures (``None`` before the first).
        self.last: Optional[UpdateMeasurement] = None
        self._handles: list[Any] = []
        self._pending: dict[int, _Pending] = {}
        self._trainer: Optional[pl.Trainer] = None
        self._fit: Optional[FitContext] = None
        self._enforcer: Optional[RuleEnforcer] = None
        self._diagnosis: Optional[RunDiagnosis] = None
        self._block_of: dict[int, list[int]] = {}  # parameter id -> indices of its blocks
        self._noted: set[int] = set()  # optimizers told to keep no Adam-style state

    def start(
        self,
        trainer: pl.Trainer,
        fit: FitContext,
        enforcer: RuleEnforcer,
        diagnosis: RunDiagnosis,
    ) -> None:
        """Register the post-hooks (nothing when disabled, or where parameters are not measured)."""
        self.remove()
        self.last, self._noted = None, set()
        if not self.enabled:
            return
        if not fit.spec.measure_params:
            rank_zero_warn(
                "GradientFlowCallback: log_updates=True, but this strategy's parameters are not "
                "measured (see the warning above): the update figures are not logged."
            )
            return
        self._trainer, self._fit = trainer, fit
        self._enforcer, self._diagnosis = enforcer, diagnosis
        self._block_of = {}
        for index, (_, module) in enumerate(fit.blocks):
            for p in module.parameters():
                self._block_of.setdefault(id(p), []).append(index)
        for k, optimizer in enumerate(fit.steps.optimizers):
            register = getattr(_inner(optimizer), "register_step_post_hook", None)
            if register is None:  # not a torch Optimizer: it offers no step hooks
                rank_zero_warn(
                    f"GradientFlowCallback: log_updates=True, but optimizer {k} "
                    f"({type(optimizer).__name__}) has no step hooks: its updates are not logged."
                )
                continue
            self._handles.append(register(functools.partial(self._after_step, k)))

    def total_keys(self, fit: FitContext) -> list[str]:
        """The ``update_ratio_total`` keys of the fit (one per optimizer), for the chart layout."""
        if not self.enabled:
            return []
        return [for_optimizer(UPDATE_RATIO_TOTAL_KEY, name) for name in fit.steps.names]

    def remove(self) -> None:
        """Remove the hooks and drop any snapshot (teardown, ``on_exception``)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._pending = [], {}

    # -- one measured step -----------------------------------------------------------------------

    def before_step(self, k: int, measurement: Optional[GradientMeasurement]) -> None:
        """Optimizer ``k`` is about to step; on a measured step (``measurement``), copy its
        parameters' local values. Call after the rules acted, on every rank."""
        fit = self._fit
        if measurement is None or fit is None or not self._handles:
            return
        self._finish(k, stepped=False)  # a step whose post hook never came (the scaler skipped it)
        held = {
            id(p) for group in _inner(fit.steps.optimizers[k]).param_groups for p in group["params"]
        }
        params = [p for _, p in fit.steps.params[k] if id(p) in held]
        owned = set(fit.steps.blocks[k])
        blocks: list[list[int]] = [[] for _ in fit.blocks]
        for i, p in enumerate(params):
            for b in self._block_of.get(id(p), ()):
                blocks[b].append(i)
        named = [(name, blocks[b]) for b, name in enumerate(fit.block_names) if b in owned]
        snapshot = take_snapshot(params, measurement.step)
        self._pending[k] = _Pending(snapshot, measurement, named)

    def end_batch(self) -> None:
        """The batch ended: a snapshot still waiting belongs to a step an AMP scaler skipped."""
        for k in list(self._pending):
            self._finish(k, stepped=False)

    def _after_step(self, k: int, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if k in self._pending:  # else an unmeasured step: nothing to do
            self._finish(k, stepped=True)

    def _finish(self, k: int, *, stepped: bool) -> None:
        """Optimizer ``k``'s figures, compared with the parameters now (``stepped=False``: the
        step did not happen, the update is 0): logged, read by the rules, kept in the history."""
        pending = self._pending.pop(k, None)
        trainer, fit = self._trainer, self._fit
        if pending is None or trainer is None or fit is None:
            return
        snapshot = pending.snapshot
        state = adam_state(_inner(fit.steps.optimizers[k]), snapshot.params)
        self._note_state(k, state is None, fit)
        update = measure_update(
            snapshot,
            stepped=stepped,
            state=state,
            blocks=pending.blocks,
            optimizer=fit.steps.names[k],
        )
        extra: dict[str, float] = {}
        if stepped and self._enforcer is not None:
            extra = self._enforcer.after_step(
                trainer, update.metrics, pending.measurement, lambda: restore(snapshot)
            )
        pending.measurement.metrics.update(update.metrics)
        self.last = update
        if fit.is_global_zero:
            log_metrics(trainer.loggers, {**update.metrics, **extra}, update.step)
        if self._diagnosis is not None:
            ratios = dict(zip(update.block_names, update.update_ratios))
            history = self._diagnosis.history
            history.add_update_ratios(update.step, [ratios.get(n) for n in history.block_names])

    def _note_state(self, k: int, missing: bool, fit: FitContext) -> None:
        """Say once per optimizer that it keeps no Adam-style state (once it stepped and holds
        state of another kind, or is not built on Adam's ``betas``)."""
        optimizer = _inner(fit.steps.optimizers[k])
        if not missing or k in self._noted:
            return
        if "betas" in getattr(optimizer, "defaults", {}) and not optimizer.state:
            return  # an Adam-style optimizer before its first update
        self._noted.add(k)
        name = fit.steps.names[k]
        which = "the optimizer" if name is None else f"optimizer {name!r}"
        rank_zero_info(
            f"GradientFlowCallback: {which} ({type(optimizer).__name__}) keeps no Adam-style state "
            "(exp_avg, exp_avg_sq): optim/eps_fraction and optim/moment_norm are not logged for it."
        )


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside a ``LightningOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)
