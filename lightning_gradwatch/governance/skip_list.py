"""The skip list: batches whose optimizer step a ``skip`` (or ``halt``) decision dropped, written to
``gradwatch_skipped_batches.json`` beside the alert trail, and replayed by a later or resumed run
(``GradientFlowCallback(skip_batches=...)``).

The file is a JSON list of entries (or an object holding one such list, or a single entry), each
``{"epoch", "batch_idx", "fingerprints", "step", "rule"}`` (``dataloader_idx`` where known).
``batch_idx`` is an int, or the list of the step's micro-batch indices under accumulation;
``fingerprints`` holds one digest per rank. A plain int (the batch indices Lightning Fabric's
``SpikeDetection`` writes) is an entry with a batch index only.

Matching a step against the list (:func:`match_step`): an entry whose fingerprints equal the step's
(every rank's) matches, whatever its index; an entry with the step's index and epoch but other
fingerprints is a *mismatch* (the data order changed: a different shuffle, or a mid-epoch resume that
restarted the epoch's data) and is not skipped; an entry without fingerprints matches by index.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from lightning_gradwatch.files import filesystem, write_text

__all__ = [
    "SKIP_LIST_FILENAME",
    "SkipEntry",
    "SkipListFile",
    "StepMatch",
    "match_step",
    "parse_skip_list",
    "read_skip_list",
]

#: File name of the skip list, beside the alert trail.
SKIP_LIST_FILENAME = "gradwatch_skipped_batches.json"
_ENTRY_KEYS = ("batch_idx", "fingerprints")


@dataclass(frozen=True)
class SkipEntry:
    """One skipped batch."""

    epoch: Optional[int] = None
    batch_idx: Optional[Any] = None  # int, or a list of micro-batch indices
    fingerprints: Optional[tuple[Optional[str], ...]] = None
    step: Optional[int] = None
    rule: Optional[str] = None
    dataloader_idx: Optional[int] = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "epoch": self.epoch,
            "batch_idx": self.batch_idx,
            "fingerprints": None if self.fingerprints is None else list(self.fingerprints),
            "step": self.step,
            "rule": self.rule,
        }
        if self.dataloader_idx is not None:
            data["dataloader_idx"] = self.dataloader_idx
        return data

    def same_batch(self, other: SkipEntry) -> bool:
        """Whether both name the same batch (index and fingerprints)."""
        keys = ("epoch", "batch_idx", "fingerprints", "dataloader_idx")
        return all(getattr(self, key) == getattr(other, key) for key in keys)

    def describe(self) -> str:
        listed = f"listed at step {self.step}" if self.step is not None else "listed"
        return listed + (f" by rule {self.rule!r}" if self.rule else "")


@dataclass(frozen=True)
class StepMatch:
    """What the skip list says about one step: the entry to skip it for (``entry``, and ``how``:
    ``"fingerprint"`` or ``"index"``), and entries whose index matched but not their fingerprints."""

    entry: Optional[SkipEntry] = None
    how: str = ""
    mismatched: tuple[SkipEntry, ...] = ()


def match_step(
    entries: Sequence[SkipEntry],
    *,
    epoch: int,
    batch_idx: Any,
    fingerprints: Sequence[Optional[str]],
    dataloader_idx: Optional[int] = None,
) -> StepMatch:
    """The skip list's verdict on a step (pure: every rank that sees the same gathered fingerprints
    decides the same)."""
    current = tuple(fingerprints)
    for entry in entries:
        if entry.fingerprints is not None and None not in current and entry.fingerprints == current:
            return StepMatch(entry, "fingerprint")
    mismatched = []
    for entry in entries:
        same_index = (
            entry.batch_idx == batch_idx
            and entry.epoch in (None, epoch)
            and (entry.dataloader_idx is None or entry.dataloader_idx == dataloader_idx)
        )
        if not same_index:
            continue
        if entry.fingerprints is None:
            return StepMatch(entry, "index")
        mismatched.append(entry)
    return StepMatch(mismatched=tuple(mismatched))


def parse_skip_list(data: Any, source: str) -> list[SkipEntry]:
    """The entries of a skip list's JSON value; ``ValueError`` naming ``source`` when it is not one."""
    if isinstance(data, dict):
        lists = [value for value in data.values() if isinstance(value, list)]
        if any(key in data for key in _ENTRY_KEYS):
            data = [data]
        elif len(lists) == 1:
            data = lists[0]
        else:
            raise ValueError(
                f"{source}: a skip list is a JSON list of entries, or an object holding one "
                f"list (got an object with keys {sorted(data)})."
            )
    if not isinstance(data, list):
        raise ValueError(
            f"{source}: a skip list is a JSON list of entries, got {type(data).__name__}."
        )
    return [_entry(item, f"{source}: entry {i}") for i, item in enumerate(data)]


