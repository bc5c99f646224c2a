"""The first measured step's wiring report: which parameters got no gradient (``grad is None``: not
connected to the loss) or an exactly-zero one, which blocks' gains vanish, and the findings that
already apply at that step.

Where a NaN/Inf started is told by :mod:`lightning_gradwatch.measure.nonfinite`, a missing
``zero_grad()`` by :mod:`lightning_gradwatch.governance.notices`. Plain floats and names: no tensors,
no Lightning, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from lightning_gradwatch.diagnosis.findings import Finding
from lightning_gradwatch.numerics.norms import Category


@dataclass
class FirstStepReport:
    """Gradient wiring seen on the first measured step.

    Attributes:
        no_grad: parameters that require grad but got ``grad is None`` (not connected to the loss).
        zero_grad: parameters whose gradient is exactly zero everywhere (dead units).
        vanishing: blocks whose gain is "vanishing" (their output gradient norm is ~0).
        findings: the diagnoses that already apply at this step
            (:func:`lightning_gradwatch.diagnosis.checks.diagnose` on this one step).
    """

    step: int = 0
    no_grad: list[str] = field(default_factory=list)
    zero_grad: list[str] = field(default_factory=list)
    vanishing: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.no_grad or self.zero_grad or self.vanishing)

    def message(self) -> str:
        if self.ok:
            lines = [
                f"GradientFlowCallback: step {self.step}: every trainable parameter got a non-zero "
                "gradient and no block's gain vanishes."
            ]
            return "\n".join(lines + self._findings_lines())
        lines = [f"GradientFlowCallback: gradient wiring at step {self.step}:"]
        if self.no_grad:
            lines.append(
                f"  {len(self.no_grad)} parameter(s) require grad but got `grad is None` (not "
                f"connected to the loss): {_short(self.no_grad)}"
            )
        if self.zero_grad:
            lines.append(
                f"  {len(self.zero_grad)} parameter(s) got an exactly-zero gradient (dead units?): "
                f"{_short(self.zero_grad)}"
            )
        if self.vanishing:
            lines.append(f"  vanishing gain into block(s): {_short(self.vanishing)}")
        return "\n".join(lines + self._findings_lines())

    def _findings_lines(self) -> list[str]:
        if not self.findings:
            return []
        return [f"  Diagnosis at step {self.step}:", *(f.text("    ") for f in self.findings)]


def first_step_report(
    step: int,
    params_without_grad: Sequence[str],
    params_zero_grad: Sequence[str],
    block_names: Sequence[str],
    categories: Sequence[Category],
) -> FirstStepReport:
    """Build the :class:`FirstStepReport` from a measurement's figures (``params_zero_grad``: the
    parameters whose gradient is exactly zero; ``categories[i]`` is the transition into
    ``block_names[i + 1]``)."""
    return FirstStepReport(
        step=step,
        no_grad=list(params_without_grad),
        zero_grad=list(params_zero_grad),
        vanishing=[
            name
            for name, category in zip(block_names[1:], categories)
            if category == Category.VANISHING
        ],
    )


def _short(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... (+{len(names) - limit})" if len(names) > limit else "")
