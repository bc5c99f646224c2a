"""The JSONL audit trail: writing it and reading it back.

Each alert is one JSON object on one line, appended, flushed and ``os.fsync``-ed before the next, so
a crash (even ``SIGKILL``) loses no alert written before it. Only one process writes: rank 0, with the
list of ranks on which the rule tripped. The trail may be a URL (``memory://``, ``s3://``, ...): it is
written through its fsspec filesystem; where that filesystem cannot append (object stores), the lines
go to a local spool file that is copied whole to the URL (:meth:`JsonlAlertSink.upload`).
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Iterable
from typing import Any, Optional

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_gradwatch.files import append_line, can_append, copy_file, filesystem
from lightning_gradwatch.governance.alerts import ALERTS_FILENAME, Alert

__all__ = ["JsonlAlertSink", "parse_alerts", "read_alerts"]


class JsonlAlertSink:
    """Append :class:`Alert` records to a JSONL trail, one line each.

    The file is opened for each record (appending): nothing stays buffered between alerts, and
    several runs may share one trail. On a local disk each line is flushed and ``os.fsync``-ed;
    ``memory://`` appends in place too. On a filesystem that cannot append (``s3://``, ``gs://``,
    ...) the lines go to :attr:`spool`, a local file (fsync-ed likewise) that starts from the
    trail's existing content, and :meth:`upload` copies it whole to ``path``: call it at
    checkpoints and when the run ends.

    Example::

        sink = JsonlAlertSink("logs/gradwatch_alerts.jsonl")
        sink.write(Alert(step=3, rule="nonfinite", metric="nonfinite", value=1.0, action="halt"))
    """

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        #: The local file written instead of ``path`` when its filesystem cannot append, else None.
        self.spool: Optional[str] = None
        if not can_append(self.path):
            folder = os.path.join(tempfile.gettempdir(), f"gradwatch-spool-{uuid.uuid4().hex[:12]}")
            self.spool = os.path.join(folder, ALERTS_FILENAME)
        self._spooling = False  # the spool holds the trail's earlier lines
        self._pending = False  # the spool has lines that ``path`` has not
        self._warned = False

    @property
    def spool_notice(self) -> Optional[str]:
        """Where the alerts go when ``path`` cannot be appended to (said once at fit start)."""
        if self.spool is None:
            return None
        return (
            f"GradientFlowCallback: {self.path} is on a filesystem that cannot append: alerts are "
            f"written to the local file {self.spool} and copied whole to {self.path} at each "
            "checkpoint and when the fit ends."
        )

    def write(self, alert: Alert) -> None:
        if self.spool is None:
            append_line(self.path, alert.to_json())
            return
        if not self._spooling:
            self._spooling = True
            fs, inner = filesystem(self.path)
            if fs.isfile(inner):  # the upload replaces the trail: start from what it holds
                copy_file(self.path, self.spool)
        append_line(self.spool, alert.to_json())
        self._pending = True

    def upload(self) -> bool:
        """Copy the spool whole to ``path`` if it has lines ``path`` lacks; whether it copied.

        A failed copy warns once and is tried again at the next call: the run goes on, and the
        local spool keeps every alert."""
        if self.spool is None or not self._pending:
            return False
        try:
            copy_file(self.spool, self.path)
        except Exception as error:  # whatever the fsspec backend raises (network, credentials)
            if not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"GradientFlowCallback: could not copy the alert trail {self.spool} to "
                    f"{self.path} ({type(error).__name__}: {error}); it is tried again at the next "
                    "checkpoint and when the fit ends."
                )
            return False
        self._pending = False
        return True


def read_alerts(path: str) -> list[dict[str, Any]]:
    """The records of a JSONL audit trail (a local path or a URL) as dicts (a torn last line, if
    any, is left out)."""
    fs, inner = filesystem(path)
    with fs.open(inner, "r", encoding="utf-8") as handle:
        return parse_alerts(handle)


def parse_alerts(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The records of the lines of a JSONL audit trail (a torn last line, if any, is left out)."""
    records = []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # only the line being written at a crash can be torn
    return records
