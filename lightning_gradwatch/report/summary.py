"""What a report says about one run: per-block norms over the run (last/median/max), per-transition
median gain and category counts, the figures of one step, the diagnosis and the alert timeline, as a
:class:`RunReport` (:mod:`lightning_gradwatch.report.text` writes it as text or a JSON-ready dict).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from lightning_gradwatch.diagnosis.flow_arrays import category_masks, gains_array
from lightning_gradwatch.keys import DEFAULT_EPS
from lightning_gradwatch.numerics.norms import step_flow
from lightning_gradwatch.report.findings import RunDiagnosisReport, block_norms, diagnose_run
from lightning_gradwatch.report.incidents import find_skip_list, incident_rows
from lightning_gradwatch.report.reader import NORM_PREFIX, TOTAL_NORM_TAG, ReportError, RunLog


@dataclass
class BlockStats:
    """One block's output-gradient norm over the reported steps (NaN where never measured)."""

    name: str
    last_norm: float
    median_norm: float
    max_norm: float


@dataclass
class TransitionStats:
    """Backward gain from block ``index + 1`` into block ``index`` over the reported steps."""

    index: int
    source: str
    target: str
    median_gain: float
    counts: dict[str, int]


@dataclass
class RunReport:
    """Everything ``gradwatch report`` shows for one run.

    ``step_*`` figures are those of the reported step (the last measured one, or ``--step``); the
    other figures cover every reported step. ``incidents`` are the reported alerts that name their
    batch (:func:`~lightning_gradwatch.report.incidents.incident_rows`); ``skip_list`` is the run's
    ``gradwatch_skipped_batches.json``, if it has one.
    """

    name: str
    path: str
    source: str
    steps: np.ndarray
    step: int
    block_names: list[str]
    blocks: list[BlockStats]
    transitions: list[TransitionStats]
    step_norms: list[Optional[float]]
    step_gains: list[Optional[float]]
    step_log_gains: list[Optional[float]]
    step_summary: dict[str, float]
    total_norm: dict[str, float]
    end_to_end: dict[str, float]
    category_totals: dict[str, int]
    alerts: list[dict[str, Any]] = field(default_factory=list)
    damping_threshold: float = 0.5
    amplifying_threshold: float = 2.0
    eps: float = DEFAULT_EPS
    norm_type: str = "as logged"
    diagnosis: Optional[RunDiagnosisReport] = None
    incidents: list[dict[str, Any]] = field(default_factory=list)
    skip_list: Optional[str] = None


def _transitions(
    names: Sequence[str], norms: np.ndarray, eps: float, low: float, high: float
) -> tuple[list[TransitionStats], dict[str, np.ndarray]]:
    """Each transition's median gain and category counts over the steps, and the counts."""
    gains = gains_array(norms, eps)
    masks = category_masks(gains, low, high)
    counts = {category.value: mask.sum(axis=0) for category, mask in masks.items()}
    transitions = [
        TransitionStats(
            index=i,
            source=names[i],
            target=names[i + 1],
            median_gain=_nanmedian(gains[:, i]),
            counts={key: int(column[i]) for key, column in counts.items()},
        )
        for i in range(len(names) - 1)
    ]
    return transitions, counts


def build_report(
    run: RunLog,
    step: Optional[int] = None,
    damping_threshold: Optional[float] = None,
    amplifying_threshold: Optional[float] = None,
    eps: Optional[float] = None,
) -> RunReport:
    """Summarise ``run`` over all measured steps, or over the one measured step ``step``.

    Thresholds and ``eps`` left at ``None`` come from the run's logged settings (what the callback
    used), else the callback's defaults (0.5, 2.0, 1e-30).
    """
    damping_threshold, amplifying_threshold, eps = _settings(
        run, damping_threshold, amplifying_threshold, eps
    )
    names = run.block_names
    steps, norms, alerts = _reported_steps(run, names, step)
    step_row = _step_norms(run, names, int(steps[-1]), norms[-1])
    step_gains, step_log_gains, step_summary = (
        step_flow(step_row, eps, damping_threshold, amplifying_threshold) if names else ([], [], {})
    )
    transitions, counts = _transitions(names, norms, eps, damping_threshold, amplifying_threshold)
    e2e = _end_to_end_gains(names, norms, eps)
    return RunReport(
        name=run.name,
        path=str(run.path),
        source=run.source,
        steps=steps,
        step=int(steps[-1]),
        block_names=names,
        blocks=_block_stats(names, norms),
        transitions=transitions,
        step_norms=step_row,
        step_gains=step_gains,
        step_log_gains=step_log_gains,
        step_summary=step_summary,
        total_norm=_total_norm(run, steps),
        end_to_end={"last": _last(e2e), "median": _nanmedian(e2e)},
        category_totals={key: int(column.sum()) for key, column in counts.items()},
        alerts=alerts,
        incidents=incident_rows(alerts),
        skip_list=find_skip_list(run.path),
        damping_threshold=damping_threshold,
        amplifying_threshold=amplifying_threshold,
        eps=eps,
        norm_type=str(run.config.get("norm_type", "as logged")),
        # Over the run's measured steps (also with --step): findings are about the run.
        diagnosis=diagnose_run(
            run,
            damping_threshold=damping_threshold,
            amplifying_threshold=amplifying_threshold,
            eps=eps,
        ),
    )


