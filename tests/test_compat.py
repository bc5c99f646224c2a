"""Every private Lightning / torch internal in :mod:`lightning_gradwatch._compat` still exists and
behaves as relied on under the installed versions.

A failure names the internal and the versions: a new torch or Lightning release moved or changed it,
and ``lightning_gradwatch/_compat.py`` needs a new branch for that version.
"""

from __future__ import annotations

import collections
import inspect
import math
import uuid
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_gradwatch import _compat

VERSIONS = f"torch {torch.__version__}, lightning {lightning.__version__}"


def broken(internal: str, what: str) -> str:
    """The failure message: which internal, what changed, under which versions, what to do."""
    return (
        f"{internal}: {what} under {VERSIONS}. A torch/Lightning upgrade moved or changed this "
        "private internal; adapt lightning_gradwatch/_compat.py for this version."
    )


def test_foreach_norm_matches_vector_norm() -> None:
    tensors = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 2)]
    assert hasattr(torch, "_foreach_norm"), broken("torch._foreach_norm", "missing")
    for ord in (1.0, 2.0, math.inf):
        got = torch.stack(list(_compat.foreach_norm(tensors, ord)))
        want = torch.stack([torch.linalg.vector_norm(t, ord) for t in tensors])
        assert torch.allclose(got, want), broken(
            "torch._foreach_norm", f"ord={ord} no longer gives each tensor's norm"
        )


def test_foreach_norm_accumulates_half_precision_in_float32() -> None:
    # 300 elements of 100 in fp16: the sum of squares (3e6) overflows fp16 (max 65504).
    tensors = [torch.full((300,), 100.0, dtype=torch.float16)]
    (norm,) = _compat.foreach_norm(tensors, 2.0, dtype=torch.float32)
    assert norm.dtype == torch.float32, broken("torch._foreach_norm(dtype=)", "ignores dtype")
    assert torch.isclose(norm, torch.tensor(100.0 * math.sqrt(300))), broken(
        "torch._foreach_norm(dtype=)", f"gave {norm.item()} for a norm of 1732.05"
    )


def test_foreach_mul_scales_in_place() -> None:
    tensors = [torch.ones(3), torch.full((2, 2), 2.0)]
    _compat.foreach_mul_(tensors, 0.5)
    assert torch.equal(tensors[0], torch.full((3,), 0.5)) and torch.equal(
        tensors[1], torch.ones(2, 2)
    ), broken("torch._foreach_mul_", "no longer multiplies in place")


def test_flatten_dense_tensors_is_a_fresh_concatenation() -> None:
    a, b = torch.arange(6.0).reshape(2, 3), torch.arange(6.0, 8.0)
    flat = _compat.flatten_dense_tensors([a, b])
    assert torch.equal(flat, torch.arange(8.0)), broken(
        "torch._utils._flatten_dense_tensors", f"returned {flat} for arange(8) in two pieces"
    )
    flat.zero_()
    assert a.sum() == 15, broken(
        "torch._utils._flatten_dense_tensors", "returned a view, not a copy"
    )


def test_compiled_module_prefixes_parameter_names() -> None:
    compiled = torch.compile(nn.Linear(2, 2))  # lazy: nothing is compiled before the first call
    names = [name for name, _ in compiled.named_parameters()]
    assert names == [
        f"{_compat.COMPILED_MODULE_ATTR}.weight",
        f"{_compat.COMPILED_MODULE_ATTR}.bias",
    ], broken("OptimizedModule._orig_mod", f"compiled parameter names are now {names}")


def test_compiled_modules_are_recognised() -> None:
    from lightning.pytorch.utilities.compile import from_compiled

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2), torch.compile(nn.Linear(2, 2))])

    plain = pl.LightningModule()
    assert not _compat.is_compiled(plain)
    assert _compat.is_compiled(Net()), broken(
        "OptimizedModule._orig_mod", "not seen on a submodule"
    )
    # What Trainer.fit(torch.compile(model)) does: unwrap, and mark the module.
    unwrapped = from_compiled(torch.compile(pl.LightningModule()))
    assert _compat.is_compiled(unwrapped), broken(
        "LightningModule._compiler_ctx",
        "not set by lightning.pytorch.utilities.compile.from_compiled",
    )


def test_fused_optimizers_unscale_in_step() -> None:
    # The flag GradScaler.step reads to leave unscaling to the optimizer.
    source = inspect.getsource(torch.amp.GradScaler.step)
    assert "_step_supports_amp_scaling" in source, broken(
        "optimizer._step_supports_amp_scaling", "GradScaler.step no longer reads it"
    )
    params = [nn.Parameter(torch.ones(2))]
    assert not _compat.optimizer_unscales_in_step(torch.optim.SGD(params, lr=0.1))
    try:
        fused = torch.optim.AdamW(params, fused=True)
    except RuntimeError:  # fused optimizers need CUDA on older torch: the source check stands
        return
    assert _compat.optimizer_unscales_in_step(fused), broken(
        "optimizer._step_supports_amp_scaling", "not set on AdamW(fused=True)"
    )


def test_grad_scaler_scale_is_a_tensor() -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(torch.ones(()))  # the scale tensor is created lazily, on the first scale()
    scale = _compat.grad_scaler_scale(scaler)
    assert isinstance(scale, torch.Tensor) and scale.item() == 1024.0, broken(
        "GradScaler._scale", f"is {scale!r} after scale() with init_scale=1024"
    )


