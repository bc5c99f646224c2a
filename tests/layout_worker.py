"""Script for the 2-D layout and multi-node tests: ``python tests/layout_worker.py SCENARIO OUT_DIR``.

Scenarios (``BlockNet(block="mlp")``: blocks ``norm(x + down(tanh(up(x))))``):

* ``tp``: 4 CPU processes, ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)``;
  each block's ``up``/``down`` column-/row-wise parallel on the TP mesh, then ``fully_shard`` on the
  data-parallel mesh. The L2 callback also clips every step (to ``CLIP_TO``) and halts at the last
  step (patience).
* ``hsdp``: 4 CPU processes, ``ModelParallelStrategy(data_parallel_size=4)``, ``fully_shard`` on a
  ``(replicate=2, shard=2)`` mesh built in ``configure_model``.
* ``nodes``: one of two simulated nodes (``NODE_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` from the
  environment), ``Trainer(num_nodes=2, devices=1, strategy="ddp")``; its logger writes under
  ``OUT_DIR/node<NODE_RANK>``.
* ``tp_updates``, ``hsdp_updates``: the layouts of ``tp`` and ``hsdp`` with AdamW and one L2
  callback with ``log_updates=True`` and a warn rule on ``update_ratio/blocks.0`` that trips at every
  measured step; each rank also saves ``after[step]`` and ``state[step]`` (the full weights and
  AdamW's full state after a measured step), ``updates[step]`` (``last_updates.metrics``).

Every scenario uses the same global batch of ``GLOBAL_BATCH`` samples per step, four callbacks (one
per norm type, ``log_param_norms=True``) and, on the L2 one, a warn rule that trips every step (its
alert values are the every-step ``grad_norm_total``). Each rank saves ``rank<r>.pt``:

* ``weights[step]`` / ``batches[step]``: full weights and this rank's batch at measured steps;
* ``grads[step]``: ``full_tensor()`` of every gradient *before* the callbacks act (every step);
* ``shapes``: this rank's local shape of each gradient;
* ``clipped[step]``: the same after them (what the optimizer gets);
* ``measured[norm_type][step]``: each callback's ``last.metrics``;
* ``alerts``, ``halted``, ``dp_rank``, ``collectives[step]``: ``all_gather`` calls by the package.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_worker import NORM_TYPES, full, local_shape
from models import BlockNet
from update_reference import adam_state

import lightning_gradwatch.measure.reduction as distributed
from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.measure.probe import _local_values

DEPTH, WIDTH, GLOBAL_BATCH = 3, 8, 16
LOG_EVERY, MAX_STEPS = 2, 4
CLIP_TO = 1e-3
#: The number of processes of each scenario (``nodes``: per node) and its data-parallel size.
PROCESSES = {"tp": 4, "hsdp": 4, "nodes": 1}
DATA_PARALLEL = {"tp": 2, "hsdp": 4, "nodes": 2}
_window: dict[str, Any] = {"step": None, "counts": defaultdict(int)}


def count_package_gathers() -> None:
    """Count the package's own ``all_gather`` calls per optimizer step."""
    original = distributed._all_gather

    def counted(tensor: Tensor, group: Any) -> Tensor:
        if _window["step"] is not None:
            _window["counts"][_window["step"]] += 1
        return original(tensor, group)

    distributed._all_gather = counted  # type: ignore[assignment]


