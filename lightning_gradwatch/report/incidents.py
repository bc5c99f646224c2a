"""The incidents of a run, from its alert trail: one row per alert that names its batch (step, rule,
action, batch, rank, rerun verdict), and the skip list beside the trail, for the text, JSON and HTML
reports."""

from __future__ import annotations

import html
import os
import posixpath
from collections.abc import Sequence
from typing import Any, Optional, Union

from lightning_gradwatch.files import filesystem, join
from lightning_gradwatch.governance.forensics import batch_text
from lightning_gradwatch.governance.skip_list import SKIP_LIST_FILENAME

__all__ = [
    "MAX_TEXT_INCIDENTS",
    "find_skip_list",
    "format_incidents",
    "incident_rows",
    "incidents_html",
]

#: Incidents listed in the text report (JSON lists all of them).
MAX_TEXT_INCIDENTS = 200


def incident_rows(alerts: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per alert record that names its batch (records written before forensics existed,
    or without a batch, are not incidents)."""
    rows = []
    for alert in alerts:
        batch_idx = alert.get("batch_idx")
        if batch_idx is None and not alert.get("fingerprints"):
            continue
        epoch = alert.get("epoch") if isinstance(alert.get("epoch"), int) else 0
        origin = alert.get("origin_rank")
        rerun = alert.get("rerun")
        rows.append(
            {
                "step": alert.get("step"),
                "rule": alert.get("rule"),
                "action": alert.get("action"),
                "epoch": epoch,
                "batch_idx": batch_idx,
                "batch": batch_text(epoch, batch_idx),  # type: ignore[arg-type]
                "rank": origin if isinstance(origin, int) else alert.get("rank"),
                "verdict": rerun.get("verdict") if isinstance(rerun, dict) else None,
                "fingerprints": alert.get("fingerprints") or [],
                "skip_list": alert.get("skip_list"),
                "message": alert.get("message", ""),
            }
        )
    return rows


def find_skip_list(path: Union[str, os.PathLike[str]]) -> Optional[str]:
    """The ``gradwatch_skipped_batches.json`` in the run folder ``path`` (a local path or a URL)
    or below it, if any."""
    text = os.fspath(path)
    fs, inner = filesystem(text)
    try:
        found = sorted(f for f in fs.find(inner) if posixpath.basename(f) == SKIP_LIST_FILENAME)
    except (OSError, ValueError):
        return None
    if not found:
        return None
    return join(text, *posixpath.relpath(found[0], inner).split("/"))


def format_incidents(rows: Sequence[dict[str, Any]], skip_list: Optional[str]) -> list[str]:
    """The text section: a header naming the skip list, then one line per incident."""
    header = "Incidents" + (f" (skip list: {skip_list})" if skip_list else "") + ":"
    lines = [header]
    for row in rows[:MAX_TEXT_INCIDENTS]:
        verdict = f" rerun={row['verdict']}" if row["verdict"] else ""
        lines.append(
            f"  step {row['step']}: {str(row['action']).upper()} rule={row['rule']} "
            f"batch ({row['batch']}) rank {row['rank']}{verdict}"
        )
    if len(rows) > MAX_TEXT_INCIDENTS:
        lines.append(
            f"  ... and {len(rows) - MAX_TEXT_INCIDENTS} more (all of them: --format json)"
        )
    if not rows:
        lines.append("  (none)")
    return lines


def incidents_html(rows: Sequence[dict[str, Any]], skip_list: Optional[str]) -> str:
    """The HTML table of the incidents (empty without any)."""
    if not rows:
        return ""
    head = ("step", "rule", "action", "batch", "rank", "rerun verdict", "fingerprints")
    cells = "\n".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(value))}</td>"
            for value in (
                row["step"],
                row["rule"],
                row["action"],
                row["batch"],
                row["rank"],
                row["verdict"] or "",
                ", ".join(str(f) for f in row["fingerprints"]),
            )
        )
        + "</tr>"
        for row in rows[:MAX_TEXT_INCIDENTS]
    )
    listed = f"<p>Skip list: {html.escape(skip_list)}</p>" if skip_list else ""
    titles = "".join(f"<th>{name}</th>" for name in head)
    return (
        f'<section class="incidents"><h3>Incidents</h3>{listed}<table>'
        f"<tr>{titles}</tr>\n{cells}</table></section>\n"
    )
