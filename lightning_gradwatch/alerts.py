"""Alert records and the JSONL audit trail.

Each alert is one JSON object on one line, appended, flushed and ``os.fsync``-ed before the next, so
a crash (even ``SIGKILL``) loses no alert written before it. Only one process writes: rank 0, with the
list of ranks on which the rule tripped.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

#: File name of the audit trail inside the logger's ``log_dir`` (else ``trainer.default_root_dir``).
ALERTS_FILENAME = "gradwatch_alerts.jsonl"


@dataclass
class Alert:
    """One trip of one rule.

    Attributes:
        time: UTC time in ISO 8601.
        step: optimizer step (``trainer.global_step`` before the update).
        epoch: current epoch.
        rank: the rank on which the rule tripped (the lowest of ``ranks``; the JSONL is written
            by rank 0 whichever rank tripped).
        ranks: the ranks on which the rule tripped.
        rule: the rule's name (``Rule.label``).
        rule_repr: ``repr`` of the rule.
        metric: the key that tripped (the worst one for a ``*`` pattern), or ``"nonfinite"``.
        value: its value (``1.0`` for ``nonfinite``; NaN/Inf are written as the strings ``"nan"``,
            ``"inf"``, ``"-inf"`` in JSON).
        threshold: the bound it crossed (``zscore`` rules: the z-score bound).
        condition: ``"min"``, ``"max"``, ``"zscore"`` or ``"nonfinite"``.
        action: the action taken: ``"warn"``, ``"clip"``, ``"skip"``, ``"halt"`` or ``"none"``
            (patience not reached, or the AMP GradScaler skips the step itself).
        consecutive: trips of this rule in a row, this one included; ``patience``: trips needed to act.
        block: the block where the problem starts (non-finite: the block whose backward produced it).
        blocks: blocks concerned (every violating block key; non-finite: blocks with a NaN/Inf
            output gradient, in forward order).
        params: parameters concerned (non-finite: parameters with a NaN/Inf gradient; rules on
            ``grad_param_norm/<param>``: the violating parameters).
        where: everything above in one list: ``block`` first, then ``blocks``, then ``params``.
        keys: every violating key with its value.
        loss_nonfinite: whether the loss was already NaN/Inf (non-finite alerts).
        checkpoint: path of the checkpoint saved by ``halt`` (also under the key
            ``checkpoint_path`` in :meth:`to_dict` and the JSONL line).
        message: a one-line human summary.
    """

    step: int
    rule: str
    metric: str
    value: Optional[float]
    action: str
    threshold: Optional[float] = None
    condition: str = ""
    epoch: int = 0
    rank: int = 0
    ranks: list[int] = field(default_factory=list)
    rule_repr: str = ""
    consecutive: int = 1
    patience: int = 1
    block: Optional[str] = None
    blocks: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    keys: dict[str, float] = field(default_factory=dict)
    zscore: Optional[float] = None
    loss_nonfinite: Optional[bool] = None
    checkpoint: Optional[str] = None
    message: str = ""
    time: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())

    def __getitem__(self, key: str) -> Any:
        """``alert["step"]`` reads like a line of the JSONL trail (same keys as :meth:`to_dict`)."""
        if key == "checkpoint_path":
            return self.checkpoint
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict (the keys of a JSONL line)."""
        return asdict(self) | {"checkpoint_path": self.checkpoint}

    def to_json(self) -> str:
        """One line of strict JSON (NaN and Inf become the strings ``"nan"``, ``"inf"``, ``"-inf"``)."""
        return json.dumps(_strict(self.to_dict()), sort_keys=True, allow_nan=False)


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _strict(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


class JsonlAlertSink:
    """Append :class:`Alert` records to a JSONL file, one fsync-ed line each.

    The file is opened for each record (appending): nothing stays buffered between alerts, and
    several runs may share one trail.

    Example::

        sink = JsonlAlertSink("logs/gradwatch_alerts.jsonl")
        sink.write(Alert(step=3, rule="nonfinite", metric="nonfinite", value=1.0, action="halt"))
    """

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)

    def write(self, alert: Alert) -> None:
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(alert.to_json() + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def read_alerts(path: str) -> list[dict[str, Any]]:
    """The records of a JSONL audit trail as dicts (a torn last line, if any, is left out)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # only the line being written at a crash can be torn
    return records
