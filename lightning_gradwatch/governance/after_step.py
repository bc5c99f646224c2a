"""Rules on the update figures (``update_ratio_total``, ``update_ratio/<block>``, ...; see
``log_updates``): they are known only once the optimizer stepped, when there is nothing left to clip
or skip, so such a rule may ``warn`` or ``halt`` (:class:`~lightning_gradwatch.governance.rules.Rule`
refuses the rest). A halt puts the weights from before the update back first, so the halt
checkpoint holds the last good weights (:meth:`RuleEnforcer.after_step`).

The update figures are reduced across ranks before they get here, yet the ranks still agree on what
tripped (as for every rule): copies of a parameter that tensor parallelism leaves replicated may
differ in their last bits between ranks, so one rank alone could cross a bound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import lightning.pytorch as pl

from lightning_gradwatch.governance.agreement import Agreement, agree
from lightning_gradwatch.governance.engine import Decision, RuleEngine
from lightning_gradwatch.governance.notices import warn_unmatched

__all__ = ["AfterStepRules"]


class AfterStepRules:
    """The rules of an engine that read update figures, checked after each measured step.

    Example::

        rules = AfterStepRules(engine)
        decisions, agreement = rules.decide(trainer, {"update_ratio_total": 2.0}, step=10)
    """

    def __init__(self, engine: RuleEngine) -> None:
        self.engine = engine
        self.active = any(rule.after_step for rule in engine.rules)
        self.checked = False  # the first check warns about rules that match nothing

    def decide(
        self,
        trainer: pl.Trainer,
        values: Mapping[str, float],
        *,
        step: int,
        block_names: Sequence[str] = (),
    ) -> tuple[list[Decision], Agreement]:
        """Evaluate the rules on ``values``, agree across ranks and commit: the decisions (the
        same on every rank) and the agreement. Call on every rank at the same steps."""
        if not self.active:
            return [], Agreement([], [])
        checks = self.engine.evaluate(values, nonfinite=None, after_step=True)
        if not self.checked:
            self.checked = True
            warn_unmatched(self.engine, checks, block_names, step, after_step=True)
        agreement = agree(trainer, checks, len(self.engine))
        decisions = self.engine.commit(checks, agreement.tripped, step=step, ranks=agreement.ranks)
        return decisions, agreement
