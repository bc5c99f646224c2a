"""A :class:`~lightning_gradwatch.report.summary.RunReport` as words: the text report (the Diagnosis
first, then the GradientGainMonitor report of one step through
:func:`lightning_gradwatch.monitor.format_report`, the run summary, the alert timeline and the
incidents), the side-by-side comparison, and the JSON-ready dict."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

from lightning_gradwatch.governance.alerts import json_safe
from lightning_gradwatch.monitor import format_report
from lightning_gradwatch.numerics.norms import Category, classify_gain
from lightning_gradwatch.report.incidents import format_incidents
from lightning_gradwatch.report.summary import RunReport

#: Alerts listed in the text timeline (JSON lists all of them).
MAX_TEXT_ALERTS = 200
#: The flow section of a run that watched no blocks (a model without any).
NO_BLOCKS = "No blocks were watched: parameter figures only (no block norms or gains)."


def format_text(report: RunReport, diagnosis: bool = True) -> str:
    """The text report: header, the Diagnosis (first, unless ``diagnosis=False``), the GradientGainMonitor
    report of the reported step (each line annotated with the figures over the run), the run
    summary, the alert timeline and the incidents (with the skip list's path)."""
    steps = report.steps
    span = f"{len(steps)} measured step{'s' if len(steps) != 1 else ''} ({steps[0]} .. {steps[-1]})"
    header = [
        f"Run: {report.name}  ({report.path}, {report.source})",
        f"{span}; {len(report.block_names)} blocks; reported step: {report.step}",
        "",
    ]
    if diagnosis and report.diagnosis is not None:
        header += [report.diagnosis.text(), ""]
    blocks = bool(report.block_names)
    body = _flow_report(report) if blocks else NO_BLOCKS
    total, e2e = report.total_norm, report.end_to_end
    footer = ["", f"Over the run ({span}):"]
    if blocks:
        footer.append(
            f"  End-to-end gain (first block norm / last block norm): last={_num(e2e['last'])}, "
            f"median={_num(e2e['median'])}"
        )
    footer.append(
        f"  Total gradient norm: last={_sci(total['last'])}, median={_sci(total['median'])}, "
        f"max={_sci(total['max'])}"
    )
    if blocks:
        footer.append(
            f"  Transitions by category: {_counts(report.category_totals, keep_zero=True)}"
        )
    footer += ["", "Alert timeline:"]
    shown = report.alerts[:MAX_TEXT_ALERTS]
    footer += [f"  {format_alert(alert)}" for alert in shown] or ["  (no alerts)"]
    if len(report.alerts) > len(shown):
        footer.append(
            f"  ... and {len(report.alerts) - len(shown)} more (all of them: --format json, or "
            "gradwatch_alerts.jsonl)"
        )
    footer += ["", *format_incidents(report.incidents, report.skip_list)]
    return "\n".join([*header, body, *footer])


def _flow_report(report: RunReport) -> str:
    """The GradientGainMonitor report of the reported step, annotated with the run's figures."""
    return format_report(
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
    """The report as plain JSON types (NaN, a missing value here, as ``None``; infinities as
    ``"inf"``/``"-inf"``: :func:`~lightning_gradwatch.governance.alerts.json_safe`)."""
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
        "incidents": report.incidents,
        "skip_list": report.skip_list,
    }
    return json_safe(data, nan=None)


def _category(report: RunReport, gain: Optional[float]) -> str:
    return classify_gain(gain, report.damping_threshold, report.amplifying_threshold).value


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
