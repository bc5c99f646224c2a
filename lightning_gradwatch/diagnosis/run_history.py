"""The input of the diagnosis checks: a run's history (one :class:`StepRecord` per measured step),
its settings, the model facts and the first step's wiring, as plain data.

Both sides build the same :class:`RunHistory`: the callback from its in-memory measurements (one
:meth:`RunHistory.add` per logged measured step) and ``gradwatch report`` from the logged keys plus
``gradwatch_model_facts.json`` (one :meth:`RunHistory.add` per logged row, in step order). Memory is
bounded and flat: the checks read the last ``capacity`` measured steps (a window that follows the
run: findings are about its recent state) plus the first :data:`FIRST_KEPT` (to tell how the total
norm grew); older rows are dropped as new ones come, so both sides keep exactly the same rows.

No tensors, no Lightning: floats, names and a JSON-ready dict (:meth:`RunHistory.facts_dict`, the
facts file's content; the model facts' classes are in :mod:`lightning_gradwatch.diagnosis.model_facts`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from lightning_gradwatch.diagnosis.model_facts import ModelFacts
from lightning_gradwatch.keys import DEFAULT_EPS

__all__ = [
    "FACTS_FILENAME",
    "FACTS_FORMAT",
    "FIRST_KEPT",
    "WINDOW",
    "ClipBound",
    "RunHistory",
    "Settings",
    "StepRecord",
    "Wiring",
]

#: File name of the facts beside the logs (in each logger's ``log_dir``).
FACTS_FILENAME = "gradwatch_model_facts.json"
#: ``"format"`` field of that file, with ``"version"``.
FACTS_FORMAT = "gradwatch-model-facts"
_VERSION = 1
#: Measured steps the checks read: the last ``WINDOW`` ones, plus the first ``FIRST_KEPT``.
WINDOW = 32
FIRST_KEPT = 3


@dataclass
class ClipBound:
    """A norm-clipping bound: clipping acts at a step when the total norm exceeds ``threshold``.

    Attributes:
        source: ``"gradient_clip_val"`` (Lightning's norm clipping) or ``"rule <label>"``.
        threshold: the total norm above which it clips.
        target: the norm it clips to (``None``: unknown).
    """

    source: str
    threshold: float
    target: Optional[float] = None


@dataclass
class Settings:
    """The callback's settings that decide categories and clipping."""

    norm_type: str = "l2"
    eps: float = DEFAULT_EPS
    damping_threshold: float = 0.5
    amplifying_threshold: float = 2.0
    clip_bounds: list[ClipBound] = field(default_factory=list)


@dataclass
class Wiring:
    """The first measured step's gradient wiring (see
    :class:`~lightning_gradwatch.diagnosis.first_step.FirstStepReport`)."""

    step: int = 0
    no_grad: list[str] = field(default_factory=list)
    zero_grad: list[str] = field(default_factory=list)


@dataclass
class StepRecord:
    """One measured step in a :class:`RunHistory`: block-output norms (``None``: no gradient, or non-finite as logged as
    NaN), the total parameter-gradient norm, ``grad_stats/zero_fraction``, the gradient noise
    scale ``grad_noise/b_simple`` and the batch it was measured at, the sharpness ratio
    ``curvature/sharpness_ratio`` (``None``: not measured), and each block's
    ``update_ratio/<block>`` (``log_updates=True``; empty: not measured)."""

    step: int
    block_norms: list[Optional[float]]
    total_norm: Optional[float] = None
    zero_fraction: Optional[float] = None
    noise_scale: Optional[float] = None
    batch_size: Optional[float] = None
    sharpness_ratio: Optional[float] = None
    update_ratios: list[Optional[float]] = field(default_factory=list)


@dataclass
class RunHistory:
    """Everything the diagnosis checks read: the measured steps kept, the settings, the model facts
    and the first step's wiring.

    Example::

        history = RunHistory(["blocks.0", "blocks.1"])
        history.add(0, [0.01, 1.0], total_norm=2.0, zero_fraction=0.0)
        findings = diagnose(history)  # lightning_gradwatch.diagnosis.checks
    """

    block_names: list[str]
    settings: Settings = field(default_factory=Settings)
    facts: Optional[ModelFacts] = None
    wiring: Optional[Wiring] = None
    capacity: int = WINDOW
    steps: deque[StepRecord] = field(default_factory=deque)
    first: list[StepRecord] = field(default_factory=list)
    _seen: int = 0

    def __post_init__(self) -> None:
        self.steps = deque(self.steps, maxlen=self.capacity)

    def needs(self, row: int, total: int) -> bool:
        """Whether row ``row`` of ``total`` (added in order) is kept: among the first
        :data:`FIRST_KEPT` or the last ``capacity``; :meth:`skip` the others (no row to build)."""
        return row < FIRST_KEPT or row >= total - self.capacity

    def skip(self) -> None:
        """Count a measured step that would be dropped anyway."""
        self._seen += 1

    def add(
        self,
        step: int,
        block_norms: Sequence[Optional[float]],
        total_norm: Optional[float] = None,
        zero_fraction: Optional[float] = None,
        noise_scale: Optional[float] = None,
        batch_size: Optional[float] = None,
        sharpness_ratio: Optional[float] = None,
    ) -> None:
        """Record one measured step (non-finite NaN norms count as missing, as in the logs)."""
        norms = [None if v is None or math.isnan(v) else float(v) for v in block_norms]
        figures = (total_norm, zero_fraction, noise_scale, batch_size, sharpness_ratio)
        total, zeros, noise, batch, sharpness = (_number(v) for v in figures)
        row = StepRecord(step, norms, total, zeros, noise, batch, sharpness)
        if self._seen < FIRST_KEPT:
            self.first.append(row)
        self.steps.append(row)
        self._seen += 1

    def add_update_ratios(self, step: int, ratios: Sequence[Optional[float]]) -> None:
        """The update ratios of the kept row of ``step`` (aligned with ``block_names``; ``None``:
        a block this step did not update), known once the optimizer stepped."""
        for row in reversed(self.steps):
            if row.step == step:
                row.update_ratios = [_number(v) for v in ratios]
                return

    @property
    def measured(self) -> int:
        """How many measured steps were added (kept or not)."""
        return self._seen

    def norm_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, norms)`` of the kept steps, oldest first: norms is steps x blocks, NaN where a
        block had no norm (the heatmap's input)."""
        steps = np.array([row.step for row in self.steps], dtype=np.int64)
        norms = np.array(
            [[np.nan if v is None else v for v in row.block_norms] for row in self.steps],
            dtype=np.float64,
        ).reshape(len(self.steps), len(self.block_names))
        return steps, norms

    def facts_dict(self) -> dict[str, Any]:
        """Settings, model facts and wiring as JSON-ready data (the facts file's content)."""
        return {
            "format": FACTS_FORMAT,
            "version": _VERSION,
            "blocks": list(self.block_names),
            "settings": asdict(self.settings),
            "model": None if self.facts is None else asdict(self.facts),
            "first_step": None if self.wiring is None else asdict(self.wiring),
        }

    @classmethod
    def from_facts_dict(cls, data: dict[str, Any], block_names: Sequence[str]) -> RunHistory:
        """An empty history with the settings, facts and wiring of :meth:`facts_dict`'s output."""
        settings = dict(data.get("settings") or {})
        bounds = [ClipBound(**bound) for bound in settings.pop("clip_bounds", [])]
        model = data.get("model")
        facts = ModelFacts.from_dict(model) if isinstance(model, dict) else None
        wiring = data.get("first_step")
        return cls(
            list(block_names),
            settings=Settings(**settings, clip_bounds=bounds),
            facts=facts,
            wiring=Wiring(**wiring) if isinstance(wiring, dict) else None,
        )


def _number(value: Optional[float]) -> Optional[float]:
    return None if value is None or math.isnan(value) else float(value)
