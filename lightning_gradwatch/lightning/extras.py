"""The callback's optional per-step helpers, built from its arguments in one place: the gradient noise
scale (``noise_scale``), the update figures (``log_updates``), the curvature (``log_curvature``,
``curvature_*``) and the forensics (``skip_batches``, and the rules' evidence). Each validates its
own arguments at construction (``TypeError``/``ValueError`` naming the argument), in the order of the
callback's signature; the hooks that all of them take at the same moment go through here, the
per-step calls the callback makes on each helper directly."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Optional, Union

import lightning.pytorch as pl

from lightning_gradwatch.governance.enforcer import RuleEnforcer
from lightning_gradwatch.governance.rules import Rule
from lightning_gradwatch.lightning.context import FitContext
from lightning_gradwatch.lightning.curvature import CurvatureMonitor
from lightning_gradwatch.lightning.diagnosis import RunDiagnosis
from lightning_gradwatch.lightning.forensics import StepForensics
from lightning_gradwatch.lightning.noise_monitor import NoiseScaleMonitor
from lightning_gradwatch.lightning.updates import UpdateWatch
from lightning_gradwatch.validation import check_type

__all__ = ["StepExtras"]


class StepExtras:
    """The noise monitor, update watch, curvature monitor and forensics of one callback.

    Args:
        rules: the callback's validated rules (rules on update figures need ``log_updates``).
        enforcer: the callback's governance (forensics' alerts and replayed skips go through it).
        noise_scale, log_curvature, curvature_every_n_steps, curvature_iterations,
            curvature_probes, log_updates, skip_batches: the callback's arguments of those names.

    Example::

        extras = StepExtras(rules, enforcer, noise_scale=True)
        extras.setup(trainer)  # setup("fit")
        extras.start(trainer, pl_module, fit, rules, enforcer, diagnosis)  # on_fit_start
        extras.batch_start(trainer, pl_module, batch, batch_idx, measured)  # each batch start
        extras.batch_end()  # each batch end
        extras.remove()  # teardown, exception
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        enforcer: RuleEnforcer,
        *,
        noise_scale: bool = False,
        log_curvature: bool = False,
        curvature_every_n_steps: int = 500,
        curvature_iterations: int = 30,
        curvature_probes: int = 2,
        log_updates: bool = False,
        skip_batches: Optional[Union[str, os.PathLike[str]]] = None,
    ) -> None:
        self.noise_scale = check_type(noise_scale, bool, "noise_scale")
        self.noise = NoiseScaleMonitor(self.noise_scale)
        self.curvature = CurvatureMonitor(
            log_curvature, curvature_every_n_steps, curvature_iterations, curvature_probes
        )
        self.log_updates = check_type(log_updates, bool, "log_updates")
        self.updates = UpdateWatch(self.log_updates, rules)
        self.forensics = StepForensics(skip_batches, enforcer)

    def setup(self, trainer: pl.Trainer) -> None:
        """At ``setup("fit")``, before the strategy registers a user's DDP hook (the noise monitor
        wraps it)."""
        self.noise.setup(trainer)

    def start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        fit: FitContext,
        rules: Sequence[Rule],
        enforcer: RuleEnforcer,
        diagnosis: RunDiagnosis,
    ) -> None:
        """At fit start, once the enforcer is set up and the diagnosis started (the update watch
        feeds both)."""
        self.forensics.start(trainer, pl_module, fit, rules)
        self.noise.start(trainer, pl_module, fit.plan)
        self.updates.start(trainer, fit, enforcer, diagnosis)

    def batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        measured: bool,
    ) -> None:
        """At each (micro-)batch start; ``measured``: whether this step is measured."""
        self.noise.on_batch_start(trainer, batch, measured)
        self.curvature.on_batch_start(trainer, pl_module, batch, batch_idx)
        self.forensics.batch_start(trainer, batch, batch_idx)  # a reference, no copy

    def batch_end(self) -> None:
        self.updates.end_batch()
        self.forensics.batch_end()

    def remove(self) -> None:
        """Remove every hook the helpers registered."""
        self.noise.remove()
        self.updates.remove()
