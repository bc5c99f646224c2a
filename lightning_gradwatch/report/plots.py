"""PNG pictures of a run and a self-contained ``report.html`` that embeds them (base64).

Per run: ``norms.png`` (each block's output-gradient norm over the steps, log scale),
``gains.png`` (the blocks x steps heatmap of :func:`lightning_gradwatch.report.pictures.render_flow_heatmap`)
and ``total_norm.png`` (the total parameter-gradient norm with the alerts marked: clip, skip, halt,
warn); with ``log_updates=True``, ``update_ratios.png`` (each block's update-to-weight ratio over the
steps, the usual range shaded). Long runs are thinned to at most ``max_points`` evenly spaced steps before drawing.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_gradwatch.diagnosis.update_checks import UPDATE_RATIO_HIGH, UPDATE_RATIO_LOW
from lightning_gradwatch.keys import UPDATE_RATIO_PREFIX
from lightning_gradwatch.report.incidents import incidents_html
from lightning_gradwatch.report.pictures import import_matplotlib, render_flow_heatmap
from lightning_gradwatch.report.reader import NORM_PREFIX, TOTAL_NORM_TAG, RunLog
from lightning_gradwatch.report.summary import RunReport
from lightning_gradwatch.report.text import format_text

PICTURES = ("norms.png", "gains.png", "total_norm.png")
UPDATES_PICTURE = "update_ratios.png"
_ALERT_STYLE = {
    "halt": {"color": "red", "marker": "X"},
    "skip": {"color": "purple", "marker": "x"},
    "clip": {"color": "orange", "marker": "v"},
    "warn": {"color": "goldenrod", "marker": "o"},
}


def thin(steps: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` evenly spaced entries (first and last kept)."""
    if len(steps) <= max_points:
        return np.arange(len(steps))
    return np.unique(np.linspace(0, len(steps) - 1, max_points).round().astype(np.int64))


def write_run_pictures(
    run: RunLog, report: RunReport, out: Path, max_points: int = 1000
) -> list[Path]:
    """Write the PNGs of one run into ``out`` (created) and return their paths (only
    ``total_norm.png`` for a run without blocks; ``update_ratios.png`` when they were logged)."""
    out.mkdir(parents=True, exist_ok=True)
    names = report.block_names
    if not names:
        total = out / PICTURES[2]
        _save(_total_figure(run, report, max_points), total)
        return [total]
    steps, norms = run.matrix(NORM_PREFIX, names)
    keep = np.isin(steps, report.steps)
    steps, norms = steps[keep], norms[keep]
    rows = thin(steps, max_points)
    steps, norms = steps[rows], norms[rows]
    paths = [out / name for name in PICTURES]
    _save(_norms_figure(steps, names, norms, run.name), paths[0])
    _save(render_flow_heatmap(steps, names, norms, title=run.name, eps=report.eps), paths[1])
    _save(_total_figure(run, report, max_points), paths[2])
    steps, ratios = run.matrix(UPDATE_RATIO_PREFIX, names)
    if len(steps):
        rows = thin(steps, max_points)
        paths.append(out / UPDATES_PICTURE)
        _save(_ratios_figure(steps[rows], names, ratios[rows], run.name), paths[-1])
    return paths


def write_html(
    sections: Sequence[tuple[RunReport, Sequence[Path]]], path: Path, comparison: str = ""
) -> Path:
    """A single HTML file with every run side by side: its PNGs (base64) and its text report."""
    columns = []
    for report, pictures in sections:
        images = "\n".join(
            f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
            f'{base64.b64encode(p.read_bytes()).decode("ascii")}"><figcaption>'
            f"{html.escape(p.name)}</figcaption></figure>"
            for p in pictures
        )
        diagnosis = (
            f'<section class="diagnosis"><h3>Diagnosis</h3>'
            f"<pre>{html.escape(report.diagnosis.text())}</pre></section>\n"
            if report.diagnosis is not None
            else ""
        )
        incidents = incidents_html(report.incidents, report.skip_list)
        columns.append(
            f'<section class="run"><h2>{html.escape(report.name)}</h2>\n{diagnosis}{incidents}'
            f"{images}\n<pre>{html.escape(format_text(report, diagnosis=False))}</pre></section>"
        )
    compare = f"<pre>{html.escape(comparison)}</pre>" if comparison else ""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gradwatch report</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
