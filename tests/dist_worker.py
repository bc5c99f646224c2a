"""Script for the multi-process tests: ``python tests/dist_worker.py SCENARIO OUT_DIR``.

Lightning's ``ddp`` and ``ModelParallelStrategy`` launchers re-run this very script for rank 1, so
everything below runs on every rank. Each rank trains a small ``BlockNet`` with four
``GradientFlowCallback`` instances (one per norm type) and saves ``rank<r>.pt`` with what the test in
the parent process compares against its own single-process reference:

* ``weights[step]``: the full weights at the start of each measured step;
* ``batches[step]``: this rank's micro-batches ``(x, y)`` of each measured step;
* ``grads[step]``: the full parameter gradients seen by the module's own ``on_before_optimizer_step``
  (``full_tensor()`` of FSDP2 DTensor shards; the synchronized gradients under DDP);
* ``measured[norm_type][step]``: the callback's ``last.metrics``;
* ``shapes[step]``: ``(local, full)`` shape of each parameter gradient;
* ``calls[step]``: the probe's per-block tensor-hook call counts (every step);
* ``collectives[step]``: Python-level collectives issued between batch start and batch end;
* ``logged``: every ``log_metrics`` call this rank's recording logger received.

Scenarios: ``ddp`` (``strategy="ddp"``, 2 CPU processes, ``accumulate_grad_batches=2``),
``fsdp2`` (``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``) and ``gns`` (like
``ddp``, one L2 callback with ``noise_scale=True``, and a user's ``ddp_comm_hook`` that counts its
calls, registered on CPU as Lightning does on CUDA; ``user_hook_calls`` is saved too).

``ddp_updates`` and ``fsdp2_updates``: like ``ddp`` / ``fsdp2`` with one L2 callback,
``log_updates=True``, AdamW and a warn rule on ``update_ratio_total`` that trips at every measured
step; each rank also saves ``after[step]`` (the full weights after the measured step),
``state[step]`` (AdamW's full state then), ``updates[step]`` (``last_updates.metrics``) and
``alerts``.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from models import BlockNet, fully_shard_blocks
from update_reference import adam_state

from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.measure.probe import CALLS

NORM_TYPES = ("l2", "l1", "linf", "mean")
LOG_EVERY = 2
MAX_STEPS = 3
ACCUMULATE = 2
DEPTH, WIDTH = 4, 8
COUNTED = ("all_gather", "all_reduce", "all_gather_into_tensor", "broadcast", "reduce_scatter")
_collectives: dict[str, Any] = {"window": None, "counts": defaultdict(int)}
_user_hook_calls = [0]


def user_hook(state, bucket):  # type: ignore[no-untyped-def]
    """A user's DDP communication hook: plain averaging, counting its calls (no annotations: DDP
    rejects string ones)."""
    _user_hook_calls[0] += 1
    return allreduce_hook(state, bucket)


class CpuHookDDP(DDPStrategy):
    """Registers ``ddp_comm_hook`` on CPU too (Lightning does it on CUDA only), at the same point."""

    def _register_ddp_hooks(self) -> None:
        _register_ddp_comm_hook(
            model=self.model,  # type: ignore[arg-type]
            ddp_comm_state=self._ddp_comm_state,
            ddp_comm_hook=self._ddp_comm_hook,
            ddp_comm_wrapper=self._ddp_comm_wrapper,
        )


def _count(name: str) -> None:
    original = getattr(dist, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        if _collectives["window"] is not None:
            _collectives["counts"][_collectives["window"]] += 1
        return original(*args, **kwargs)

    setattr(dist, name, counted)


def install_collective_counters() -> None:
    """Count Python-level collectives per optimizer step (only in the worker processes)."""
    for name in COUNTED:
        _count(name)


def full(tensor: Tensor) -> Tensor:
    """The full value of a (possibly DTensor-sharded) tensor, detached and cloned."""
    full_tensor = getattr(tensor, "full_tensor", None)
    value = full_tensor() if callable(full_tensor) else tensor
    return value.detach().clone()


def local_shape(tensor: Tensor) -> tuple[int, ...]:
    to_local = getattr(tensor, "to_local", None)
    return tuple((to_local() if callable(to_local) else tensor).shape)


class RecordingLogger(Logger):
    """A real logger that keeps every ``log_metrics`` call on every rank (no rank-zero filter)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.calls.append((-1 if step is None else int(step), dict(metrics)))


