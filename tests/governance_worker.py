"""Script for the governance tests that need their own processes:
``python tests/governance_worker.py SCENARIO OUT_DIR``.

* ``ddp``: ``strategy="ddp"`` on 2 CPU processes (Lightning re-runs this script for rank 1). An Inf
  is put into one parameter gradient on rank 1 only at step ``FAULT_STEP``, after the all-reduce; the
  ``nonfinite`` rule trips there on rank 1 only. A ``grad_norm/blocks.0`` rule trips on both ranks
  at every measured step. Each rank saves ``rank<r>.pt`` with what it saw.
* ``ddp_skip``: the same fault with ``Rule("nonfinite", action="skip")``: every rank skips that
  step and training goes on. Each rank saves ``rank<r>.pt``.
* ``kill``: a single process whose warn rule trips every step; the module kills its own process with
  ``SIGKILL`` at step ``KILL_STEP``, mid-run, with no chance to clean up.
* ``loss_ddp``: ``strategy="ddp"`` on 2 CPU processes with a ``loss`` rule; rank 1's loss alone is
  multiplied by ``LOSS_SPIKE`` at step ``LOSS_SPIKE_STEP``. The module also logs its loss with
  ``sync_dist=True`` (Lightning's own cross-rank mean) every step. Each rank saves ``rank<r>.pt``.
* ``forensics_ddp``: ``strategy="ddp"`` on 2 CPU processes, each rank with its own data
  (``use_distributed_sampler=False``): rank 1's batch ``POISONED_BATCH`` has out-of-range targets,
  and rank 1's output is corrupted in the first execution of step ``CORRUPTED_STEP`` only. A skip
  rule on the loss with ``rerun=True`` and a warn rule on the total norm trip at both steps. Each
  rank saves ``rank<r>.pt``.
* ``forensics_replay``: the same data without the corruption and without rules, replaying the skip
  list ``forensics_ddp`` wrote under ``OUT_DIR`` (``skip_batches``); logs under ``OUT_DIR/replay``,
  each rank saves ``replay<r>.pt``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from faults import FaultNet, PoisonNet, RankFault, ddp_trainer, snapshot

from lightning_gradwatch import GradientFlowCallback, Rule

FAULT_STEP = 3
LOG_EVERY = 2
KILL_STEP = 5
LOSS_SPIKE_STEP = 9
LOSS_SPIKE = 20.0
POISONED_BATCH = 3
CORRUPTED_STEP = 6


class Killed(FaultNet):
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.global_step == KILL_STEP:
            os.kill(os.getpid(), signal.SIGKILL)


def ddp(out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    model = FaultNet(n_samples=128, batch_size=8)
    callback = GradientFlowCallback(
        log_every_n_steps=LOG_EVERY,
        rules=[
            Rule("nonfinite", action="halt"),
            Rule("grad_norm/blocks.0", max=0.0, action="warn", name="block0"),
        ],
    )
    trainer = ddp_trainer(out_dir, [RankFault(rank=1, step=FAULT_STEP), callback], max_steps=10)
    trainer.fit(model)
    record = {
        "rank": trainer.global_rank,
        "global_step": trainer.global_step,
        "halted": callback.halted,
        "halt_reason": callback.halt_reason,
        "alerts": [
            (a.step, a.rule, a.action, list(a.ranks), a.checkpoint) for a in callback.alerts
        ],
        "weights_before": {step: w for step, w in model.weights.items()},
        "final": snapshot(model),
        "last_step_started": max(model.weights),
    }
    torch.save(record, Path(out_dir) / f"rank{trainer.global_rank}.pt")


class RankSpike(FaultNet):
    """Multiplies rank 1's loss by ``LOSS_SPIKE`` at ``LOSS_SPIKE_STEP``; records each rank's own
    loss and logs it for Lightning to average across ranks (``sync_dist=True``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.losses: dict[int, float] = {}

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and self.trainer.global_step == LOSS_SPIKE_STEP:
            loss = loss * LOSS_SPIKE
        self.losses[self.trainer.global_step] = float(loss)
        self.log("lightning_loss", loss, sync_dist=True, on_step=True, on_epoch=False)
        return loss


def loss_ddp(out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    model = RankSpike(n_samples=256, batch_size=8)
    rule = Rule("loss", zscore=6.0, window=8, warmup=4, action="skip", name="loss_spike")
    callback = GradientFlowCallback(log_every_n_steps=LOG_EVERY, rules=[rule])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=12,
        callbacks=[callback],
        logger=CSVLogger(out_dir, name="csv", version=0),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out_dir,
    )
    trainer.fit(model)
    record = {
        "alerts": [(a.step, a.rule, a.action, list(a.ranks), a.value) for a in callback.alerts],
        "losses": model.losses,
        "governance": callback.state_dict()["governance"],
        "weights": model.weights,
    }
    torch.save(record, Path(out_dir) / f"rank{trainer.global_rank}.pt")


def ddp_skip(out_dir: str) -> None:
    """One rank of a 2-process DDP run where an Inf reaches rank 1's gradients only at one step."""
    pl.seed_everything(0, verbose=False)
    model = FaultNet(n_samples=128, batch_size=8)
    callback = GradientFlowCallback(log_every_n_steps=50, rules=[Rule("nonfinite", action="skip")])
    callbacks = [RankFault(rank=1, step=FAULT_STEP), callback]
    trainer = ddp_trainer(out_dir, callbacks, max_steps=6)
    trainer.fit(model)
    record = {
        "global_step": trainer.global_step,
        "halted": callback.halted,
        "alerts": [(a.step, a.rule, a.action, a.rank, list(a.ranks)) for a in callback.alerts],
        "weights": model.weights,
        "final": snapshot(model),
    }
    torch.save(record, Path(out_dir) / f"rank{trainer.global_rank}.pt")


def forensics_ddp(out_dir: str) -> None:
    """Rank 1's batch is poisoned at one step and its output corrupted once at another."""
    pl.seed_everything(0, verbose=False)
    model = PoisonNet(
        poison=((0, POISONED_BATCH),),
        rank=1,
        corrupt=((CORRUPTED_STEP, 1),),
        n_samples=64,
        batch_size=8,
    )
    rules = [
        Rule("loss", max=50.0, action="skip", rerun=True, name="bad_batch"),
        Rule("grad_norm_total", max=100.0, action="warn", name="spike"),
    ]
    callback = GradientFlowCallback(log_every_n_steps=1, rules=rules)
    trainer = ddp_trainer(out_dir, [callback], max_steps=8, use_distributed_sampler=False)
    trainer.fit(model)
    keys = ("step", "epoch", "rule", "action", "batch_idx", "fingerprints", "origin_rank")
    record = {
        "alerts": [
            {k: getattr(a, k) for k in (*keys, "local", "rerun", "message")}
            for a in callback.alerts
        ],
        "weights": model.weights,
        "final": snapshot(model),
    }
    torch.save(record, Path(out_dir) / f"rank{trainer.global_rank}.pt")


def forensics_replay(out_dir: str) -> None:
    """Rank 1's poisoned batch again, skipped from the list the ``forensics_ddp`` run wrote."""
    pl.seed_everything(0, verbose=False)
    model = PoisonNet(poison=((0, POISONED_BATCH),), rank=1, n_samples=64, batch_size=8)
    listed = Path(out_dir) / "csv" / "version_0" / "gradwatch_skipped_batches.json"
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[], skip_batches=listed)
    folder = str(Path(out_dir) / "replay")
    trainer = ddp_trainer(folder, [callback], max_steps=8, use_distributed_sampler=False)
    trainer.fit(model)
    keys = ("step", "epoch", "rule", "action", "condition", "batch_idx", "fingerprints")
    record = {
        "alerts": [{k: getattr(a, k) for k in keys} for a in callback.alerts],
        "weights": model.weights,
    }
    torch.save(record, Path(out_dir) / f"replay{trainer.global_rank}.pt")


def kill(out_dir: str) -> None:
    pl.seed_everything(0, verbose=False)
    callback = GradientFlowCallback(
        log_every_n_steps=100,
        rules=[Rule("grad_norm_total", max=0.0, action="warn", name="always")],
        alerts_path=os.path.join(out_dir, "alerts.jsonl"),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=50,
        callbacks=[callback],
        logger=CSVLogger(out_dir, name="csv", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out_dir,
    )
    trainer.fit(Killed())


if __name__ == "__main__":
    scenarios = {
        "ddp": ddp,
        "ddp_skip": ddp_skip,
        "kill": kill,
        "loss_ddp": loss_ddp,
        "forensics_ddp": forensics_ddp,
        "forensics_replay": forensics_replay,
    }
    scenarios[sys.argv[1]](sys.argv[2])