class FullGradients(Callback):
    """First in the callback list: the full gradients before any gradwatch callback acts on them."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, Tensor]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        if not self.shapes:  # this rank's share of each gradient
            self.shapes = {
                n: local_shape(p.grad)
                for n, p in pl_module.named_parameters()
                if p.grad is not None
            }
        self.grads[trainer.global_step] = {
            n: full(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None
        }


class LayoutNet(BlockNet):
    def __init__(self, scenario: str, updates: bool = False) -> None:
        batch = GLOBAL_BATCH // DATA_PARALLEL[scenario]
        super().__init__(depth=DEPTH, width=WIDTH, n_samples=128, batch_size=batch, block="mlp")
        self.scenario, self.updates = scenario, updates
        self.record: dict[str, Any] = {
            key: defaultdict(dict) if key == "measured" else {}
            for key in ("weights", "batches", "clipped", "measured", "after", "state", "updates")
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.updates:  # eps 1e-3: some elements have sqrt(v_hat) below it
            return torch.optim.AdamW(self.parameters(), lr=0.01, eps=1e-3)
        return super().configure_optimizers()

    def configure_model(self) -> None:
        if self.scenario not in ("tp", "hsdp"):  # "nodes": plain DDP, which any torch has
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        if self.scenario == "tp":
            plan = {"up": ColwiseParallel(), "down": RowwiseParallel()}
            for block in self.blocks:
                parallelize_module(block, self.device_mesh["tensor_parallel"], plan)
            mesh = self.device_mesh["data_parallel"]
        else:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for block in self.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step = _window["step"] = self.trainer.global_step
        if step % LOG_EVERY == 0:
            self.record["weights"][step] = {n: full(p) for n, p in self.named_parameters()}
            self.record["batches"][step] = [(batch[0].clone(), batch[1].clone())]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, _window["step"] = _window["step"], None
        if self.updates and step % LOG_EVERY == 0:
            named = dict(self.named_parameters())
            self.record["after"][step] = {n: full(p) for n, p in named.items()}
            self.record["state"][step] = adam_state(self.optimizers(), named, full)
            [watcher] = [c for c in self.trainer.callbacks if isinstance(c, GradientFlowCallback)]  # type: ignore[attr-defined]
            self.record["updates"][step] = dict(watcher.last_updates.metrics)  # type: ignore[union-attr]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # After every callback's hook: their measurement and actions of this step are done.
        step = self.trainer.global_step
        self.record["clipped"][step] = {
            n: full(p.grad) for n, p in self.named_parameters() if p.grad is not None
        }
        for callback in self.trainer.callbacks:  # type: ignore[attr-defined]
            if (
                isinstance(callback, GradientFlowCallback)
                and step % LOG_EVERY == 0
                and callback.last
            ):
                metrics = dict(callback.last.metrics)  # type: ignore[union-attr]
                self.record["measured"][callback.norm_type][step] = metrics


def placement_cases(mesh: Any) -> dict[str, Any]:
    """``param_partials`` of DTensors in layouts FSDP2 and TP do not produce here (pending sums, a
    split over both dims, uneven and empty shards), with their ``full_tensor()`` references."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    generator = torch.Generator().manual_seed(1 + dist.get_rank())  # different values per rank
    cases = [
        ((Shard(0), Shard(1)), (3, 4)),
        ((Shard(1), Partial()), (2, 3)),
        ((Partial(), Replicate()), (5,)),
    ]
    grads = []
    for placements, shape in cases:
        local = torch.randn(*shape, generator=generator)
        grads.append(DTensor.from_local(local, mesh, placements, run_check=False))
    # (1,) split over the TP ranks: the second one holds an empty shard.
    empty = mesh.get_local_rank("tensor_parallel") > 0
    local = torch.randn(0 if empty else 1, generator=torch.Generator().manual_seed(7))
    grads.append(DTensor.from_local(local, mesh, (Replicate(), Shard(0)), shape=(1,), stride=(1,)))
    record: dict[str, Any] = {"full": [g.full_tensor() for g in grads], "partials": {}}
    # As block-output gradients: what the probe measures of them (a pending sum: the full value).
    record["block_values"] = [(_local_values(g), g.to_local()) for g in grads[:3]]
    for norm_type in NORM_TYPES:
        partials, stats = distributed.param_partials(
            grads, norm_type, stats=True, large_threshold=1.0, assume_finite=False
        )
        record["partials"][norm_type] = partials.tolist()
        record["stats"] = stats.tolist()  # type: ignore[union-attr]
    return record


def callbacks(scenario: str, updates: bool = False) -> list[Callback]:
    if updates:
        ratio = Rule("update_ratio/blocks.0", max=0.0, action="warn", name="ratio")
        return [
            FullGradients(),
            GradientFlowCallback(log_every_n_steps=LOG_EVERY, log_updates=True, rules=[ratio]),
        ]
    every_step = Rule("grad_norm_total", max=0.0, action="warn", name="every_step")
    rules = [every_step]
    if scenario == "tp":
        rules += [
            Rule("grad_norm_total", max=0.0, action="clip", clip_to=CLIP_TO, name="clip"),
            Rule("grad_norm_total", max=0.0, patience=MAX_STEPS, action="halt", name="halt"),
        ]
    watchers = [
        GradientFlowCallback(
            log_every_n_steps=LOG_EVERY,
            norm_type=norm_type,
            log_param_norms=True,
            rules=rules if norm_type == "l2" else [],
        )
        for norm_type in NORM_TYPES
    ]
    # The L2 callback, which clips, last: the others measure the gradients before the clip.
    return [FullGradients(), *watchers[1:], watchers[0]]


def main(scenario: str, out_dir: str) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    count_package_gathers()
    pl.seed_everything(0, verbose=False)
    updates = scenario.endswith("_updates")
    scenario = scenario.replace("_updates", "")
    strategy: Any = "ddp"
    if scenario != "nodes":
        strategy = ModelParallelStrategy(
            data_parallel_size=DATA_PARALLEL[scenario],
            tensor_parallel_size=PROCESSES[scenario] // DATA_PARALLEL[scenario],
        )
    log_dir = Path(out_dir) / f"node{os.environ.get('NODE_RANK', 0)}"
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=PROCESSES[scenario],
        num_nodes=2 if scenario == "nodes" else 1,
        strategy=strategy,
        max_steps=MAX_STEPS,
        callbacks=callbacks(scenario, updates),
        logger=CSVLogger(log_dir, name="csv", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=log_dir,
    )
    model = LayoutNet(scenario, updates)
    trainer.fit(model)
    watchers = [c for c in trainer.callbacks if isinstance(c, GradientFlowCallback)]  # type: ignore[attr-defined]
    record = {key: dict(value) for key, value in model.record.items()}
    record["grads"] = trainer.callbacks[0].grads  # type: ignore[attr-defined]
    record["shapes"] = trainer.callbacks[0].shapes  # type: ignore[attr-defined]
    record["alerts"] = [(a.step, a.rule, a.action, a.value) for c in watchers for a in c.alerts]
    record["alert_keys"] = [a.metric for c in watchers for a in c.alerts]
    record["halted"] = [(c.norm_type, c.halted) for c in watchers]
    record["global_step"] = trainer.global_step
    record["dp_rank"] = trainer.strategy.distributed_sampler_kwargs["rank"]  # type: ignore[attr-defined]
    record["collectives"] = dict(_window["counts"])
    if scenario == "tp":
        record["placements"] = placement_cases(model.device_mesh)
    torch.save(record, Path(out_dir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
