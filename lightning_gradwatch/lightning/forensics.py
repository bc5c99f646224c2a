"""The callback's forensics inside a run: which batches make up the step (kept by reference), this
rank's evidence when a rule trips (:mod:`lightning_gradwatch.governance.forensics`), the rerun of
rules that ask for one (:mod:`.rerun`), the replay of a skip list (:mod:`.skip_replay`) and the
incidents written to TensorBoard's TEXT tab. On a step where no rule trips and no skip list is
replayed, all it does is keep a reference to the batch (and, when a rule reruns, the RNG state)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional

import lightning.pytorch as pl
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_gradwatch._compat import loss_scale
from lightning_gradwatch.governance.enforcer import RuleEnforcer
from lightning_gradwatch.governance.evidence import LocalEvidence
from lightning_gradwatch.governance.rules import Rule
from lightning_gradwatch.governance.verdict import Verdict
from lightning_gradwatch.lightning.batches import StepBatches
from lightning_gradwatch.lightning.context import FitContext
from lightning_gradwatch.lightning.rerun import StepRerun, first_execution
from lightning_gradwatch.lightning.skip_replay import SkipReplay, check_skip_batches
from lightning_gradwatch.lightning.tensorboard import TensorBoardWriter
from lightning_gradwatch.measure.probe import GradientProbe
from lightning_gradwatch.measure.record import GradientMeasurement
from lightning_gradwatch.numerics.norms import NormType

__all__ = ["CHECKPOINT_KEY", "StepForensics"]

#: The checkpoint key naming the skip list of the run that saved it.
CHECKPOINT_KEY = "gradwatch_skip_list"


class StepForensics:
    """Forensics of the steps of a fit, driven by the callback's hooks.

    Args:
        skip_batches: ``None``, ``"auto"`` or the path or URL of a skip list to replay
            (validated here: ``TypeError``/``ValueError`` naming ``skip_batches``).
        enforcer: the callback's governance (its alerts; the replayed skips go through it).
    """

    def __init__(self, skip_batches: Any, enforcer: RuleEnforcer) -> None:
        self.skip_batches = check_skip_batches(skip_batches)
        self.enforcer = enforcer
        self._known = 0  # alerts before this step's
        self.batches = StepBatches()
        self.rerun = StepRerun()
        self.replay = SkipReplay(self.skip_batches)
        self.active = False
        self.norm_type: NormType = "l2"
        #: This fit's skip list; the one of the run a restored checkpoint came from.
        self.skip_list_path: Optional[str] = None
        self.restored_skip_list: Optional[str] = None
        self._blocks: list[tuple[str, nn.Module]] = []
        self._rows: Optional[Tensor] = None
        self._fit: Optional[FitContext] = None
        self._rows_step = -1

    def start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        fit: FitContext,
        rules: Sequence[Rule],
    ) -> None:
        """At fit start: what to keep (nothing without rules and skip list), whether the
        strategy allows a rerun, and the skip list to replay (rank 0 reads it, every rank gets it)."""
        reruns = any(rule.rerun for rule in rules)
        self.active = bool(rules) or self.skip_batches is not None
        self.norm_type = fit.spec.norm_type
        self._fit = fit
        self._blocks = list(fit.blocks)
        self.batches.start(trainer, keep_rng=reruns)
        if reruns:
            self.rerun.start(trainer, pl_module)
        self.skip_list_path = fit.files.skip_list_path
        self.replay.start(trainer, fit.files.skip_list_path, self.restored_skip_list)

    def batch_start(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        if self.active:
            self.batches.batch_start(trainer, batch, batch_idx)

    def keep_rows(self, trainer: pl.Trainer, rows: Tensor) -> None:
        """A measured step's block rows on this rank, before the reduction (a device copy)."""
        if self.active:
            self._rows, self._rows_step = rows, trainer.global_step

    def evidence(
        self, trainer: pl.Trainer, block_names: Sequence[str]
    ) -> Optional[Callable[[], LocalEvidence]]:
        """What the enforcer calls, on every rank and only when a rule tripped somewhere, for
        this rank's evidence (the loss is the enforcer's own)."""
        self._known = len(self.enforcer.incidents.alerts)
        if not self.active:
            return None

        def take() -> LocalEvidence:
            measured = self._rows_step == trainer.global_step
            return LocalEvidence(
                epoch=self.batches.epoch,
                batch_idx=self.batches.batch_idx,
                fingerprint=self.batches.fingerprint(trainer),
                rows=self._rows if measured else None,
                block_names=list(block_names),
                scale=loss_scale(trainer),
            )

        return take

    def decide(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        k: int,
        measurement: Optional[GradientMeasurement],
        probe: Optional[GradientProbe],
    ) -> Verdict:
        """Optimizer ``k``'s step: the enforcer's verdict (with this rank's evidence when a rule
        tripped), then, before anything acts, the rerun a tripped rule asks for (every rank takes
        the same decisions, so every rank reruns)."""
        assert self._fit is not None
        steps = self._fit.steps
        evidence = self.evidence(trainer, steps.block_names[k])
        params = steps.params[k]
        verdict = self.enforcer.decide(
            trainer, pl_module, k, steps.names[k], params, measurement, evidence
        )
        self.batches.stepped()
        if verdict.wants_rerun:
            self._rerun(trainer, pl_module, verdict, probe, params)
        return verdict

    def _rerun(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        verdict: Verdict,
        probe: Optional[GradientProbe],
        params: Sequence[tuple[str, nn.Parameter]],
    ) -> None:
        """Rerun the step and keep the record in ``verdict.rerun``."""
        rank = trainer.global_rank
        mine = verdict.ranks_evidence[rank] if rank < len(verdict.ranks_evidence) else None
        measurement = verdict.measurement
        # One process: `p.grad` is this rank's own gradient, so its total norm is compared too.
        own = trainer.world_size == 1 and measurement is not None and measurement.grads_measured
        first = first_execution(mine, measurement.total_norm if own else None)  # type: ignore[union-attr]
        verdict.rerun = self.rerun.run(
            trainer, pl_module, self.batches, probe, self._blocks, params, first, self.norm_type
        )

    def acted(
        self,
        trainer: pl.Trainer,
        optimizer: Optimizer,
        params: Sequence[tuple[str, nn.Parameter]],
        tensorboard: TensorBoardWriter,
    ) -> None:
        """After acting: skip the update if the skip list names this batch, and write the step's
        new alerts to TensorBoard's TEXT tab (rank 0)."""
        replay = self.replay.check(trainer, self.batches) if self.active else None
        if replay is not None:  # the skip list names this batch: skip its update, and record it
            self.enforcer.actions.skip(trainer, optimizer, params)
            self.enforcer.incidents.record_replay(trainer, *replay)
        alerts = self.enforcer.incidents.alerts
        if trainer.is_global_zero and len(alerts) > self._known:
            tensorboard.incidents(alerts[self._known :])

    def batch_end(self) -> None:
        self.batches.batch_end()

    def save_to(self, checkpoint: dict[str, Any]) -> None:
        """Name this run's skip list in a checkpoint (beside the callback's state, which stays
        free of paths), so ``skip_batches="auto"`` finds it when a run resumes from it."""
        if self.skip_list_path:
            checkpoint[CHECKPOINT_KEY] = self.skip_list_path

    def load_from(self, checkpoint: dict[str, Any]) -> None:
        path = checkpoint.get(CHECKPOINT_KEY)
        self.restored_skip_list = path if isinstance(path, str) and path else None
