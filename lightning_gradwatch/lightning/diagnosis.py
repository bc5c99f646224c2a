"""The diagnosis inside a Lightning run: model facts at fit start, one row of the run history per
logged measured step, the first-step report with the findings that already apply, the facts file
beside the logs, and the findings in TensorBoard's TEXT tab at fit end.

The checks themselves are pure (:mod:`lightning_gradwatch.diagnosis.checks`); this module only feeds
them and writes what they say. Per measured step it costs one :meth:`RunHistory.add` (a few Python floats;
a fixed number of rows is kept); no tensor work after fit start.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_gradwatch.diagnosis.checks import diagnose
from lightning_gradwatch.diagnosis.findings import Finding, format_findings
from lightning_gradwatch.diagnosis.first_step import FirstStepReport, first_step_report
from lightning_gradwatch.diagnosis.model_facts import collect_model_facts
from lightning_gradwatch.diagnosis.run_history import (
    ClipBound,
    RunHistory,
    Settings,
    Wiring,
)
from lightning_gradwatch.diagnosis.structure import StructureCapture
from lightning_gradwatch.files import write_text
from lightning_gradwatch.governance import Rule, rule_labels
from lightning_gradwatch.keys import (
    NOISE_B_SIMPLE_KEY,
    NOISE_BATCH_KEY,
    SHARPNESS_RATIO_KEY,
    TOTAL_NORM_KEY,
)
from lightning_gradwatch.lightning import tensorboard
from lightning_gradwatch.lightning.run_files import RunFiles
from lightning_gradwatch.measure.record import GradientMeasurement, MeasurementSpec

__all__ = ["DIAGNOSIS_TAG", "RunDiagnosis", "clip_bounds"]

#: TensorBoard text tag of the findings written at fit end.
DIAGNOSIS_TAG = "gradwatch/diagnosis"

NamedParams = Sequence[tuple[str, nn.Parameter]]


class RunDiagnosis:
    """Feeds the diagnosis checks during a fit (every rank; files and TensorBoard on rank 0).

    Example::

        diagnosis = RunDiagnosis()
        diagnosis.start(trainer, pl_module, blocks, spec, rules, files)  # on_fit_start
        report = diagnosis.first_step(measurement, params)  # first measured step
        diagnosis.observe(trainer, measurement)  # each logged measured step
        diagnosis.finish(trainer)  # on_fit_end
    """

    def __init__(self) -> None:
        self.history = RunHistory([])
        self._capture: Optional[StructureCapture] = None
        self._written = False
        #: The first measured step's report (of the first optimizer to step, with several).
        self.first_step_report: Optional[FirstStepReport] = None
        self._reported: set[Optional[str]] = set()  # optimizers whose first step was reported
        self._facts_paths: tuple[str, ...] = ()
        self._warned_write = False

    def start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        blocks: Sequence[tuple[str, nn.Module]],
        spec: MeasurementSpec,
        rules: Sequence[Rule],
        files: RunFiles,
    ) -> None:
        """Collect the model facts (one walk and one batched std) and arm the Post-LN capture;
        the facts file goes to ``files.facts_paths``."""
        self.remove()
        self._facts_paths = files.facts_paths
        facts = collect_model_facts(pl_module, blocks)
        settings = Settings(
            norm_type=spec.norm_type,
            eps=spec.eps,
            damping_threshold=spec.damping_threshold,
            amplifying_threshold=spec.amplifying_threshold,
            clip_bounds=clip_bounds(trainer, rules, spec.norm_type),
        )
        self.history = RunHistory([name for name, _ in blocks], settings=settings, facts=facts)
        self._capture = StructureCapture(blocks, facts)
        self._written = False
        self.first_step_report, self._reported = None, set()

    def first_step(self, measurement: GradientMeasurement, params: NamedParams) -> FirstStepReport:
        """The first measured step's wiring report, with the findings of that step alone; says it
        (a warning when something is wrong, else an info line)."""
        report = first_step_report(
            measurement.step,
            [name for name, p in params if p.grad is None],
            measurement.zero_grad_params,
            measurement.block_names,
            measurement.categories,
        )
        self.history.wiring = Wiring(measurement.step, list(report.no_grad), list(report.zero_grad))
        alone = RunHistory(
            self.history.block_names,
            settings=self.history.settings,
            facts=self.history.facts,
            wiring=self.history.wiring,
        )
        _add(alone, measurement)
        report.findings = diagnose(alone)
        (rank_zero_info if report.ok and not report.findings else rank_zero_warn)(report.message())
        return report

    def observe(
        self, trainer: pl.Trainer, measurement: GradientMeasurement, params: NamedParams
    ) -> None:
        """Add one logged measured step; the first one also writes the facts file (rank 0), and
        each optimizer's first one is reported (:meth:`first_step`)."""
        _add(self.history, measurement)
        if not self._written:
            self._written = True
            self._write(trainer)
        if measurement.optimizer not in self._reported:
            self._reported.add(measurement.optimizer)
            report = self.first_step(measurement, params)
            self.first_step_report = self.first_step_report or report

    @property
    def findings(self) -> list[Finding]:
        """The findings over the measured steps so far (the window the checks read)."""
        return diagnose(self.history)

    def finish(self, trainer: pl.Trainer) -> list[Finding]:
        """At fit end: the findings; on rank 0 the facts file again (complete) and the findings as
        text in each TensorBoard logger."""
        self.remove()
        findings = self.findings
        if self.history.measured == 0:
            return findings
        self._write(trainer)
        if trainer.is_global_zero:
            text = format_findings(findings, self.history, markdown=True)
            tensorboard.write_text(trainer.loggers, DIAGNOSIS_TAG, text, trainer.global_step)
        return findings

    def remove(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def _write(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        # Every float in it is finite (validated settings, finite init ratios): plain JSON.
        content = json.dumps(self.history.facts_dict(), indent=1)
        for path in self._facts_paths:
            try:
                write_text(path, content)
            except Exception as error:  # whatever the fsspec backend raises: the run goes on
                if not self._warned_write:
                    self._warned_write = True
                    rank_zero_warn(
                        f"GradientFlowCallback: could not write the model facts to {path} "
                        f"({type(error).__name__}: {error}); the report will lack them."
                    )


def clip_bounds(trainer: pl.Trainer, rules: Sequence[Rule], norm_type: str) -> list[ClipBound]:
    """The norm-clipping bounds of this run: Lightning's ``gradient_clip_val`` (L2 norm clipping:
    counted only when the callback's ``norm_type`` is ``"l2"``) and ``clip`` rules with a ``max`` on
    ``grad_norm_total`` (value clipping and z-score rules have no fixed norm bound)."""
    bounds = []
    value = trainer.gradient_clip_val
    algorithm = str(trainer.gradient_clip_algorithm or "norm")
    if value and norm_type == "l2" and algorithm == "norm":
        bounds.append(ClipBound("gradient_clip_val", float(value), float(value)))
    for rule, label in zip(rules, rule_labels(rules)):
        if (
            rule.action == "clip"
            and rule.clip_mode == "norm"
            and rule.metric == TOTAL_NORM_KEY
            and rule.max is not None
            and rule.clip_to is not None
        ):
            bounds.append(ClipBound(f"rule {label!r}", float(rule.max), float(rule.clip_to)))
    return bounds


def _add(history: RunHistory, measurement: GradientMeasurement) -> None:
    history.add(
        measurement.step,
        measurement.norms_of(history.block_names),  # several optimizers: a step's blocks only
        measurement.total_norm if measurement.grads_measured else None,
        measurement.grad_stats.get("zero_fraction"),
        measurement.metrics.get(NOISE_B_SIMPLE_KEY),
        measurement.metrics.get(NOISE_BATCH_KEY),
        measurement.metrics.get(SHARPNESS_RATIO_KEY),
    )