@pytest.mark.parametrize("prefix", ["", "train"])
def test_tensorboard_single_event_matches_log_metrics(tmp_path: Path, prefix: str) -> None:
    """Keys written through the file writer are those ``log_metrics`` writes, prefix included."""
    logger = TensorBoardLogger(tmp_path, name="", version=0, prefix=prefix)
    logger.log_metrics({"a": 1.0}, step=0)
    prefixed = _compat.tensorboard_prefixed(logger, {"b": 2.0})
    want = {f"{prefix}-b" if prefix else "b": 2.0}
    assert dict(prefixed) == want, broken(
        "lightning.fabric.utilities.logger._add_prefix / TensorBoardLogger._prefix",
        f"gave {dict(prefixed)} instead of {want}",
    )
    from tensorboard.compat.proto.summary_pb2 import Summary

    values = [Summary.Value(tag=k, simple_value=v) for k, v in prefixed.items()]
    _compat.summary_file_writer(logger.experiment).add_summary(Summary(value=values), 1)
    logger.experiment.close()
    _compat.summary_file_writer(logger.experiment)  # reopens after close()
    logger.experiment.close()
    tags = EventAccumulator(logger.log_dir).Reload().Tags()["scalars"]
    assert sorted(tags) == sorted([f"{prefix}-a" if prefix else "a", *want]), broken(
        "SummaryWriter._get_file_writer", f"TensorBoard read back {tags}"
    )


def test_trainer_results_and_dynamo_counters_used_by_benchmark_and_tests() -> None:
    """Not used by the package: the benchmark resets ``trainer._results`` between variants, and the
    compile tests count graph breaks in ``torch._dynamo.utils.counters``."""
    assert isinstance(inspect.getattr_static(pl.Trainer, "_results", None), property), broken(
        "Trainer._results", "is no longer a property"
    )
    from torch._dynamo.utils import counters

    assert isinstance(counters["graph_break"], collections.Counter), broken(
        "torch._dynamo.utils.counters", "['graph_break'] is no longer a Counter"
    )


# torch 2.3.1's distribute_tensor warns about its random operators on a CPU mesh (none are used).
@pytest.mark.filterwarnings("ignore:DTensor random operators may not have complete support")
def test_dtensor_shim_is_torchs_dtensor_and_replicate(tmp_path: Path) -> None:
    """``DTENSOR_TYPES`` holds the class of a real DTensor and ``replicate_placement()`` is a placement
    it redistributes to; the private ``torch.distributed._tensor`` serves only torch < 2.5, which has
    no public ``torch.distributed.tensor.DTensor`` (torch 2.3.1, the floor, imported it and failed)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    api = _compat._DTENSOR_API
    assert api is not None, broken("torch.distributed", "not available")
    assert api.__name__ == "torch.distributed.tensor" or (
        api.__name__ == "torch.distributed._tensor" and _compat.torch_older_than("2.5")
    ), broken("torch.distributed.tensor.DTensor", f"taken from {api.__name__}")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = api.distribute_tensor(torch.arange(4.0), mesh, [api.Shard(0)])
        assert isinstance(sharded, _compat.DTENSOR_TYPES), broken(
            "DTensor", f"a distributed tensor is a {type(sharded)}"
        )
        assert not isinstance(torch.arange(4.0), _compat.DTENSOR_TYPES)
        copy = sharded.redistribute(mesh, [_compat.replicate_placement()])
        assert copy.placements[0].is_replicate() and not copy.placements[0].is_partial(), broken(
            "Replicate", f"redistributing to it gave {copy.placements}"
        )
        assert torch.equal(copy.to_local(), torch.arange(4.0))
    finally:
        dist.destroy_process_group()


def test_ddp_strategy_registers_the_comm_hook_it_holds() -> None:
    """The user's ``DDPStrategy(ddp_comm_hook=)`` is read from, and replaced in, the attribute that
    strategy setup passes to ``register_comm_hook`` (on CUDA; tests/dist_worker.py does it on CPU)."""
    from lightning.pytorch.strategies import DDPStrategy

    def user(state: Any, bucket: Any) -> Any:
        return bucket

    def wrapped(state: Any, bucket: Any) -> Any:
        return user(state, bucket)

    strategy = DDPStrategy(ddp_comm_hook=user)
    assert _compat.user_ddp_comm_hook(strategy) is user, broken(
        "DDPStrategy._ddp_comm_hook", "does not hold ddp_comm_hook="
    )
    assert _compat.user_ddp_comm_hook(DDPStrategy()) is None
    _compat.set_user_ddp_comm_hook(strategy, wrapped)
    assert _compat.user_ddp_comm_hook(strategy) is wrapped
    source = inspect.getsource(DDPStrategy._register_ddp_hooks)
    assert "ddp_comm_hook=self._ddp_comm_hook" in source, broken(
        "DDPStrategy._ddp_comm_hook", "is no longer what _register_ddp_hooks registers"
    )


def test_append_line_creates_a_missing_file_on_this_fsspec() -> None:
    """``files.append_line`` on fsspec's memory filesystem (the alert trail of a ``memory://`` run):
    a missing file is created, then appended to. fsspec 2025.12.0 and older refuse mode ``"a"`` on
    a missing file there; ``files._open_to_append`` creates it instead."""
    import fsspec

    from lightning_gradwatch import files

    folder = f"memory://gradwatch-compat-{uuid.uuid4().hex}"
    try:
        files.append_line(f"{folder}/trail.jsonl", "one")
        files.append_line(f"{folder}/trail.jsonl", "two")
        fs, inner = files.filesystem(f"{folder}/trail.jsonl")
        assert fs.cat_file(inner) == b"one\ntwo\n", broken(
            f"fsspec {fsspec.__version__} memory filesystem", f"holds {fs.cat_file(inner)!r}"
        )
    finally:
        fsspec.filesystem("memory").rm(folder.split("://")[1], recursive=True)
