"""Reading finished runs: TensorBoard event files (tensorboard's own ``Event`` protobuf, see
:func:`~lightning_gradwatch.report.events.iter_events`), or CSVLogger's ``metrics.csv``, plus the
governance alerts (``gradwatch_alerts.jsonl``) and the model facts when present. A run may be a
local folder or a URL (``s3://``, ``gs://``, ``memory://``, ...): every file is listed and read
through its fsspec filesystem, as Lightning wrote it.

Every scalar tag becomes one pair of numpy arrays (steps, values), filled from compact C arrays
(``array.array``) or parsed by numpy in one pass; nothing is kept as Python lists of floats.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from fsspec import AbstractFileSystem

from lightning_gradwatch.diagnosis.run_history import FACTS_FILENAME, FACTS_FORMAT
from lightning_gradwatch.files import filesystem, join
from lightning_gradwatch.governance.alerts import ALERTS_FILENAME as ALERTS_FILE
from lightning_gradwatch.governance.trail import parse_alerts
from lightning_gradwatch.keys import (
    CURVATURE_PREFIX,
    FLOW_PREFIX,
    GAIN_PREFIX,
    LOG_GAIN_PREFIX,
    NOISE_PREFIX,
    NORM_PREFIX,
    PARAM_NORM_PREFIX,
    STATS_PREFIX,
    UPDATE_KEY_PREFIXES,
)
from lightning_gradwatch.keys import TOTAL_NORM_KEY as TOTAL_NORM_TAG
from lightning_gradwatch.report.events import ReportError, iter_events
from lightning_gradwatch.report.pictures import layout_block_names

__all__ = ["ReportError", "RunLog", "Series", "find_runs", "iter_events", "read_logdir", "read_run"]

EVENT_FILE_PATTERN = "events.out.tfevents.*"
CSV_FILE = "metrics.csv"
#: Prefixes of the tags the callback writes (README's metric table).
GRADWATCH_PREFIXES = (
    NORM_PREFIX,
    GAIN_PREFIX,
    LOG_GAIN_PREFIX,
    FLOW_PREFIX,
    STATS_PREFIX,
    PARAM_NORM_PREFIX,
    NOISE_PREFIX,
    CURVATURE_PREFIX,
    *UPDATE_KEY_PREFIXES,
)
#: Tags that make a run a gradwatch run: block norms, or the total (a run without blocks).
MEASURED_PREFIXES = (NORM_PREFIX, TOTAL_NORM_TAG)
#: The tag under which TensorBoard stores a custom-scalars layout.
LAYOUT_TAG = "custom_scalars__config__"
#: The callback's settings (``lightning_gradwatch.lightning.tensorboard.CONFIG_TAG`` as TensorBoard stores text).
CONFIG_TEXT_TAG = "gradwatch/config/text_summary"


@dataclass
class Series:
    """One scalar tag over a run: ``steps`` (int64, ascending, unique) and ``values`` (float64)."""

    steps: np.ndarray
    values: np.ndarray


@dataclass
class RunLog:
    """The gradwatch scalars and alerts of one run.

    Attributes:
        path: the run's folder (a local path or a URL).
        name: a short label (the folder name, or the path relative to the folder given).
        source: ``"tensorboard"`` or ``"csv"``.
        scalars: ``tag -> Series`` for every gradwatch tag.
        alerts: the records of ``gradwatch_alerts.jsonl`` (dicts), ordered by step.
        block_order: block names in forward order when the logs say so (custom-scalars layout or
            order of first appearance in the event file), else ``None``.
        config: the callback's settings (``norm_type``, ``eps``, thresholds) when the logs hold them
            (TensorBoard runs, or ``gradwatch_model_facts.json``), else empty.
        facts: the content of ``gradwatch_model_facts.json`` beside the logs (model facts, settings,
            first-step wiring; see :mod:`lightning_gradwatch.diagnosis.run_history`), else ``None``.
    """

    path: str
    name: str
    source: str
    scalars: dict[str, Series]
    alerts: list[dict[str, Any]] = field(default_factory=list)
    block_order: Optional[list[str]] = None
    config: dict[str, Any] = field(default_factory=dict)
    facts: Optional[dict[str, Any]] = None

    @property
    def block_names(self) -> list[str]:
        """Watched blocks in forward order (natural sort of the names when the order is unknown)."""
        logged = [tag[len(NORM_PREFIX) :] for tag in self.scalars if tag.startswith(NORM_PREFIX)]
        if self.block_order is not None and set(logged) <= set(self.block_order):
            present = set(logged)
            return [name for name in self.block_order if name in present]
        return sorted(logged, key=natural_key)

    def matrix(self, prefix: str, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)``: the tags ``prefix + name`` aligned on the union of their steps;
        ``values`` has shape ``(len(steps), len(names))`` with NaN where a tag has no value."""
        series = [self.scalars.get(prefix + name) for name in names]
        present = [s.steps for s in series if s is not None]
        steps = np.unique(np.concatenate(present)) if present else np.zeros(0, dtype=np.int64)
        values = np.full((len(steps), len(names)), np.nan)
        for column, s in enumerate(series):
            if s is not None:
                values[np.searchsorted(steps, s.steps), column] = s.values
        return steps, values


