"""Replaying a skip list (``GradientFlowCallback(skip_batches=...)``): the optimizer step of every
batch the list names is skipped, in a later run or a resumed one.

Which list: a path or URL, read at construction (a missing or malformed file raises there) and
again at fit start by rank 0, which broadcasts it; or ``"auto"``: when the fit resumes from a
checkpoint, the list beside this run's alert trail and the one the checkpointed run was writing
(``gradwatch_skipped_batches.json``), whichever exist.

At each optimizer step, while the list is not empty, every rank fingerprints its batch and one
``all_gather`` of 3 floats per rank gives every rank every fingerprint, so every rank reaches the
same verdict (:func:`~lightning_gradwatch.governance.skip_list.match_step`). That costs one hash of
the batch per step (a host copy of device tensors) and that collective: only with a non-empty list.
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from lightning_gradwatch.governance.evidence import LocalEvidence
from lightning_gradwatch.governance.fingerprints import digest_from_halves, digest_halves
from lightning_gradwatch.governance.skip_list import (
    SkipEntry,
    StepMatch,
    match_step,
    read_skip_list,
)
from lightning_gradwatch.lightning.batches import StepBatches
from lightning_gradwatch.validation import check_path

__all__ = ["AUTO", "Replay", "SkipReplay", "check_skip_batches", "gather_fingerprints"]

#: ``skip_batches="auto"``: the skip list beside this run's trail, when resuming.
AUTO = "auto"
#: What :meth:`SkipReplay.check` hands to the enforcer: this rank's evidence, every rank's
#: fingerprint, the match and the list's path.
Replay = tuple[LocalEvidence, list[Optional[str]], StepMatch, str]


def check_skip_batches(value: Any) -> Optional[str]:
    """``None``, ``"auto"``, or a path or URL (``str`` / ``os.PathLike``) to an existing skip list;
    ``TypeError``/``ValueError`` naming ``skip_batches`` otherwise."""
    if value is None or value == AUTO:
        return value
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            "`skip_batches` must be None, 'auto' or a path (str or os.PathLike) to a skip list, "
            f"got {type(value).__name__}: {value!r}."
        )
    path = check_path(value, "skip_batches")
    try:
        read_skip_list(path)
    except FileNotFoundError:
        raise ValueError(
            f"`skip_batches`: {path}: no such file (a gradwatch_skipped_batches.json, or 'auto' "
            "to use the one beside this run's alert trail when resuming)."
        ) from None
    except ValueError as error:
        raise ValueError(f"`skip_batches`: {error}") from None
    except Exception as error:  # a store that cannot be reached now: checked again at fit start
        rank_zero_warn(
            f"GradientFlowCallback: could not read `skip_batches` {path} now "
            f"({type(error).__name__}: {error}); it is read again when the fit starts."
        )
    return path


def gather_fingerprints(trainer: pl.Trainer, digest: Optional[str]) -> list[Optional[str]]:
    """Every rank's fingerprint, in rank order (one ``all_gather`` with several ranks)."""
    if trainer.world_size <= 1:
        return [digest]
    high, low = digest_halves(digest) if digest is not None else (math.nan, math.nan)
    row = [1.0 if digest is not None else 0.0, high, low]
    sent = torch.tensor(row, dtype=torch.float64, device=trainer.strategy.root_device)
    rows = trainer.strategy.all_gather(sent).reshape(trainer.world_size, 3).tolist()
    return [digest_from_halves(r[1], r[2]) if r[0] == 1.0 else None for r in rows]


class SkipReplay:
    """The skip list this fit replays, and the per-step check."""

    def __init__(self, skip_batches: Optional[str]) -> None:
        self.skip_batches = skip_batches
        self.entries: list[SkipEntry] = []
        self.sources: list[str] = []  # the file each entry came from
        self._warned: set[int] = set()

    def start(self, trainer: pl.Trainer, own: str, restored: Optional[str]) -> None:
        """Read the list (rank 0) and share it with every rank (one broadcast at fit start)."""
        paths: list[str] = []
        if self.skip_batches == AUTO:
            if trainer.ckpt_path is not None:
                paths = list(dict.fromkeys(p for p in (own, restored) if p))
            else:
                rank_zero_info(
                    "GradientFlowCallback: skip_batches='auto' replays a skip list when resuming "
                    "from a checkpoint; this fit does not resume, so nothing is skipped."
                )
        elif self.skip_batches is not None:
            paths = [self.skip_batches]
        found = _read(paths, required=self.skip_batches != AUTO) if trainer.is_global_zero else None
        found = trainer.strategy.broadcast(found, src=0)
        self.entries = [entry for entry, _ in found or []]
        self.sources = [source for _, source in found or []]
        self._warned = set()
        if self.entries:
            rank_zero_info(
                f"GradientFlowCallback: replaying {len(self.entries)} skipped batch(es) from "
                f"{', '.join(dict.fromkeys(self.sources))} (one batch fingerprint and one small "
                "all_gather per optimizer step)."
            )

    def check(self, trainer: pl.Trainer, batches: StepBatches) -> Optional[Replay]:
        """Whether this step's batch is on the list (the same answer on every rank)."""
        if not self.entries:
            return None
        fingerprints = gather_fingerprints(trainer, batches.fingerprint(trainer))
        epoch, batch_idx = batches.epoch, batches.batch_idx
        match = match_step(
            self.entries, epoch=epoch, batch_idx=batch_idx, fingerprints=fingerprints
        )
        for entry in match.mismatched:
            self._warn_mismatch(entry, fingerprints)
        if match.entry is None:
            return None
        source = self.sources[next(i for i, e in enumerate(self.entries) if e is match.entry)]
        own = batches.fingerprint(trainer)
        evidence = LocalEvidence(epoch=epoch, batch_idx=batch_idx, fingerprint=own)
        return evidence, fingerprints, match, source

    def _warn_mismatch(self, entry: SkipEntry, fingerprints: list[Optional[str]]) -> None:
        index = next(i for i, e in enumerate(self.entries) if e is entry)
        if index in self._warned:
            return
        self._warned.add(index)
        rank_zero_warn(
            f"GradientFlowCallback: the skip list {self.sources[index]} names epoch {entry.epoch}, "
            f"batch {entry.batch_idx} ({entry.describe()}), but this run's batch there has other "
            f"content (fingerprints {fingerprints}, listed {list(entry.fingerprints or [])}): the "
            "data order differs (another shuffle, or a resume that restarted the epoch's data), "
            "so the step is not skipped."
        )


def _read(paths: list[str], required: bool) -> list[tuple[SkipEntry, str]]:
    """The entries of ``paths`` with their source (missing files: skipped unless ``required``;
    unreadable ones: a warning)."""
    found: list[tuple[SkipEntry, str]] = []
    for path in paths:
        try:
            found += [(entry, path) for entry in read_skip_list(path)]
        except FileNotFoundError:
            if required:
                rank_zero_warn(
                    f"GradientFlowCallback: skip_batches {path} is gone: nothing skipped."
                )
        except Exception as error:  # never stop a run over its skip list
            rank_zero_warn(
                f"GradientFlowCallback: could not read the skip list {path} "
                f"({type(error).__name__}: {error}): its batches are not skipped."
            )
    return found
