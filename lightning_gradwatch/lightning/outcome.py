"""What a watched run has produced so far and what it keeps across checkpoints: the alerts, the
halt, the findings, the first step's report, and the callback's checkpointed state (and what it
adds to a checkpoint beside it: the trail uploaded, the path of the run's skip list)."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl

from lightning_gradwatch.diagnosis.findings import Finding
from lightning_gradwatch.diagnosis.first_step import FirstStepReport
from lightning_gradwatch.governance.alerts import Alert
from lightning_gradwatch.governance.enforcer import RuleEnforcer
from lightning_gradwatch.lightning.diagnosis import RunDiagnosis
from lightning_gradwatch.lightning.extras import StepExtras
from lightning_gradwatch.measure.record import MeasurementSpec
from lightning_gradwatch.measure.updates import UpdateMeasurement

__all__ = ["STATE_VERSION", "WatchOutcome"]

#: The layout of :meth:`WatchOutcome.state_dict` (1: with ``measured_step``; still loads).
STATE_VERSION = 2


class WatchOutcome:
    """The read-only face and the checkpointed state of
    :class:`~lightning_gradwatch.GradientFlowCallback` (a base class: the callback sets these
    attributes in its ``__init__``)."""

    spec: MeasurementSpec
    blocks: Any
    log_every_n_steps: int
    _enforcer: RuleEnforcer
    _diagnosis: RunDiagnosis
    _extras: StepExtras

    @property
    def norm_type(self) -> str:
        """The norm of every figure (``"l2"``, ``"l1"``, ``"linf"`` or ``"mean"``)."""
        return self.spec.norm_type

    @property
    def alerts(self) -> list[Alert]:
        return self._enforcer.incidents.alerts

    @property
    def halted(self) -> bool:
        return self._enforcer.halted

    @property
    def halt_reason(self) -> Optional[str]:
        return self._enforcer.halt_reason

    @property
    def findings(self) -> list[Finding]:
        """Diagnoses over the measured steps of this fit so far (the last 32 and the first 3)
        (:mod:`lightning_gradwatch.diagnosis.checks`); empty when nothing was found."""
        return self._diagnosis.findings

    @property
    def last_updates(self) -> Optional[UpdateMeasurement]:
        """The latest measured step's update figures (``log_updates=True``; ``None`` before the
        first): ``update_ratio``, ``update_ratios`` per block, ``cosine``, ..., and ``metrics``."""
        return self._extras.updates.last

    @property
    def first_step_report(self) -> Optional[FirstStepReport]:
        """Parameters without / with an all-zero gradient and vanishing blocks at the first
        measured step."""
        return self._diagnosis.first_step_report

    @property
    def state_key(self) -> str:
        # Unique per configuration, so several instances (e.g. one per norm type) can share a
        # Trainer and a checkpoint.
        blocks = self.blocks if isinstance(self.blocks, (str, list)) else "callable"
        return self._generate_state_key(  # type: ignore[attr-defined]  # Callback's
            blocks=blocks, norm_type=self.spec.norm_type, log_every_n_steps=self.log_every_n_steps
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "governance": self._enforcer.state_dict(),
            "noise_scale": self._extras.noise.estimator.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Version 1 (before one optimizer became a list of one) also held "measured_step": the
        # measuring grid now follows the restored global step (`on_train_start`), so it is dropped.
        self._enforcer.load_state_dict(state_dict.get("governance", {}))
        self._extras.noise.estimator.load_state_dict(state_dict.get("noise_scale", {}))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._enforcer.upload_trail()  # the trail as far as this checkpoint
        self._extras.forensics.save_to(checkpoint)  # where this run lists skipped batches ("auto")

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._extras.forensics.load_from(checkpoint)