def _entry(item: Any, where: str) -> SkipEntry:
    if isinstance(item, int) and not isinstance(item, bool):
        return SkipEntry(batch_idx=item)
    if not isinstance(item, dict) or not any(item.get(key) is not None for key in _ENTRY_KEYS):
        raise ValueError(
            f"{where}: an entry is an object with 'batch_idx' or 'fingerprints', got {item!r}."
        )
    batch_idx = item.get("batch_idx")
    if not (batch_idx is None or _is_int(batch_idx) or _int_list(batch_idx)):
        raise ValueError(
            f"{where}: 'batch_idx' must be an int or a list of ints, got {batch_idx!r}."
        )
    prints = item.get("fingerprints")
    if prints is not None and not (
        isinstance(prints, list) and all(p is None or isinstance(p, str) for p in prints)
    ):
        raise ValueError(f"{where}: 'fingerprints' must be a list of hex strings, got {prints!r}.")
    for key in ("epoch", "step", "dataloader_idx"):
        if item.get(key) is not None and not _is_int(item[key]):
            raise ValueError(f"{where}: {key!r} must be an int, got {item[key]!r}.")
    return SkipEntry(
        epoch=item.get("epoch"),
        batch_idx=list(batch_idx) if isinstance(batch_idx, list) else batch_idx,
        fingerprints=None if prints is None else tuple(prints),
        step=item.get("step"),
        rule=None if item.get("rule") is None else str(item["rule"]),
        dataloader_idx=item.get("dataloader_idx"),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_int(v) for v in value)


def read_skip_list(path: str) -> list[SkipEntry]:
    """The entries of the skip list at ``path`` (a local path or a URL); ``FileNotFoundError``
    when it does not exist, ``ValueError`` when it is not a skip list."""
    fs, inner = filesystem(path)
    if not fs.isfile(inner):
        raise FileNotFoundError(f"{path}: no such file")
    raw = fs.cat_file(inner)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    return parse_skip_list(data, path)


class SkipListFile:
    """The skip list this run appends to (rank 0): entries already in the file are kept, an entry
    naming a batch already listed is not added twice, and the file is rewritten whole (JSON cannot
    be appended to) through fsspec, so a URL works as the alert trail does.

    Args:
        path: the file (a local path or a URL).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._entries: Optional[list[SkipEntry]] = None

    def append(self, entry: SkipEntry) -> bool:
        """Add ``entry``; whether the file changed. Raises ``ValueError`` when the file exists but
        is not a skip list (it is then left as it is)."""
        if self._entries is None:
            try:
                self._entries = read_skip_list(self.path)
            except FileNotFoundError:
                self._entries = []
        if any(entry.same_batch(known) for known in self._entries):
            return False
        self._entries.append(entry)
        lines = ",\n".join(" " + json.dumps(e.to_dict()) for e in self._entries)
        write_text(self.path, f"[\n{lines}\n]\n")  # one entry per line: easy to read and edit
        return True
