"""What governance tells the user about the wiring rather than about a step: the first measured
step's report, rules that can never trip, a missing ``zero_grad()`` in manual optimization."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_gradwatch.diagnosis import (
    MANUAL_ZERO_GRAD_WARNING,
    FirstStepReport,
    first_step_report,
    holds_stale_gradients,
)
from lightning_gradwatch.governance.actions import NamedParams
from lightning_gradwatch.governance.engine import Check, RuleEngine
from lightning_gradwatch.keys import LOSS, PARAM_NORM_PREFIX
from lightning_gradwatch.measurement import GradientMeasurement

__all__ = [
    "ZERO_GRAD_CHECK_STEPS",
    "report_first_step",
    "stale_gradients_warning",
    "warn_unmatched",
]

#: Manual optimization: how many first steps always get the missing-``zero_grad()`` check.
ZERO_GRAD_CHECK_STEPS = 3


def warn_unmatched(
    engine: RuleEngine, checks: Sequence[Check], block_names: Sequence[str], step: int
) -> None:
    """A rule whose metric names no key of the first measured step can never trip: say so once
    (a misspelt key or block name would otherwise guard nothing, silently)."""
    matched = {check.index for check in checks}
    blocks = ", ".join(block_names[:3]) + (", ..." if len(block_names) > 3 else "")
    for index, rule in enumerate(engine.rules):
        if rule.is_nonfinite or index in matched:
            continue
        if rule.metric == LOSS:
            hint = "The loss is read in on_before_backward: no loss tensor was seen this step."
        elif rule.metric.startswith(PARAM_NORM_PREFIX):
            hint = (
                "Rules see the logged keys: per-parameter norms are logged for the parameters "
                "that `log_param_norms` selects (default: none)."
            )
        else:
            hint = f"Block keys look like 'grad_norm/<block>' with blocks {blocks}."
        rank_zero_warn(
            f"GradientFlowCallback: rule {engine.labels[index]!r} (metric {rule.metric!r}) "
            f"matches none of the keys logged at step {step}, so it cannot trip. {hint}"
        )


def report_first_step(measurement: GradientMeasurement, params: NamedParams) -> FirstStepReport:
    """The first measured step's wiring report, logged as info (all well) or a warning."""
    report = first_step_report(
        measurement.step,
        [name for name, p in params if p.grad is None],
        measurement.param_norms,
        measurement.block_names,
        measurement.categories,
    )
    (rank_zero_info if report.ok else rank_zero_warn)(report.message())
    return report


def stale_gradients_warning(step: int, params: NamedParams) -> Optional[str]:
    """Manual optimization: gradients still there at the first backward of steps 1 to
    :data:`ZERO_GRAD_CHECK_STEPS` mean a missing ``zero_grad()``; the warning to give, if so."""
    if step > ZERO_GRAD_CHECK_STEPS:
        return None
    grads = [p.grad for _, p in params if p.grad is not None]
    if not holds_stale_gradients(grads):  # type: ignore[arg-type]
        return None
    return MANUAL_ZERO_GRAD_WARNING.format(step=step)
