"""The strategy contract, checked against a reference that shares nothing with the callback or the
other strategy tests: a plain PyTorch loop (``retain_grad`` on every block output, a hand-written SGD
update) on the *global* batch of each optimizer step, fp32, one process.

Every run here uses the callback's defaults besides the interval (so the default ``nonfinite`` rule
and its per-step check run too), ``log_param_norms=True`` and one callback per norm type; the
figures compared are those the loggers received (``metrics.csv``).

* DDP: ``strategy="ddp_spawn"`` (2 CPU processes over gloo, in this process), FSDP2:
  ``ModelParallelStrategy`` + ``fully_shard`` (2 CPU processes, this file is its own launcher
  script). Each rank reads its own interleaved share of the data (``use_distributed_sampler=False``),
  so the global batch is known here; both use ``accumulate_grad_batches=2`` and
  ``log_every_n_steps=2``.
* torch.compile of each block separately (``torch.compile(block)`` wrappers): same keys and
  values as eager, no graph break; the whole model compiled with gradient accumulation.
* Activation checkpointing over several blocks at once (``checkpoint_sequential``, multi-block
  segments), reentrant and not.
* ``16-mixed`` with a real GradScaler and gradient accumulation.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import MixedPrecision
from models import BlockNet, fully_shard_blocks
from parallel import assert_figures_equal, assert_full_gradient_norms
from reference import ref_metrics, ref_norm, trainer
from torch import Tensor, nn
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint, checkpoint_sequential
from torch.utils.data import DataLoader, TensorDataset
from torch_features import needs_compile_without_graph_breaks, needs_fsdp2_on_cpu

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch.probe import CALLS

NORM_TYPES = ("l2", "l1", "linf", "mean")
DEPTH, WIDTH, LR = 4, 8, 0.05
MICRO, ACCUMULATE, LOG_EVERY, MAX_STEPS = 4, 2, 2, 3
MEASURED = (0, 2)
BLOCKS = [f"blocks.{i}" for i in range(DEPTH)]
ROOT = Path(__file__).resolve().parent.parent


def dataset() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(96, 4, generator=generator)
    return x, x.sum(dim=1, keepdim=True).sin()


class ShardedDataNet(BlockNet):
    """``BlockNet`` whose rank ``r`` of ``W`` trains on samples ``r, r + W, ...`` in order."""

    def __init__(self, fsdp: bool = False) -> None:
        super().__init__(depth=DEPTH, width=WIDTH, lr=LR, batch_size=MICRO)
        self.fsdp = fsdp
        self.record: dict[str, Any] = {"weights": None, "grads": {}, "shapes": {}}

    def train_dataloader(self) -> DataLoader:
        x, y = dataset()
        rank, world = self.global_rank, self.trainer.world_size
        return DataLoader(TensorDataset(x[rank::world], y[rank::world]), batch_size=MICRO)

    def configure_model(self) -> None:
        if self.fsdp:
            fully_shard_blocks(self)

    def on_train_start(self) -> None:
        self.record["weights"] = {n: _full(p) for n, p in self.named_parameters()}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        step = self.trainer.global_step
        if step in MEASURED:
            grads = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
            self.record["grads"][step] = {n: _full(g) for n, g in grads}
            self.record["shapes"][step] = {n: (_local(g).shape, g.shape) for n, g in grads}


def _full(tensor: Tensor) -> Tensor:
    full_tensor = getattr(tensor, "full_tensor", None)
    return (full_tensor() if callable(full_tensor) else tensor).detach().clone()


def _local(tensor: Tensor) -> Tensor:
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def watchers(**kwargs: Any) -> list[GradientFlowCallback]:
    return [
        GradientFlowCallback(
            log_every_n_steps=LOG_EVERY, norm_type=norm_type, log_param_norms=True, **kwargs
        )
        for norm_type in NORM_TYPES
    ]


def fit_kwargs(out: Path) -> dict[str, Any]:
    return {
        "accelerator": "cpu",
        "devices": 2,
        "max_steps": MAX_STEPS,
        "accumulate_grad_batches": ACCUMULATE,
        "use_distributed_sampler": False,
        "logger": CSVLogger(str(out), name="csv", version=0),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": str(out),
    }


def logged_rows(out: Path) -> list[tuple[int, dict[str, float]]]:
    """Every ``log_metrics`` call that carried block figures, in order: ``(step, metrics)``."""
    with open(out / "csv" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("grad_norm/blocks.0")]
    return [
        (int(row.pop("step")), {k: float(v) for k, v in row.items() if v != ""}) for row in rows
    ]


def plain_reference(
    weights: dict[str, Tensor], world: int
) -> dict[int, tuple[list[Tensor], dict[str, Tensor]]]:
    """Block-output and parameter gradients of one fp32 process on each measured step's global
    batch (every micro-batch of every rank), following the same SGD updates."""
    model = BlockNet(depth=DEPTH, width=WIDTH)
    model.load_state_dict(weights)
    x, y = dataset()
    shards = [(x[r::world], y[r::world]) for r in range(world)]
    found: dict[int, tuple[list[Tensor], dict[str, Tensor]]] = {}
    for step in range(max(MEASURED) + 1):
        start = step * ACCUMULATE * MICRO
        xb = torch.cat([sx[start : start + ACCUMULATE * MICRO] for sx, _ in shards])
        yb = torch.cat([sy[start : start + ACCUMULATE * MICRO] for _, sy in shards])
        model.zero_grad()
        h, outputs = model.stem(xb), []
        for block in model.blocks:
            h = block(h)
            h.retain_grad()
            outputs.append(h)
        nn.functional.mse_loss(model.head(h), yb).backward()
        if step in MEASURED:
            found[step] = (
                [o.grad.clone() for o in outputs],  # type: ignore[union-attr]
                {n: p.grad.clone() for n, p in model.named_parameters()},  # type: ignore[union-attr]
            )
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad  # type: ignore[operator]
    return found


def assert_logged_like_reference(out: Path, weights: dict[str, Tensor], world: int) -> None:
    rows = logged_rows(out)
    # Rank 0 alone wrote, once per callback (in order) and measured optimizer step.
    assert [step for step, _ in rows] == [step for step in MEASURED for _ in NORM_TYPES]
    reference = plain_reference(weights, world)
    for index, (step, logged) in enumerate(rows):
        block_grads, param_grads = reference[step]
        norm_type = NORM_TYPES[index % len(NORM_TYPES)]
        expected = ref_metrics(
            BLOCKS, block_grads, param_grads, norm_type, param_keys=list(param_grads)
        )
        assert_figures_equal(logged, expected, rel=1e-4)


def test_ddp_spawn_logs_the_single_process_figures_of_the_global_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ddp_spawn sets MASTER_PORT in this process: undo it afterwards for the tests that follow.
    monkeypatch.setenv("MASTER_PORT", str(find_free_network_port()))
    torch.manual_seed(0)
    model = ShardedDataNet()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    fit = pl.Trainer(callbacks=watchers(), strategy="ddp_spawn", **fit_kwargs(tmp_path))
    fit.fit(model)
    assert_logged_like_reference(tmp_path, weights, world=2)
    # Rank 0's own share (the first ACCUMULATE * MICRO rows of the global batch) would not do.
    block0 = plain_reference(weights, world=2)[0][0][0]
    (_, first), *_ = logged_rows(tmp_path)  # the l2 callback at step 0
    share = ref_norm(block0[: ACCUMULATE * MICRO], "l2")
    assert first["grad_norm/blocks.0"] == pytest.approx(ref_norm(block0, "l2"), rel=1e-4)
    assert first["grad_norm/blocks.0"] > 1.05 * share


def fsdp2_worker(out: Path) -> None:
    """Run by the FSDP2 test (``python this_file fsdp2 OUT``) and, through Lightning's launcher,
    again for rank 1."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.manual_seed(0)
    model = ShardedDataNet(fsdp=True)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    fit = pl.Trainer(callbacks=watchers(), strategy=strategy, **fit_kwargs(out))
    fit.fit(model)
    record = {**model.record, "global_step": fit.global_step}
    torch.save(record, out / f"rank{fit.global_rank}.pt")


