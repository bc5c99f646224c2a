"""``GradientFlowCallback``: the Lightning glue. It arms the probe for measured steps, and at each
optimizer step calls measure -> decide -> act -> log -> observe, each in the layer that owns it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_gradwatch._compat import loss_scale
from lightning_gradwatch.governance import Rule, validate_rules
from lightning_gradwatch.governance.enforcer import RuleEnforcer
from lightning_gradwatch.keys import DEFAULT_EPS
from lightning_gradwatch.lightning.context import FitContext, build_fit_context, require_a_logger
from lightning_gradwatch.lightning.diagnosis import RunDiagnosis
from lightning_gradwatch.lightning.extras import StepExtras
from lightning_gradwatch.lightning.outcome import WatchOutcome
from lightning_gradwatch.lightning.sinks import log_step
from lightning_gradwatch.lightning.tensorboard import TensorBoardWriter
from lightning_gradwatch.measure.blocks import choose_blocks, eager_name, validate_blocks_spec
from lightning_gradwatch.measure.probe import GradientProbe
from lightning_gradwatch.measure.record import GradientMeasurement, MeasurementSpec
from lightning_gradwatch.validation import (
    check_optional_positive_int,
    check_path,
    check_positive_int,
    check_type,
)


class GradientFlowCallback(WatchOutcome, Callback):
    r"""Measure and log gradient flow through a model's blocks while it trains.

    Every ``log_every_n_steps`` optimizer steps (``trainer.global_step`` 0, n, 2n, ...) it measures
    the gradient at each block's output (tensor hooks, combined over the step's micro-batches) and
    every parameter gradient (after accumulation and AMP unscaling, before clipping), batched on
    the device with one host copy, and writes it in one ``log_metrics`` call per logger. On
    unmeasured steps the hooks return at once; only rules checked every step cost anything there.
    Logged keys (``grad_norm/<block>``, ``grad_gain/<block>``, ``grad_log_gain/<block>``, ...,
    ``update_ratio/<block>``): the README's table, spelled once in :mod:`lightning_gradwatch.keys`.

    With several optimizers (manual optimization) each ``optimizer.step()`` is measured over what it
    owns; its total is logged as ``grad_norm_total/<name>`` (``LearningRateMonitor``'s name:
    ``Adam``, ``Adam-1``, ...).

    Args:
        blocks: ``"auto"`` (default: the longest ``ModuleList``/``Sequential`` of same-class
            modules not inside another one's blocks; without one, the modules that own trainable
            parameters in registration order; without those, none: parameter figures only), a
            dotted attribute path to a container (``"model.transformer.h"``), a list of qualified
            module names, or a callable ``pl_module -> [(name, module), ...]``.
        log_every_n_steps: measure and log every n optimizer steps (default 50); each optimizer
            at its first step at or after every multiple of n, over what it owns.
        norm_type: ``"l2"`` (default), ``"l1"``, ``"linf"`` or ``"mean"`` (mean absolute value).
        log_param_norms: ``False`` (default), ``True`` for every parameter, or a glob pattern / list
            of patterns over parameter names (``"*.weight"``).
        log_grad_stats: log the ``grad_stats/`` figures (default ``True``).
        log_histograms: TensorBoard histograms of block-output and parameter gradients (``False``).
        large_threshold: ``grad_stats/large_fraction`` counts ``|g| >`` this (default 1.0).
        eps: norms at or below ``eps`` count as zero (a gain into them is ``inf``; default 1e-30).
        damping_threshold, amplifying_threshold: gains below / above them are "damping" /
            "amplifying" (defaults 0.5, 2.0).
        require_logger: raise at fit start when the Trainer has no logger (default ``True``).
        figure_every_n_steps: every this many *measured* steps, log a gradient-flow heatmap image
            (blocks x the last 200 measured steps) to TensorBoard (needs matplotlib:
            ``lightning-gradwatch[plots]``); ``None`` (default): off.
        rules: :class:`~lightning_gradwatch.governance.Rule` objects that warn, clip, skip or halt
            (``None``, the default: ``[Rule("nonfinite", action="halt")]``; ``[]``: none). Rules on
            ``grad_norm_total``, ``loss`` and ``nonfinite`` run every ``check_every_n_steps``
            steps (one norm pass, one host copy, one boolean all-reduce), others on measured steps.
        check_every_n_steps: cadence of the every-step rules (default 1).
        alerts_path: the JSONL audit trail, a ``str``, ``os.PathLike`` or URL (``None``, the
            default: ``gradwatch_alerts.jsonl`` in the first logger's ``log_dir`` when that is a
            path, else in ``trainer.default_root_dir``); where a store cannot append (``s3://``),
            a local spool copied to the URL at checkpoints and at the end.
        noise_scale: estimate the gradient noise scale on measured steps (default ``False``: one
            more norm pass, and one tiny all-reduce under DDP; see docs/noise-scale.md).
        log_curvature, curvature_*: the Hessian and the edge of stability (docs/curvature.md).
        log_updates: on measured steps, what ``optimizer.step()`` did: ``update_ratio/<block>``,
            weight norms, Adam's state (default ``False``: one copy of the parameters then, nothing
            on other steps; see docs/updates.md). Rules may then read them (warn or halt).
        skip_batches: skip the optimizer step of the batches a skip list names (matched by
            fingerprint, see docs/forensics.md): its path or URL, or ``"auto"``: when resuming,
            the ``gradwatch_skipped_batches.json`` that ``skip``/``halt`` decisions wrote beside
            the alert trail (default ``None``: none).

    Example::

        from lightning_gradwatch import GradientFlowCallback

        trainer = L.Trainer(callbacks=[GradientFlowCallback(log_every_n_steps=50)])
        trainer.fit(model)
        print(trainer.callbacks[0].last.summary)
    """

    def __init__(
        self,
        blocks: Union[
            str, list[str], Callable[[nn.Module], Sequence[tuple[str, nn.Module]]]
        ] = "auto",
        log_every_n_steps: int = 50,
        norm_type: str = "l2",
        log_param_norms: Union[bool, str, list[str]] = False,
        log_grad_stats: bool = True,
        log_histograms: bool = False,
        large_threshold: float = 1.0,
        eps: float = DEFAULT_EPS,
        damping_threshold: float = 0.5,
        amplifying_threshold: float = 2.0,
        require_logger: bool = True,
        figure_every_n_steps: Optional[int] = None,
        rules: Optional[list[Rule]] = None,
        check_every_n_steps: int = 1,
        alerts_path: Optional[Union[str, os.PathLike[str]]] = None,
        noise_scale: bool = False,
        log_curvature: bool = False,
        curvature_every_n_steps: int = 500,
        curvature_iterations: int = 30,
        curvature_probes: int = 2,
        log_updates: bool = False,
        skip_batches: Optional[Union[str, os.PathLike[str]]] = None,
    ) -> None:
        super().__init__()
        self.blocks = validate_blocks_spec(blocks)
        self.log_every_n_steps = check_positive_int(log_every_n_steps, "log_every_n_steps")
        self.spec = MeasurementSpec.from_arguments(
            norm_type=norm_type, eps=eps, damping_threshold=damping_threshold,
            amplifying_threshold=amplifying_threshold, large_threshold=large_threshold,
            log_grad_stats=log_grad_stats, log_param_norms=log_param_norms,
        )  # fmt: skip
        self.log_histograms = check_type(log_histograms, bool, "log_histograms")
        self.require_logger = check_type(require_logger, bool, "require_logger")
        self.rules = validate_rules(rules)
        self._enforcer = RuleEnforcer(
            self.rules,
            check_positive_int(check_every_n_steps, "check_every_n_steps"),
            None if alerts_path is None else check_path(alerts_path, "alerts_path"),
        )
        every = figure_every_n_steps
        self.figure_every_n_steps = check_optional_positive_int(every, "figure_every_n_steps")
        self._tensorboard = TensorBoardWriter(self.figure_every_n_steps)
        self.last: Optional[GradientMeasurement] = None  #: the latest measured step's figures
        self.block_names: list[str] = []  #: the watched blocks, once fit has started
        self._probe: Optional[GradientProbe] = None
        self._fit: Optional[FitContext] = None  #: what fit start decided (``None`` outside a fit)
        self._armed_step = -1
        self._diagnosis = RunDiagnosis()
        #: The optional per-step helpers: noise scale, update figures, curvature, forensics.
        self._extras = StepExtras(
            self.rules, self._enforcer, noise_scale=noise_scale, log_curvature=log_curvature,
            curvature_every_n_steps=curvature_every_n_steps,
            curvature_iterations=curvature_iterations, curvature_probes=curvature_probes,
            log_updates=log_updates, skip_batches=skip_batches,
        )  # fmt: skip
        self.noise_scale, self.log_updates = self._extras.noise_scale, self._extras.log_updates

    # -- lifecycle -------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # before the strategy registers a user's DDP hook: wrap it
            self._extras.setup(trainer)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.require_logger:
            require_a_logger(trainer)
        # Keys as in eager mode: without the `_orig_mod` of torch.compile wrappers (OptimizedModule).
        choice = choose_blocks(pl_module, self.blocks)
        blocks = [(eager_name(n), m) for n, m in choice.blocks]
        self._remove_hooks()
        self._probe = GradientProbe(
            blocks,
            self.spec.norm_type,
            keep_grads=self.log_histograms,
            check_order=choice.registration_order,
            device=pl_module.device,
        )
        fit = build_fit_context(
            trainer,
            pl_module,
            blocks,
            self.spec,
            self.rules,
            self._probe.buffer.device,
            alerts_path=self._enforcer.alerts_path,
        )
        self._fit, self.block_names = fit, fit.block_names
        self._armed_step = -1
        self._enforcer.setup(
            trainer,
            fit.block_names,
            fit.spec,
            alerts_path=fit.files.alerts_path,
            halt_dir=fit.files.halt_dir,
            skip_list_path=fit.files.skip_list_path,
        )
        self._diagnosis.start(trainer, pl_module, fit.blocks, fit.spec, self.rules, fit.files)
        self._extras.start(trainer, pl_module, fit, self.rules, self._enforcer, self._diagnosis)
        rank_zero_info(
            f"GradientFlowCallback: watching {choice.describe(self.block_names)} "
            f"every {self.log_every_n_steps} optimizer steps{choice.reason}."
        )
        if fit.is_global_zero:
            self._tensorboard.start(
                fit.loggers,
                fit.block_names,
                fit.spec,
                self._extras.updates.total_keys(fit),
                curvature=self._extras.curvature.enabled,
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit is not None:  # after a checkpoint restored the step: keep its grid
            self._fit.steps.begin(trainer.global_step)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._enforcer.end_step(trainer)
        self._enforcer.upload_trail()  # a trail spooled for a store that cannot append

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._remove_hooks()
        self._enforcer.upload_trail()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._diagnosis.finish(trainer)  # findings to TensorBoard's TEXT tab, facts file

    def _remove_hooks(self) -> None:
        self._diagnosis.remove()
        self._extras.remove()
        if self._probe is not None:
            self._probe.remove()
            self._probe = None

    # -- one optimizer step: arm, then measure -> decide -> act -> log -> observe ----------------

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step, fit = trainer.global_step, self._fit
        measured = fit is not None and fit.batch_starts(
            step, trainer.current_epoch, self.log_every_n_steps
        )
        self._extras.batch_start(trainer, pl_module, batch, batch_idx, measured)
        if fit is None or self._probe is None or not measured:
            return
        # First micro-batch of a measured step: start from zero. Later micro-batches of the same
        # step (gradient accumulation) add to it, so every micro-batch of the step is combined.
        if step != self._armed_step:
            self._probe.reset()
            fit.steps.zeroed()
            self._armed_step = step
        self._probe.arm()  # until the batch ends

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor
    ) -> None:
        if self._fit is None:
            return
        if self._probe is not None and self._probe.armed:
            self._fit.steps.forget_zeroed(self._probe.buffer)
        self._enforcer.on_before_backward(trainer, pl_module, loss, self._fit.steps.params)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fit is not None and self._probe is not None and self._probe.armed:
            self._fit.steps.backward_done()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._fit is None:
            return
        steps = self._fit.steps
        k = steps.index(optimizer)
        params = steps.params[k]
        measurement = self._measure(trainer, k)
        extras = self._extras
        curv = extras.curvature.step(trainer, optimizer, steps.names[k], self._probe, measurement)
        steps.stepped(k, trainer.global_step)
        # Rules see the pre-clip figures (a trip names its batch and rank, and may be rerun); they
        # may clip, drop the gradients or stop training.
        verdict = extras.forensics.decide(trainer, pl_module, k, measurement, self._probe)
        extra = {**self._enforcer.act(trainer, optimizer, params, verdict), **curv}
        extras.forensics.acted(trainer, optimizer, params, self._tensorboard)
        extras.updates.before_step(k, measurement)  # on measured steps: the weights before the step
        if measurement is not None and measurement.skipped_by_scaler:
            # The AMP scaler skips this step (inf/NaN gradients) and lowers its scale: its job, not
            # a measurement. Rules have seen it; nothing is logged unless they halted training.
            if self.halted and trainer.is_global_zero:
                log_step(trainer, None, extra, self._tensorboard)
            return
        if trainer.is_global_zero:
            histograms = self._probe if self.log_histograms else None
            log_step(trainer, measurement, extra, self._tensorboard, histograms, params)
        if measurement is not None:
            self.last = measurement  # kept, and fed to the run's diagnosis
            self._diagnosis.observe(trainer, measurement, params)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._enforcer.end_step(trainer)
        self._extras.batch_end()
        if self._probe is not None:
            self._probe.disarm()

    def _measure(self, trainer: pl.Trainer, k: int) -> Optional[GradientMeasurement]:
        """Optimizer ``k``'s figures at this step if it is measured (else ``None``)."""
        fit, probe = self._fit, self._probe
        if fit is None or probe is None or not probe.armed:
            return None
        self._extras.forensics.keep_rows(
            trainer, fit.steps.rows(probe.buffer, k)
        )  # before the reduction
        measurement = fit.measure(
            probe, k, trainer.global_step, self.log_every_n_steps, scale=loss_scale(trainer),
            take_loss=lambda: self._enforcer.step_loss(trainer),
        )  # fmt: skip
        if measurement is not None:
            update = self._extras.noise.update(trainer, measurement, fit.steps.params[k])
            measurement.metrics.update(update)
        return measurement
