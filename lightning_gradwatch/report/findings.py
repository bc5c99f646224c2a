"""The report's Diagnosis section: the same checks as the callback, fed from a finished run's logs.

:func:`run_history` rebuilds a :class:`~lightning_gradwatch.diagnosis.run_history.RunHistory` from
the logged ``grad_norm/<block>``, ``grad_norm_total``, ``grad_stats/zero_fraction``,
``grad_noise/`` and ``update_ratio/<block>`` keys (the same rows as the callback keeps: the first measured steps and the last
ones) plus ``gradwatch_model_facts.json`` (model facts, clip bounds, first-step wiring). Without the
facts file the checks that need model facts say less, and their suggestions say that they are
generic: a finding never claims more than its evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from lightning_gradwatch.diagnosis.checks import diagnose
from lightning_gradwatch.diagnosis.findings import Finding, diagnosis_dict, format_findings
from lightning_gradwatch.diagnosis.run_history import (
    FACTS_FILENAME,
    ClipBound,
    RunHistory,
    Settings,
)
from lightning_gradwatch.keys import (
    NOISE_B_SIMPLE_KEY,
    NOISE_BATCH_KEY,
    SHARPNESS_RATIO_KEY,
    UPDATE_RATIO_PREFIX,
    stats_key,
)
from lightning_gradwatch.report.reader import NORM_PREFIX, TOTAL_NORM_TAG, RunLog, Series

__all__ = ["RunDiagnosisReport", "block_norms", "diagnose_run", "run_history"]


class RunDiagnosisReport:
    """The findings of one run with the history they came from.

    Example::

        diagnosis = diagnose_run(run, damping_threshold=0.5, amplifying_threshold=2.0, eps=1e-30)
        print(diagnosis.text())
    """

    def __init__(self, findings: list[Finding], history: RunHistory) -> None:
        self.findings = findings
        self.history = history

    def text(self) -> str:
        """The ``Diagnosis`` section of the text report."""
        steps = self.history.measured
        head = f"Diagnosis (over {steps} measured step{'s' if steps != 1 else ''}):"
        if self.history.facts is None:
            head += f"  [no {FACTS_FILENAME} beside the logs: model facts unknown]"
        body = format_findings(self.findings, self.history)
        return head + "\n" + (body if self.findings else "  " + body)

    def to_dict(self) -> dict[str, Any]:
        return diagnosis_dict(self.findings, self.history) | {
            "model_facts": self.history.facts is not None
        }


def diagnose_run(
    run: RunLog, *, damping_threshold: float, amplifying_threshold: float, eps: float
) -> RunDiagnosisReport:
    """Diagnose ``run`` over all its measured steps with the report's thresholds."""
    history = run_history(run, damping_threshold, amplifying_threshold, eps)
    return RunDiagnosisReport(diagnose(history), history)


def run_history(
    run: RunLog, damping_threshold: float, amplifying_threshold: float, eps: float
) -> RunHistory:
    """The :class:`RunHistory` of ``run`` (facts from the facts file when there is one)."""
    names = run.block_names
    history = RunHistory.from_facts_dict(run.facts or {}, names)
    history.settings = Settings(
        norm_type=str(run.config.get("norm_type", history.settings.norm_type)),
        eps=eps,
        damping_threshold=damping_threshold,
        amplifying_threshold=amplifying_threshold,
        clip_bounds=history.settings.clip_bounds if run.facts else _alert_bounds(run.alerts),
    )
    steps, norms = block_norms(run)
    keys = (
        TOTAL_NORM_TAG,
        stats_key("zero_fraction"),
        NOISE_B_SIMPLE_KEY,
        NOISE_BATCH_KEY,
        SHARPNESS_RATIO_KEY,
    )
    columns = [_aligned(run.scalars.get(key), steps) for key in keys]
    ratios = [_aligned(run.scalars.get(UPDATE_RATIO_PREFIX + name), steps) for name in names]
    logged = any(column is not None for column in ratios)
    for row, step in enumerate(steps.tolist()):
        if not history.needs(row, len(steps)):
            history.skip()  # counted, not kept (the callback drops it too)
            continue
        history.add(step, norms[row].tolist(), *(_value(column, row) for column in columns))
        if logged:  # log_updates=True: each block's update ratio at that step
            history.add_update_ratios(step, [_value(column, row) for column in ratios])
    return history


def block_norms(run: RunLog) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, norms)``: the measured steps and each block's norm there (``RunLog.matrix``); a run
    without blocks has the steps of its total norm(s) (one per optimizer) and no norm column."""
    names = run.block_names
    if names:
        return run.matrix(NORM_PREFIX, names)
    totals = [t for t in run.scalars if t == TOTAL_NORM_TAG or t.startswith(TOTAL_NORM_TAG + "/")]
    steps, _ = run.matrix("", totals)
    return steps, np.zeros((len(steps), 0))


def _aligned(series: Optional[Series], steps: np.ndarray) -> Optional[np.ndarray]:
    """``series`` values at ``steps`` (NaN where it has none), or ``None`` without a series."""
    if series is None:
        return None
    values = np.full(len(steps), np.nan)
    found = np.isin(steps, series.steps)
    values[found] = series.values[np.isin(series.steps, steps)]
    return values


def _value(values: Optional[np.ndarray], row: int) -> Optional[float]:
    return None if values is None else float(values[row])


def _alert_bounds(alerts: Sequence[dict[str, Any]]) -> list[ClipBound]:
    """Without a facts file: the norm-clip bounds that alerts on ``grad_norm_total`` show."""
    bounds: dict[str, ClipBound] = {}
    for alert in alerts:
        threshold = alert.get("threshold")
        if (
            alert.get("action") == "clip"
            and alert.get("metric") == TOTAL_NORM_TAG
            and alert.get("condition", "max") == "max"
            and isinstance(threshold, (int, float))
        ):
            label = f"rule {alert.get('rule', '?')!r}"
            bounds[label] = ClipBound(label, float(threshold))  # the alert does not say clip_to
    return list(bounds.values())