def natural_key(name: str) -> list[Any]:
    """Sort key that puts ``blocks.10`` after ``blocks.9``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def find_runs(logdir: Union[str, Path]) -> list[str]:
    """Folders under ``logdir`` (itself included; a local path or a URL) holding event files or a
    ``metrics.csv``, spelt like ``logdir``."""
    root = _spelt(logdir)
    fs, inner = filesystem(root)
    if not fs.exists(inner):
        raise ReportError(f"{root}: no such directory")
    if not fs.isdir(inner):
        raise ReportError(f"{root}: not a directory")
    found = {posixpath.dirname(f) for f in fs.find(inner) if _is_log_file(posixpath.basename(f))}
    if not found:
        raise ReportError(
            f"{root}: no TensorBoard event files ({EVENT_FILE_PATTERN}) or {CSV_FILE} found"
        )
    below = (posixpath.relpath(folder, inner) for folder in found)
    return sorted((root if rel == "." else join(root, rel) for rel in below), key=natural_key)


def read_logdir(logdir: Union[str, Path]) -> list[RunLog]:
    """Every run under ``logdir`` that holds gradwatch metrics (a ``ReportError`` if none does)."""
    root = _spelt(logdir)
    runs = []
    for path in find_runs(root):
        run = read_run(path, name=_run_name(root, path))
        if run is not None:
            runs.append(run)
    if not runs:
        raise ReportError(
            f"{root}: logs found, but no gradwatch metrics ({NORM_PREFIX}... or {TOTAL_NORM_TAG}) "
            "in them; was GradientFlowCallback in the Trainer's callbacks?"
        )
    return runs


def read_run(path: Union[str, Path], name: Optional[str] = None) -> Optional[RunLog]:
    """The run in folder ``path`` (a local path or a URL; event files preferred over
    ``metrics.csv``); ``None`` if it has no gradwatch block norms or total norm."""
    location = _spelt(path)
    fs, inner = filesystem(location)
    files = {
        posixpath.basename(entry["name"]): entry["name"]
        for entry in fs.ls(inner, detail=True)
        if entry["type"] == "file"
    }
    label = name or posixpath.basename(inner.rstrip("/"))
    run: Optional[RunLog] = None
    events = sorted(file for base, file in files.items() if fnmatch(base, EVENT_FILE_PATTERN))
    if events:
        run = _read_tensorboard(fs, events, location, label)
    if run is None and CSV_FILE in files:
        run = _read_csv(fs, files[CSV_FILE], location, label)
    if run is None:
        return None
    run.alerts = read_alerts(location)
    if FACTS_FILENAME in files:
        _attach_facts(run, fs.cat_file(files[FACTS_FILENAME]))
    return run


def _spelt(path: Union[str, Path]) -> str:
    """``path`` as a string: a local path normalised (``./logs/`` -> ``logs``), a URL without a
    trailing ``/``."""
    text = os.fspath(path)
    protocol, separator, rest = text.partition("://")
    return f"{protocol}://{rest.rstrip('/')}" if separator else os.path.normpath(text)


def _is_log_file(base: str) -> bool:
    return base == CSV_FILE or fnmatch(base, EVENT_FILE_PATTERN)


def _attach_facts(run: RunLog, raw: bytes) -> None:
    """Keep the facts file's content (if it is one); its settings and block order fill what the
    event files did not say (CSV runs)."""
    facts = _json_object(raw)
    if facts.get("format") != FACTS_FORMAT:
        return
    run.facts = facts
    settings = facts.get("settings")
    if isinstance(settings, dict):
        run.config = {**{k: v for k, v in settings.items() if k != "clip_bounds"}, **run.config}
    blocks = facts.get("blocks")
    if run.block_order is None and isinstance(blocks, list):
        run.block_order = [str(name) for name in blocks]


def read_alerts(path: Union[str, Path]) -> list[dict[str, Any]]:
    """Records of every ``gradwatch_alerts.jsonl`` in ``path`` or below it (a local path or a
    URL), ordered by step."""
    fs, inner = filesystem(_spelt(path))
    records: list[dict[str, Any]] = []
    for file in sorted(f for f in fs.find(inner) if posixpath.basename(f) == ALERTS_FILE):
        lines = fs.cat_file(file).decode("utf-8", errors="replace").splitlines()
        records.extend(r for r in parse_alerts(lines) if isinstance(r, dict))
    records.sort(key=_alert_step)
    return records


def _alert_step(record: dict[str, Any]) -> int:
    step = record.get("step")
    return step if isinstance(step, int) else -1


def _run_name(root: str, path: str) -> str:
    if path == root:
        return Path(root).resolve().name if "://" not in root else posixpath.basename(root)
    return posixpath.relpath(filesystem(path)[1], filesystem(root)[1])


def _is_gradwatch(tag: str) -> bool:
    return tag.startswith(TOTAL_NORM_TAG) or tag.startswith(GRADWATCH_PREFIXES)


def _series(steps: np.ndarray, values: np.ndarray) -> Series:
    """Sorted by step; for a step logged twice (a resumed run) the last value wins."""
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    last = np.ones(len(steps), dtype=bool)
    last[:-1] = steps[1:] != steps[:-1]
    return Series(steps[last].astype(np.int64), values[last].astype(np.float64))


def _read_tensorboard(
    fs: AbstractFileSystem, files: Sequence[str], path: str, name: str
) -> Optional[RunLog]:
    """The gradwatch scalars of the event ``files`` of the run in ``path`` (in name order, i.e.
    time)."""
    # tag -> (steps, values) for gradwatch tags, () for any other: one dict lookup per value
    # instead of a prefix test (100 blocks x 100k steps is 30 M values: the loop is the cost).
    slots: dict[str, tuple[array, ...]] = {}
    layout: Optional[bytes] = None
    config: dict[str, Any] = {}
    for file in files:
        for event in iter_events(file, fs, name=join(path, posixpath.basename(file))):
            if not event.HasField("summary"):
                continue
            step = event.step
            for value in event.summary.value:
                tag = value.tag
                slot = slots.get(tag)
                if slot is None:
                    slot = slots[tag] = (array("q"), array("d")) if _is_gradwatch(tag) else ()
                if slot:
                    if value.WhichOneof("value") == "simple_value":
                        slot[0].append(step)
                        slot[1].append(value.simple_value)
                elif tag == LAYOUT_TAG and value.tensor.string_val:
                    layout = value.tensor.string_val[0]
                elif tag == CONFIG_TEXT_TAG and value.tensor.string_val:
                    config = _json_object(value.tensor.string_val[0])
    steps = {tag: slot[0] for tag, slot in slots.items() if slot and len(slot[0])}
    values = {tag: slots[tag][1] for tag in steps}
    if not any(tag.startswith(MEASURED_PREFIXES) for tag in steps):
        return None
    scalars = {
        tag: _series(np.frombuffer(steps[tag], dtype=np.int64), np.frombuffer(values[tag]))
        for tag in steps
    }
    order = (layout_block_names(layout) or None) if layout is not None else None
    if not order:  # first appearance: the callback logs the blocks in forward order
        order = [tag[len(NORM_PREFIX) :] for tag in steps if tag.startswith(NORM_PREFIX)]
    return RunLog(
        path=path,
        name=name,
        source="tensorboard",
        scalars=scalars,
        block_order=order,
        config=config,
    )


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _read_csv(fs: AbstractFileSystem, file: str, path: str, name: str) -> Optional[RunLog]:
    """``metrics.csv`` of the run in ``path`` parsed by numpy in one pass (empty cells become NaN
    first)."""
    shown = join(path, CSV_FILE)
    with fs.open(file, "rb") as handle:
        header = handle.readline().decode("utf-8").strip().split(",")
        body = handle.read()
    if "step" not in header or not any(h.startswith(MEASURED_PREFIXES) for h in header):
        return None
    # numpy's C parser has no notion of empty fields: spell them out as nan (bytes ops, no Python
    # loop over cells). Twice, because ",,," overlaps.
    body = body.replace(b"\r\n", b"\n")
    body = body.replace(b",,", b",nan,").replace(b",,", b",nan,")
    body = body.replace(b"\n,", b"\nnan,").replace(b",\n", b",nan\n")
    if body.startswith(b","):
        body = b"nan" + body
    if body.endswith(b","):
        body += b"nan"
    if not body.strip():
        return None
    try:
        table = np.loadtxt(io.BytesIO(body), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as error:  # ragged rows, text cells: not a CSVLogger file we can read
        raise ReportError(f"{shown}: not a readable metrics.csv ({error})") from None
    if table.shape[1] != len(header):
        raise ReportError(f"{shown}: rows do not match the header ({len(header)} columns)")
    step_column = table[:, header.index("step")]
    scalars = {}
    for index, tag in enumerate(header):
        if not _is_gradwatch(tag):
            continue
        column = table[:, index]
        # A row that does not hold this key is NaN; a non-finite value logged as such survives
        # only as NaN, like a missing one (CSV cannot tell them apart after the fill above).
        keep = ~np.isnan(column) & ~np.isnan(step_column)
        scalars[tag] = _series(step_column[keep].astype(np.int64), column[keep])
    if not any(tag.startswith(MEASURED_PREFIXES) and len(s.steps) for tag, s in scalars.items()):
        return None
    return RunLog(path=path, name=name, source="csv", scalars=scalars)