@needs_fsdp2_on_cpu
def test_fsdp2_logs_full_gradient_norms_and_global_batch_figures(tmp_path: Path) -> None:
    process = subprocess.run(
        [sys.executable, __file__, "fsdp2", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["global_step"] == rank1["global_step"] == MAX_STEPS
    local, full = rank0["shapes"][0]["blocks.0.linear.weight"]
    assert tuple(local) == (WIDTH // 2, WIDTH) and tuple(full) == (WIDTH, WIDTH)  # real shards
    assert_logged_like_reference(tmp_path, rank0["weights"], world=2)
    # The per-parameter and total norms are those of full_tensor() in the module's own hook.
    for index, (step, logged) in enumerate(logged_rows(tmp_path)):
        norm_type = NORM_TYPES[index % len(NORM_TYPES)]
        assert_full_gradient_norms(logged, rank0["grads"][step], norm_type)


# -- torch.compile ---------------------------------------------------------------------------------


class CompiledBlocksNet(BlockNet):
    """Each block wrapped by ``torch.compile`` (an ``OptimizedModule``) when ``compiled``."""

    def __init__(self, compiled: bool) -> None:
        torch.manual_seed(0)
        super().__init__(depth=3, width=8)
        if compiled:
            self.blocks = nn.ModuleList(torch.compile(b, backend="aot_eager") for b in self.blocks)


def _graph_breaks() -> dict[str, int]:
    return {**counters["graph_break"], **counters["unimplemented"]}


def _fit_csv(tmp_path: Path, model: Any, **kwargs: Any) -> dict[int, dict[str, float]]:
    callback = GradientFlowCallback(log_every_n_steps=2, log_param_norms=True)
    trainer(tmp_path, [callback], max_steps=4, **kwargs).fit(model)
    return dict(logged_rows(tmp_path))


def assert_same_figures(compiled: dict[int, dict[str, float]], eager: dict[int, Any]) -> None:
    assert sorted(compiled) == sorted(eager) == [0, 2]
    for step, metrics in eager.items():
        assert sorted(compiled[step]) == sorted(metrics)  # the same keys
        for key, value in metrics.items():
            assert compiled[step][key] == pytest.approx(value, rel=1e-4, abs=1e-9), key


def test_separately_compiled_blocks_log_the_eager_keys_and_values(tmp_path: Path) -> None:
    eager = _fit_csv(tmp_path / "eager", CompiledBlocksNet(compiled=False))
    torch._dynamo.reset()
    counters.clear()
    model = CompiledBlocksNet(compiled=True)
    compiled = _fit_csv(tmp_path / "compiled", model)
    assert counters["stats"]["unique_graphs"] >= 1 and _graph_breaks() == {}
    assert not any("_orig_mod" in key for key in compiled[0])  # e.g. grad_param_norm/blocks.0.*
    assert "grad_param_norm/blocks.0.linear.weight" in compiled[0]
    assert_same_figures(compiled, eager)


@needs_compile_without_graph_breaks
def test_compiled_model_with_accumulation_measures_like_eager(tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = _fit_csv(tmp_path / "eager", BlockNet(depth=3, width=8), accumulate_grad_batches=2)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.compile(BlockNet(depth=3, width=8), backend="aot_eager")
    compiled = _fit_csv(tmp_path / "compiled", model, accumulate_grad_batches=2)
    assert counters["stats"]["unique_graphs"] >= 1 and _graph_breaks() == {}
    assert_same_figures(compiled, eager)


# -- activation checkpointing ----------------------------------------------------------------------


class SegmentCheckpointNet(BlockNet):
    """Checkpoints several blocks at once: ``"sequential"`` (``checkpoint_sequential`` in 2
    segments), ``"pairs"`` (one ``checkpoint`` around blocks 0-1 and one around 2-3), or none."""

    def __init__(self, mode: Any = None, reentrant: bool = True) -> None:
        torch.manual_seed(0)
        super().__init__(depth=4, width=8)
        self.mode, self.reentrant = mode, reentrant
        self.calls: dict[int, list[float]] = {}

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        blocks = self.blocks
        if self.mode == "sequential":
            h = checkpoint_sequential(blocks, 2, h, use_reentrant=self.reentrant)
        elif self.mode == "pairs":
            for i in (0, 2):
                pair = nn.Sequential(blocks[i], blocks[i + 1])
                h = checkpoint(pair, h, use_reentrant=self.reentrant)
        else:
            for block in blocks:
                h = block(h)
        return self.head(h)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        probe = self.trainer.callbacks[0]._probe  # type: ignore[attr-defined]
        self.calls[self.trainer.global_step] = probe.buffer[:, CALLS].tolist()


def _fit_last(tmp_path: Path, model: SegmentCheckpointNet) -> dict[str, float]:
    callback = GradientFlowCallback(log_every_n_steps=1, log_param_norms=True)
    trainer(tmp_path, [callback], max_steps=2, accumulate_grad_batches=2).fit(model)
    assert callback.last is not None and callback.last.step == 1
    return callback.last.metrics


@pytest.mark.parametrize("mode", ["sequential", "pairs"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpointed_segments_measure_each_block_once(
    tmp_path: Path, mode: str, reentrant: bool
) -> None:
    plain = _fit_last(tmp_path / "plain", SegmentCheckpointNet())
    model = SegmentCheckpointNet(mode, reentrant)
    measured = _fit_last(tmp_path / "checkpointed", model)
    # One tensor-hook call per block and micro-batch (2 per step), not one more per recomputation.
    assert model.calls == {0: [2.0] * 4, 1: [2.0] * 4}
    # A second measurement of any block would change its L2 norm by sqrt(2).
    for key, value in plain.items():
        assert measured[key] == pytest.approx(value, rel=1e-6, abs=1e-12, nan_ok=True), key


# -- AMP with a real GradScaler and gradient accumulation ------------------------------------------


class MicroBatchRecorder(BlockNet):
    """Keeps ``retain_grad`` copies of every block output of every micro-batch of each step."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(depth=4, width=8)
        self._outputs: list[list[Tensor]] = []
        self.refs: dict[int, dict[str, Any]] = {}

    def forward(self, x: Tensor) -> Tensor:
        h = self.stem(x)
        outputs = []
        for block in self.blocks:
            h = block(h)
            h.retain_grad()
            outputs.append(h)
        self._outputs.append(outputs)
        return self.head(h)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        per_block = zip(*[[o.grad.clone() for o in outs] for outs in self._outputs])  # type: ignore[union-attr]
        self.refs[self.trainer.global_step] = {
            "blocks": [list(grads) for grads in per_block],
            "params": {n: p.grad.clone() for n, p in self.named_parameters()},  # type: ignore[union-attr]
            "micro_batches": len(self._outputs),
        }
        self._outputs = []


def test_16_mixed_scaler_with_accumulation_combines_unscaled_micro_batches(
    tmp_path: Path,
) -> None:
    scale = 2.0**10
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    model = MicroBatchRecorder()
    callback = GradientFlowCallback(log_every_n_steps=1, log_param_norms=True)
    fit = trainer(
        tmp_path,
        [callback],
        max_steps=1,
        accumulate_grad_batches=3,
        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)],
    )
    fit.fit(model)
    assert fit.precision_plugin.scaler.get_scale() == scale  # no overflow: the step was taken
    ref = model.refs[0]
    assert ref["micro_batches"] == 3 and ref["blocks"][0][0].dtype == torch.float16
    # Block b's reference: the unscaled gradients of all three micro-batches as one vector.
    blocks = [torch.cat([g.double().reshape(-1) / scale for g in grads]) for grads in ref["blocks"]]
    params = ref["params"]
    expected = ref_metrics(BLOCKS, blocks, params, param_keys=list(params))
    assert_figures_equal(callback.last.metrics, expected, rel=1e-5)  # type: ignore[union-attr]


if __name__ == "__main__":
    if sys.argv[1] == "fsdp2":
        fsdp2_worker(Path(sys.argv[2]))
