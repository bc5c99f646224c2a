"""Where a fit's own files go, resolved once at fit start: the alert trail, the halt checkpoints, the
skip list and the model-facts files. Every path may be a URL (``s3://``, ``gs://``, ``memory://``): it is joined
and written through fsspec (:mod:`lightning_gradwatch.files`), as Lightning writes its logs and
checkpoints.

A logger's ``log_dir`` is used only when it is a path: custom loggers, loggers of a service and
mocks may have none, ``None``, or any object there; the run's files then go to
``trainer.default_root_dir``, and one info line says so.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_gradwatch.diagnosis.run_history import FACTS_FILENAME
from lightning_gradwatch.files import dirname, join
from lightning_gradwatch.governance.alerts import ALERTS_FILENAME
from lightning_gradwatch.governance.skip_list import SKIP_LIST_FILENAME

__all__ = ["RunFiles", "log_dir_of", "resolve_run_files"]

_MISSING = object()


@dataclass(frozen=True)
class RunFiles:
    """The files of one fit (local paths or URLs).

    Attributes:
        run_dir: the first logger's ``log_dir`` when it is a path, else ``trainer.default_root_dir``.
        alerts_path: the JSONL audit trail: the callback's ``alerts_path``, else
            ``gradwatch_alerts.jsonl`` in ``run_dir``.
        halt_dir: where ``halt`` saves its checkpoint: the trail's folder (``default_root_dir`` for a
            bare file name).
        facts_paths: ``gradwatch_model_facts.json`` in the ``log_dir`` of each logger that has a
            path there (none without one: the report reads logs, and the facts go beside them).
        skip_list_path: ``gradwatch_skipped_batches.json`` beside the trail (in ``halt_dir``).
    """

    run_dir: str
    alerts_path: str
    halt_dir: str
    facts_paths: tuple[str, ...] = ()
    skip_list_path: str = ""


def resolve_run_files(trainer: pl.Trainer, alerts_path: Optional[str] = None) -> RunFiles:
    """The files of this fit, from the Trainer's loggers and ``default_root_dir`` (every rank
    resolves the same paths; rank 0 writes). ``alerts_path``: the callback's own setting."""
    log_dirs = [log_dir_of(logger) for logger in trainer.loggers]
    first = log_dirs[0] if log_dirs else None
    run_dir = first or trainer.default_root_dir
    trail = alerts_path or join(run_dir, ALERTS_FILENAME)
    if trainer.loggers and first is None and alerts_path is None:
        logger = trainer.loggers[0]
        rank_zero_info(
            f"GradientFlowCallback: the first logger ({type(logger).__name__}) has no log "
            f"directory ({_describe(_raw_log_dir(logger))}); the alert trail goes "
            f"to {trail}, halt checkpoints beside it."
        )
    facts = tuple(dict.fromkeys(join(d, FACTS_FILENAME) for d in log_dirs if d is not None))
    halt_dir = dirname(trail) or trainer.default_root_dir
    return RunFiles(
        run_dir=run_dir,
        alerts_path=trail,
        halt_dir=halt_dir,
        facts_paths=facts,
        skip_list_path=join(halt_dir, SKIP_LIST_FILENAME),
    )


def log_dir_of(logger: Any) -> Optional[str]:
    """``logger.log_dir`` if it is a non-empty path (a ``str``, local or URL, or a ``pathlib``
    path), else ``None``."""
    value = _raw_log_dir(logger)
    # Only real paths: any object with __fspath__ is not one (a MagicMock's returns a made-up
    # relative path such as "MagicMock/mock/1403..." that would land under the cwd).
    path = os.fspath(value) if isinstance(value, (str, PurePath)) else None
    return path or None


def _raw_log_dir(logger: Any) -> Any:
    try:
        return getattr(logger, "log_dir", _MISSING)
    except Exception as error:  # a property that fails (a service logger not yet connected)
        return error


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "no log_dir attribute"
    if isinstance(value, Exception):
        return f"reading log_dir raised {type(value).__name__}"
    if value is None or isinstance(value, str):
        return f"log_dir is {value!r}"
    return f"log_dir is not a path but a {type(value).__name__}"
