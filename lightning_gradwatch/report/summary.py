"""What a report says about one run: per-block norms over the run (last/median/max), per-transition
median gain and category counts, the GradientGainMonitor report of one step, and the alert timeline;
as text
(through :func:`lightning_gradwatch.monitor.format_report`) or as a JSON-ready dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from lightning_gradwatch.flow_arrays import category_masks, gains_array
from lightning_gradwatch.keys import DEFAULT_EPS
from lightning_gradwatch.monitor import format_report
from lightning_gradwatch.norms import Category, classify_gain, step_flow
from lightning_gradwatch.report.diagnosis import RunDiagnosisReport, diagnose_run
from lightning_gradwatch.report.reader import NORM_PREFIX, TOTAL_NORM_TAG, ReportError, RunLog

#: Alerts listed in the text timeline (JSON lists all of them).
MAX_TEXT_ALERTS = 200


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
    other figures cover every reported step.
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
    damping_threshold = _setting(damping_threshold, run, "damping_threshold", 0.5)
    amplifying_threshold = _setting(amplifying_threshold, run, "amplifying_threshold", 2.0)
    eps = _setting(eps, run, "eps", DEFAULT_EPS)
    if not 0 < damping_threshold <= amplifying_threshold:
        raise ReportError(
            "damping threshold must be > 0 and <= the amplifying threshold, got "
            f"{damping_threshold} and {amplifying_threshold}"
        )
    names = run.block_names
    steps, norms = run.matrix(NORM_PREFIX, names)
    alerts = run.alerts
    if step is not None:
        (rows,) = np.nonzero(steps == step)
        if rows.size == 0:
            raise ReportError(f"{run.name}: step {step} was not measured ({_nearest(steps, step)})")
        steps, norms = steps[rows], norms[rows]
        alerts = [a for a in alerts if a.get("step") == step]
    step_row = _step_norms(run, names, int(steps[-1]), norms[-1])
    step_gains, step_log_gains, step_summary = step_flow(
        step_row, eps, damping_threshold, amplifying_threshold
    )
    transitions, counts = _transitions(names, norms, eps, damping_threshold, amplifying_threshold)
    e2e = (
        gains_array(norms[:, [0, -1]], eps)[:, 0] if len(names) > 1 else np.full(len(steps), np.nan)
    )
    return RunReport(
        name=run.name,
        path=str(run.path),
        source=run.source,
        steps=steps,
        step=int(steps[-1]),
        block_names=names,
        blocks=[
            BlockStats(name, _last(norms[:, j]), _nanmedian(norms[:, j]), _nanmax(norms[:, j]))
            for j, name in enumerate(names)
        ],
        transitions=transitions,
        step_norms=step_row,
        step_gains=step_gains,
        step_log_gains=step_log_gains,
        step_summary=step_summary,
        total_norm=_total_norm(run, steps),
        end_to_end={"last": _last(e2e), "median": _nanmedian(e2e)},
        category_totals={key: int(column.sum()) for key, column in counts.items()},
        alerts=alerts,
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


def _setting(value: Optional[float], run: RunLog, key: str, default: float) -> float:
    if value is not None:
        return float(value)
    logged = run.config.get(key)
    return float(logged) if isinstance(logged, (int, float)) else default


def format_text(report: RunReport, diagnosis: bool = True) -> str:
    """The text report: header, the Diagnosis (first, unless ``diagnosis=False``), the GradientGainMonitor
    report of the reported step (each line annotated with the figures over the run), the run
    summary and the alert timeline."""
    steps = report.steps
    span = f"{len(steps)} measured step{'s' if len(steps) != 1 else ''} ({steps[0]} .. {steps[-1]})"
    header = [
        f"Run: {report.name}  ({report.path}, {report.source})",
        f"{span}; {len(report.block_names)} blocks; reported step: {report.step}",
        "",
    ]
    if diagnosis and report.diagnosis is not None:
        header += [report.diagnosis.text(), ""]
    body = format_report(
        report.step_norms,
        report.step_gains,
        report.step_log_gains,
        norm_type=report.norm_type,
        damping_threshold=report.damping_threshold,
        amplifying_threshold=report.amplifying_threshold,
        names=report.block_names,
        title=f"Gradient Flow Report at step {report.step}",
        block_notes=[
            f"[last={_sci(b.last_norm)}, median={_sci(b.median_norm)}, max={_sci(b.max_norm)}]"
            for b in report.blocks
        ],
        transition_notes=[
            f"[median gamma={_num(t.median_gain)}; {_counts(t.counts)}]" for t in report.transitions
        ],
    )
    total, e2e = report.total_norm, report.end_to_end
    footer = [
        "",
        f"Over the run ({span}):",
        f"  End-to-end gain (first block norm / last block norm): last={_num(e2e['last'])}, "
        f"median={_num(e2e['median'])}",
        f"  Total gradient norm: last={_sci(total['last'])}, median={_sci(total['median'])}, "
        f"max={_sci(total['max'])}",
        f"  Transitions by category: {_counts(report.category_totals, keep_zero=True)}",
        "",
        "Alert timeline:",
    ]
    shown = report.alerts[:MAX_TEXT_ALERTS]
    footer += [f"  {format_alert(alert)}" for alert in shown] or ["  (no alerts)"]
    if len(report.alerts) > len(shown):
        footer.append(
            f"  ... and {len(report.alerts) - len(shown)} more (all of them: --format json, or "
            "gradwatch_alerts.jsonl)"
        )
    return "\n".join([*header, body, *footer])


def format_alert(alert: dict[str, Any]) -> str:
    """One alert record (``gradwatch_alerts.jsonl``) on one line."""
    action = str(alert.get("action", "?")).upper()
    if action == "NONE":  # tripped, but patience not reached (or the AMP scaler handles it)
        action = "TRIPPED (no action)"
    patience = alert.get("patience")
    if isinstance(patience, int) and patience > 1:
        action += f" [{alert.get('consecutive', '?')}/{patience}]"
    where = f"step {alert.get('step', '?')}"
    if "epoch" in alert:
        where += f" (epoch {alert['epoch']})"
    text = f"{where}: {action} {alert.get('metric', '?')}={_num(alert.get('value'))}"
    if alert.get("threshold") is not None:
        text += f" (threshold {_num(alert.get('threshold'))})"
    if alert.get("rule"):
        text += f" rule={alert['rule']}"
    culprits = alert.get("blocks") or alert.get("params")
    if culprits:
        text += f" at {', '.join(map(str, culprits)) if isinstance(culprits, list) else culprits}"
    checkpoint = alert.get("checkpoint") or alert.get("checkpoint_path")
    if checkpoint:
        text += f" checkpoint={checkpoint}"
    return text


def format_comparison(reports: Sequence[RunReport]) -> str:
    """One line per run: blocks, steps, end-to-end gain, total norm, category totals, alerts."""
    width = max(len("run"), *(len(r.name) for r in reports))
    cats = [c.value for c in Category]
    head = f"{'run':<{width}}  blocks  steps  e2e gain (median)  total norm (median)  " + "  ".join(
        cats
    )
    lines = ["Comparison", "=" * len(head), head]
    for r in reports:
        counts = "  ".join(f"{r.category_totals[c]:>{len(c)}d}" for c in cats)
        lines.append(
            f"{r.name:<{width}}  {len(r.block_names):>6d}  {len(r.steps):>5d}  "
            f"{_sci(r.end_to_end['median']):>17}  {_sci(r.total_norm['median']):>19}  {counts}"
            + (f"  alerts: {len(r.alerts)}" if r.alerts else "")
        )
    return "\n".join(lines)


def to_dict(report: RunReport) -> dict[str, Any]:
    """The report as plain JSON types (NaN -> ``None``, infinities -> ``"inf"``/``"-inf"``)."""
    blocks = []
    for j, block in enumerate(report.blocks):
        into = report.transitions[j - 1] if j > 0 else None
        blocks.append(
            {
                "name": block.name,
                "norm": report.step_norms[j],
                "last_norm": block.last_norm,
                "median_norm": block.median_norm,
                "max_norm": block.max_norm,
                "median_gain": into.median_gain if into else None,
                "categories": into.counts if into else None,
            }
        )
    transitions = [
        {
            "from": t.source,
            "to": t.target,
            "label": f"Transition {t.index} to {t.index + 1}",
            "gain": report.step_gains[t.index],
            "log_gain": report.step_log_gains[t.index],
            "category": _category(report, report.step_gains[t.index]),
            "median_gain": t.median_gain,
            "categories": t.counts,
        }
        for t in report.transitions
    ]
    data = {
        "diagnosis": report.diagnosis.to_dict() if report.diagnosis is not None else None,
        "name": report.name,
        "path": report.path,
        "source": report.source,
        "measured_steps": {
            "count": len(report.steps),
            "first": int(report.steps[0]),
            "last": int(report.steps[-1]),
        },
        "step": report.step,
        "norm_type": report.norm_type,
        "thresholds": {
            "damping": report.damping_threshold,
            "amplifying": report.amplifying_threshold,
        },
        "blocks": blocks,
        "transitions": transitions,
        "summary": report.step_summary,
        "run": {
            "end_to_end_gain": report.end_to_end,
            "total_norm": report.total_norm,
            "categories": report.category_totals,
        },
        "alerts": report.alerts,
    }
    return json_safe(data)


def json_safe(value: Any) -> Any:
    """``value`` with NaN as ``None`` and infinities as strings, so strict JSON parsers accept it."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if math.isnan(number):
            return None
        if math.isinf(number):
            return "inf" if number > 0 else "-inf"
        return number
    return value


def _category(report: RunReport, gain: Optional[float]) -> str:
    return classify_gain(gain, report.damping_threshold, report.amplifying_threshold).value


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


def _counts(counts: dict[str, int], keep_zero: bool = False) -> str:
    shown = [f"{key} {value}" for key, value in counts.items() if value or keep_zero]
    return ", ".join(shown) or "none"


def _sci(value: Optional[float]) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3e}"


def _num(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        if math.isnan(number) or math.isinf(number):
            return str(number)
        return f"{number:.4g}"
    return "n/a" if value is None else str(value)
