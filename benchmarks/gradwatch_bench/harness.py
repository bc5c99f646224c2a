"""The interleaved harness: one Trainer fit per model, one step per variant per shuffled round, each
variant step timed and paired with the baseline step of the same round."""

from __future__ import annotations

import gc
import os
import random
import time
from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from gradwatch_bench.models import ModelSpec
from gradwatch_bench.stats import StepRecord, summarize
from gradwatch_bench.timing import OWN, timed_hook_registration
from gradwatch_bench.variants import Variant, make_variants


class Switchboard(Callback):
    """Attaches the scheduled variant at the start of each step and times the step: from this
    hook to the same hook of the next step (so Lightning's logging after the step is included)."""

    def __init__(self, variants: Sequence[Variant], schedule: Sequence[tuple[str, int]]) -> None:
        self.variants = {v.name: v for v in variants}
        self.schedule = list(schedule)
        self.records: list[StepRecord] = []
        self.active: Optional[Variant] = None
        self._current: Optional[tuple[str, int]] = None
        self._index = 0
        self._wall = 0.0
        self._cpu = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # TensorBoard serialises and writes queued events in a background thread: drain it here so
        # the writing is charged to the step that logged, not to whichever variant runs next.
        drain_tensorboard(trainer)
        wall, cpu = time.perf_counter(), time.process_time()
        if self._current is not None and self._current[1] >= 0:
            self.records.append(
                StepRecord(
                    self._current[0],
                    self._current[1],
                    (wall - self._wall) * 1e3,
                    (cpu - self._cpu) * 1e3,
                    OWN.total * 1e3,
                )
            )
        self._switch(trainer, pl_module)
        OWN.total = 0.0
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self._forward("on_train_batch_start", trainer, pl_module, batch, batch_idx)

    def _switch(self, trainer: pl.Trainer, module: Any) -> None:
        entry = self.schedule[self._index] if self._index < len(self.schedule) else ("baseline", -1)
        self._index += 1
        if self.active is not None:
            self.active.detach(trainer, module)
        self.active = self.variants[entry[0]]
        self.active.attach(trainer, module)
        self._current = entry
        # Attaching creates thousands of objects (hooks, closures); a cyclic collection they trigger
        # inside the timed step would be charged to whichever variant runs then. Collect here,
        # untimed, before every step of every variant alike (timeit disables the collector instead).
        drain_tensorboard(trainer)  # what attaching wrote (the callback's custom-scalars layout)
        gc.collect()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active is not None:
            self.active.detach(trainer, pl_module)
            self.active = None

    def _forward(self, hook: str, *args: Any) -> None:
        callback = self.active.callback if self.active is not None else None
        if callback is None:
            return
        start = time.perf_counter()
        getattr(callback, hook)(*args)
        OWN.total += time.perf_counter() - start

    def on_before_backward(self, *args: Any) -> None:
        self._forward("on_before_backward", *args)

    def on_after_backward(self, *args: Any) -> None:
        self._forward("on_after_backward", *args)

    def on_before_optimizer_step(self, *args: Any) -> None:
        self._forward("on_before_optimizer_step", *args)

    def on_before_zero_grad(self, *args: Any) -> None:
        self._forward("on_before_zero_grad", *args)

    def on_train_batch_end(self, *args: Any) -> None:
        self._forward("on_train_batch_end", *args)


def drain_tensorboard(trainer: pl.Trainer) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.flush()


def make_schedule(
    names: Sequence[str], rounds: int, warmup: int, seed: int
) -> list[tuple[str, int]]:
    """``warmup`` untimed baseline steps, then ``rounds`` shuffled rounds of one step per variant."""
    rng = random.Random(seed)
    schedule = [("baseline", -1)] * warmup
    for r in range(rounds):
        order = list(names)
        rng.shuffle(order)
        schedule += [(name, r) for name in order]
    return schedule


def trainer_for(root: str, steps: int, callbacks: list[Callback], flush: int = 100) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=[
            TensorBoardLogger(root, name="tb"),
            CSVLogger(root, name="csv", flush_logs_every_n_steps=flush),
        ],
        log_every_n_steps=1,  # the built-in variant logs every step it is active
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )


def run_model(
    spec: ModelSpec,
    warmup: int,
    seed: int,
    root: str,
    variants: Optional[Sequence[Variant]] = None,
    optimizer: str = "sgd",
) -> dict[str, Any]:
    """One fit of ``spec``'s model stepping every variant (default: :func:`make_variants`) in
    shuffled rounds, with ``optimizer`` (``"sgd"`` or ``"adamw"``)."""
    torch.manual_seed(seed)
    module = spec.build()
    module.optimizer = optimizer
    variants = list(variants) if variants is not None else make_variants()
    schedule = make_schedule([v.name for v in variants], spec.rounds, warmup, seed)
    board = Switchboard(variants, schedule)
    n_params = sum(1 for _ in module.parameters())
    n_blocks = len(module.net.blocks)  # type: ignore[union-attr,arg-type]
    started = time.perf_counter()
    with timed_hook_registration():
        trainer_for(os.path.join(root, spec.name), len(schedule) + 1, [board]).fit(module)
    stats = summarize(board.records, seed)
    return {
        "name": spec.name,
        "label": spec.label,
        "rounds": spec.rounds,
        "param_tensors": n_params,
        "parameters": sum(p.numel() for p in module.parameters()),
        "blocks": n_blocks,
        "seconds": time.perf_counter() - started,
        "stats": {name: vars(s) for name, s in stats.items()},
        "records": [vars(r) for r in board.records],
    }