.runs {{ display: flex; gap: 1.5em; align-items: flex-start; overflow-x: auto; }}
.run {{ flex: 1 1 0; min-width: 32em; }}
img {{ max-width: 100%; }}
pre {{ font-size: 11px; background: #f6f6f6; padding: 0.5em; overflow-x: auto; }}
.diagnosis pre {{ background: #fff6e0; white-space: pre-wrap; }}
.incidents table {{ border-collapse: collapse; font-size: 11px; }}
.incidents td, .incidents th {{ border: 1px solid #ccc; padding: 2px 6px; }}
</style></head>
<body><h1>gradwatch report</h1>
{compare}
<div class="runs">
{chr(10).join(columns)}
</div></body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def _save(figure: Any, path: Path) -> None:
    figure.savefig(path, format="png")


def _ratios_figure(steps: np.ndarray, names: Sequence[str], ratios: np.ndarray, title: str) -> Any:
    figure = _norms_figure(steps, names, ratios, title, "||update|| / ||weights|| (block)")
    axes = figure.axes[0]
    axes.axhspan(UPDATE_RATIO_LOW, UPDATE_RATIO_HIGH, color="green", alpha=0.08, zorder=0)
    axes.set_title(f"{title}: update-to-weight ratio per block (shaded: 1e-4 .. 1e-2)")
    return figure


def _norms_figure(
    steps: np.ndarray,
    names: Sequence[str],
    norms: np.ndarray,
    title: str,
    ylabel: str = "||dL/dh|| (block output)",
) -> Any:
    Figure, FigureCanvasAgg = import_matplotlib()
    from matplotlib import colormaps

    figure = Figure(figsize=(10, 5), dpi=80, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    colours = colormaps["viridis"](np.linspace(0, 1, max(len(names), 1)))
    positive = np.where(norms > 0, norms, np.nan)
    for j, name in enumerate(names):
        axes.plot(steps, positive[:, j], color=colours[j], label=name, linewidth=1)
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(f"{title}: gradient norm per block (dark: first block, yellow: last)")
    if len(names) <= 12:
        axes.legend(fontsize=7, ncols=2)
    return figure


def _total_figure(run: RunLog, report: RunReport, max_points: int) -> Any:
    Figure, FigureCanvasAgg = import_matplotlib()
    figure = Figure(figsize=(10, 3.5), dpi=80, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    # One curve per total: grad_norm_total, or grad_norm_total/<optimizer> with several.
    tags = [t for t in run.scalars if t == TOTAL_NORM_TAG or t.startswith(TOTAL_NORM_TAG + "/")]
    for tag in sorted(tags):
        series = run.scalars[tag]
        keep = np.isin(series.steps, report.steps)
        steps, values = series.steps[keep], series.values[keep]
        rows = thin(steps, max_points)
        colour = "black" if tag == TOTAL_NORM_TAG else None
        axes.plot(steps[rows], values[rows], color=colour, linewidth=1, label=tag)
        if np.any(values > 0):
            axes.set_yscale("log")
    _mark_alerts(axes, report.alerts)
    axes.set_xlabel("step")
    axes.set_ylabel("total gradient norm")
    axes.set_title(f"{run.name}: total gradient norm and alerts")
    axes.legend(fontsize=8)
    return figure


def _mark_alerts(axes: Any, alerts: Sequence[dict[str, Any]]) -> None:
    """One vertical-line collection and two scatters per action (thousands of alerts stay fast):
    alerts on the total norm sit on the curve, the others (or NaN values) along the top edge."""
    groups: dict[str, tuple[list[float], list[float], list[float]]] = {}
    for alert in alerts:
        step = alert.get("step")
        if not isinstance(step, (int, float)):
            continue
        action = str(alert.get("action", "warn")).lower()
        steps, on_curve, values = groups.setdefault(action, ([], [], []))
        value = alert.get("value")
        if (
            alert.get("metric") == TOTAL_NORM_TAG
            and isinstance(value, (int, float))
            and np.isfinite(value)
            and value > 0
        ):
            on_curve.append(step)
            values.append(value)
        else:
            steps.append(step)
    edge = axes.get_xaxis_transform()  # x in data, y in axes fraction
    for action, (steps, on_curve, values) in groups.items():
        style = _ALERT_STYLE.get(action, _ALERT_STYLE["warn"])
        colour, marker = style["color"], style["marker"]
        every = steps + on_curve
        axes.vlines(every, 0, 1, transform=edge, colors=colour, alpha=0.4, linewidth=1)
        axes.scatter(on_curve, values, color=colour, marker=marker, zorder=3)
        axes.scatter(
            steps, [0.97] * len(steps), color=colour, marker=marker, zorder=3, transform=edge
        )
        axes.plot([], [], color=colour, marker=marker, label=action)