class Recorder(BlockNet):
    def __init__(self, fsdp: bool, updates: bool = False) -> None:
        super().__init__(depth=DEPTH, width=WIDTH, n_samples=128, batch_size=8, lr=0.1)
        self.fsdp, self.updates = fsdp, updates
        self._step = -1
        self.record: dict[str, Any] = {
            "weights": {},
            "batches": defaultdict(list),
            "grads": {},
            "measured": defaultdict(dict),
            "calls": {},
            "shapes": {},
            "after": {},
            "state": {},
            "updates": {},
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.updates:  # eps 1e-3: some elements have sqrt(v_hat) below it
            return torch.optim.AdamW(self.parameters(), lr=0.01, eps=1e-3)
        return super().configure_optimizers()

    def configure_model(self) -> None:
        if self.fsdp:
            fully_shard_blocks(self)

    def _measured(self) -> bool:
        return self.trainer.global_step % LOG_EVERY == 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step = self._step = self.trainer.global_step
        _collectives["window"] = step
        if self._measured() and step not in self.record["weights"]:
            self.record["weights"][step] = {n: full(p) for n, p in self.named_parameters()}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        _collectives["window"] = None
        stepped = self.trainer.global_step > self._step  # the last micro-batch's end
        if self.updates and stepped and self._step % LOG_EVERY == 0:
            named = dict(self.named_parameters())
            self.record["after"][self._step] = {n: full(p) for n, p in named.items()}
            self.record["state"][self._step] = adam_state(self.optimizers(), named, full)
            [watcher] = [c for c in self.trainer.callbacks if isinstance(c, GradientFlowCallback)]  # type: ignore[attr-defined]
            self.record["updates"][self._step] = dict(watcher.last_updates.metrics)  # type: ignore[union-attr]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self._measured():
            x, y = batch
            self.record["batches"][self.trainer.global_step].append((x.clone(), y.clone()))
        return super().training_step(batch, batch_idx)

    def on_after_backward(self) -> None:
        # Every micro-batch: the probe's hook counts so far in this step (the callback clears them
        # once it has measured the step), so the last micro-batch's are the whole step's; on
        # unmeasured steps no hook may touch the buffer.
        watchers = [c for c in self.trainer.callbacks if isinstance(c, GradientFlowCallback)]  # type: ignore[attr-defined]
        if watchers and watchers[0]._probe is not None:
            counts = watchers[0]._probe.buffer[:, CALLS].tolist()
            self.record["calls"][self.trainer.global_step] = counts

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls the callbacks' hook first: their measurement of this step is complete.
        step = self.trainer.global_step
        if not self._measured():
            return
        watchers = [c for c in self.trainer.callbacks if isinstance(c, GradientFlowCallback)]  # type: ignore[attr-defined]
        self.record["grads"][step] = {
            n: full(p.grad) for n, p in self.named_parameters() if p.grad is not None
        }
        # (local shape, full shape) of each gradient: shards under FSDP2, whole tensors under DDP.
        self.record["shapes"][step] = {
            n: (local_shape(p.grad), tuple(p.grad.shape))
            for n, p in self.named_parameters()
            if p.grad is not None
        }
        for callback in watchers:
            if callback.last is not None:
                self.record["measured"][callback.spec.norm_type][step] = dict(callback.last.metrics)


def main(scenario: str, out_dir: str) -> None:
    install_collective_counters()
    pl.seed_everything(0, verbose=False)
    updates = scenario.endswith("_updates")
    scenario = scenario.replace("_updates", "")
    fsdp = scenario == "fsdp2"
    if fsdp:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy: Any = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strategy = CpuHookDDP(ddp_comm_hook=user_hook) if scenario == "gns" else "ddp"
    norm_types = ("l2",) if scenario == "gns" or updates else NORM_TYPES
    model = Recorder(fsdp=fsdp, updates=updates)
    every = Rule("update_ratio_total", max=0.0, action="warn", name="every")
    recording = RecordingLogger()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_steps=MAX_STEPS,
        accumulate_grad_batches=1 if fsdp else ACCUMULATE,
        callbacks=[
            GradientFlowCallback(
                log_every_n_steps=LOG_EVERY,
                norm_type=norm_type,
                log_param_norms=True,
                rules=[every] if updates else [],
                noise_scale=scenario == "gns",
                log_updates=updates,
            )
            for norm_type in norm_types
        ],
        logger=[CSVLogger(out_dir, name="csv", version=0), recording],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out_dir,
    )
    trainer.fit(model)
    record = {key: dict(value) for key, value in model.record.items()}
    record["collectives"] = dict(_collectives["counts"])
    record["logged"] = recording.calls
    record["world_size"] = trainer.world_size
    record["user_hook_calls"] = _user_hook_calls[0]
    watchers = [c for c in trainer.callbacks if isinstance(c, GradientFlowCallback)]  # type: ignore[attr-defined]
    record["alerts"] = [(a.step, a.metric, a.action, a.value) for a in watchers[0].alerts]
    torch.save(record, Path(out_dir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
