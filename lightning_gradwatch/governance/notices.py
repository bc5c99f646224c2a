"""What governance tells the user about the wiring rather than about a step: rules that can never
trip, and a missing ``zero_grad()`` in manual optimization."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_gradwatch._compat import foreach_norm
from lightning_gradwatch.governance.actions import NamedParams
from lightning_gradwatch.governance.engine import Check, RuleEngine
from lightning_gradwatch.keys import CURVATURE_PREFIX, LOSS, PARAM_NORM_PREFIX
from lightning_gradwatch.measure.reduction import local_tensor

__all__ = [
    "ZERO_GRAD_CHECK_STEPS",
    "StaleGradientWatch",
    "warn_unmatched",
]


def holds_stale_gradients(grads: Sequence[Tensor]) -> bool:
    """Whether any of ``grads`` is non-zero (one batched pass, one host sync).

    Called before the first backward of a new optimizer step: after ``zero_grad()`` gradients are
    ``None`` (or zeros), so a non-zero one still holds the previous step's values.
    """
    if not grads:
        return False
    norms = foreach_norm([local_tensor(g) for g in grads], math.inf)
    # Compared in each norm's own dtype: a float64 1e-300 is non-zero, its float32 cast is not.
    return bool(torch.stack([norm > 0 for norm in norms]).any())


#: Manual optimization: how many first steps always get the missing-``zero_grad()`` check.
ZERO_GRAD_CHECK_STEPS = 3


def warn_unmatched(
    engine: RuleEngine,
    checks: Sequence[Check],
    block_names: Sequence[str],
    step: int,
    after_step: bool = False,
) -> None:
    """A rule whose metric names no key of the first measured step can never trip: say so once
    (a misspelt key or block name would otherwise guard nothing, silently). ``after_step``: the
    rules on the update figures, checked on the first step's update figures."""
    matched = {check.index for check in checks}
    blocks = ", ".join(block_names[:3]) + (", ..." if len(block_names) > 3 else "")
    for index, rule in enumerate(engine.rules):
        if rule.is_nonfinite or index in matched or rule.after_step != after_step:
            continue
        if after_step:
            hint = (
                f"Update keys look like 'update_ratio/<block>' with blocks {blocks}, and "
                "'update_ratio_total' ('update_ratio_total/<optimizer>' with several optimizers)."
            )
        elif rule.metric == LOSS:
            hint = "The loss is read in on_before_backward: no loss tensor was seen this step."
        elif rule.metric.startswith(PARAM_NORM_PREFIX):
            hint = (
                "Rules see the logged keys: per-parameter norms are logged for the parameters "
                "that `log_param_norms` selects (default: none)."
            )
        elif rule.metric.startswith(CURVATURE_PREFIX):
            hint = (
                "Curvature keys are logged with log_curvature=True, on curvature steps that are "
                "also measured steps (Adam's ratio from its second step: no v_hat before)."
            )
        elif not block_names:
            hint = "This run watches no blocks: no 'grad_norm/<block>' keys are logged."
        else:
            hint = f"Block keys look like 'grad_norm/<block>' with blocks {blocks}."
        rank_zero_warn(
            f"GradientFlowCallback: rule {engine.labels[index]!r} (metric {rule.metric!r}) "
            f"matches none of the keys logged at step {step}, so it cannot trip. {hint}"
        )


class StaleGradientWatch:
    """Manual optimization: each optimizer's gradients must have been zeroed (``None`` or all zero)
    at some backward since its previous step, else ``zero_grad()`` looks missing for it. Only that
    optimizer's parameters and the backward passes that fed its step count: a generator's
    gradients, still there while the discriminator steps, are no alarm.

    Checked during the first :data:`ZERO_GRAD_CHECK_STEPS` steps of each optimizer (one batched
    norm pass and one host copy per optimizer and backward there), then never again.
    """

    def __init__(self) -> None:
        self._zeroed: dict[int, bool] = {}
        self._steps: dict[int, int] = {}
        self.warned = False

    def before_backward(self, groups: Sequence[NamedParams]) -> None:
        """Note which optimizers' gradients are zeroed as this backward starts."""
        if self.warned:
            return
        for k, params in enumerate(groups):
            if self._steps.get(k, 0) > ZERO_GRAD_CHECK_STEPS or self._zeroed.get(k):
                continue
            grads = [p.grad for _, p in params if p.grad is not None]
            self._zeroed[k] = not holds_stale_gradients(grads)  # type: ignore[arg-type]

    def at_step(self, k: int, name: Optional[str], step: int) -> Optional[str]:
        """Optimizer ``k`` (``name``; ``None`` for the only one) steps: the warning to give, if its
        gradients were never zeroed since its previous step."""
        count = self._steps.get(k, 0)
        self._steps[k] = count + 1
        zeroed, self._zeroed[k] = self._zeroed.get(k, False), False
        if self.warned or count == 0 or count > ZERO_GRAD_CHECK_STEPS or zeroed:
            return None
        self.warned = True
        which = "the optimizer" if name is None else f"optimizer {name!r}"
        return (
            f"GradientFlowCallback: {which} stepped at step {step} on gradients not zeroed since "
            "its previous step: `zero_grad()` looks missing for it in your manual optimization "
            "loop (call `opt.zero_grad()` before each backward that feeds it, or after "
            "`opt.step()`), so its gradients accumulate across steps."
        )