def _settings(
    run: RunLog,
    damping_threshold: Optional[float],
    amplifying_threshold: Optional[float],
    eps: Optional[float],
) -> tuple[float, float, float]:
    """``(damping_threshold, amplifying_threshold, eps)``: each argument, else the run's logged
    setting, else the callback's default; a :class:`ReportError` when the thresholds disagree."""
    damping = _setting(damping_threshold, run, "damping_threshold", 0.5)
    amplifying = _setting(amplifying_threshold, run, "amplifying_threshold", 2.0)
    eps_value = _setting(eps, run, "eps", DEFAULT_EPS)
    if not 0 < damping <= amplifying:
        raise ReportError(
            "damping threshold must be > 0 and <= the amplifying threshold, got "
            f"{damping} and {amplifying}"
        )
    return damping, amplifying, eps_value


def _reported_steps(
    run: RunLog, names: Sequence[str], step: Optional[int]
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """The reported measured steps, their norms (steps x blocks) and their alerts: every measured
    step, or only ``step`` (a :class:`ReportError` naming the nearest ones when it was not measured)."""
    steps, norms = block_norms(run)
    if step is None:
        return steps, norms, run.alerts
    (rows,) = np.nonzero(steps == step)
    if rows.size == 0:
        raise ReportError(f"{run.name}: step {step} was not measured ({_nearest(steps, step)})")
    return steps[rows], norms[rows], [a for a in run.alerts if a.get("step") == step]


def _block_stats(names: Sequence[str], norms: np.ndarray) -> list[BlockStats]:
    """Each block's last, median and largest norm over the reported steps."""
    return [
        BlockStats(name, _last(norms[:, j]), _nanmedian(norms[:, j]), _nanmax(norms[:, j]))
        for j, name in enumerate(names)
    ]


def _end_to_end_gains(names: Sequence[str], norms: np.ndarray, eps: float) -> np.ndarray:
    """Per step, the gain from the last block's output gradient back to the first's (NaN with one
    block)."""
    if len(names) > 1:
        return gains_array(norms[:, [0, -1]], eps)[:, 0]
    return np.full(len(norms), np.nan)


def _setting(value: Optional[float], run: RunLog, key: str, default: float) -> float:
    if value is not None:
        return float(value)
    logged = run.config.get(key)
    return float(logged) if isinstance(logged, (int, float)) else default


def _total_norm(run: RunLog, steps: np.ndarray) -> dict[str, float]:
    series = run.scalars.get(TOTAL_NORM_TAG)
    values = np.zeros(0) if series is None else series.values[np.isin(series.steps, steps)]
    return {"last": _last(values), "median": _nanmedian(values), "max": _nanmax(values)}


def _step_norms(
    run: RunLog, names: Sequence[str], step: int, row: np.ndarray
) -> list[Optional[float]]:
    """One step's norms: ``None`` where the block logged nothing (no gradient), NaN where it logged
    a non-finite value (the matrix holds NaN for both)."""
    norms: list[Optional[float]] = []
    for name, value in zip(names, row):
        if not math.isnan(value):
            norms.append(float(value))
            continue
        series = run.scalars.get(NORM_PREFIX + name)
        logged = series is not None and bool(np.any(series.steps == step))
        norms.append(math.nan if logged else None)
    return norms


def _nearest(steps: np.ndarray, step: int) -> str:
    if steps.size == 0:
        return "no measured steps"
    index = int(np.searchsorted(steps, step))
    near = sorted({int(steps[i]) for i in (index - 1, index) if 0 <= i < steps.size})
    return f"nearest measured: {', '.join(map(str, near))}"


def _finite_or_nan(values: np.ndarray) -> np.ndarray:
    return values[~np.isnan(values)]


def _last(values: np.ndarray) -> float:
    kept = _finite_or_nan(values)
    return float(kept[-1]) if kept.size else math.nan


def _nanmedian(values: np.ndarray) -> float:
    kept = _finite_or_nan(values)
    return float(np.median(kept)) if kept.size else math.nan


def _nanmax(values: np.ndarray) -> float:
    kept = _finite_or_nan(values)
    return float(np.max(kept)) if kept.size else math.nan
