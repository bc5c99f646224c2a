"""FSDP2 (``ModelParallelStrategy`` + ``fully_shard``, 2 CPU processes over gloo) and the strategy check.

Parameter gradients are DTensor shards; the callback must report the norms of the *full* gradients
(reference: ``full_tensor()`` of each gradient in the module's own ``on_before_optimizer_step``) and
block-output figures equal to one process on the global batch. FSDP1 and DeepSpeed, where ``p.grad``
is not the gradient, must say so at fit start and leave the parameter figures out.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from dist_worker import DEPTH, NORM_TYPES
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from global_batch import MAX_STEPS, ROOT, SCRIPT, WIDTH, assert_logged_like_reference, logged_rows
from lightning.pytorch.plugins import Precision
from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy
from models import BlockNet
from parallel import (
    assert_figures_equal,
    assert_full_gradient_norms,
    global_batch_reference,
    run_worker,
)
from reference import ref_metrics, trainer
from torch_features import needs_fsdp2_on_cpu

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch.lightning.strategies import check_strategy

pytestmark = [RULE_TRIPS, WIRING_REPORT]

MEASURED = (0, 2)
BLOCKS = [f"blocks.{i}" for i in range(DEPTH)]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_worker("fsdp2", tmp_path_factory.mktemp("fsdp2"))


@needs_fsdp2_on_cpu
def test_fsdp2_gradients_are_shards(fsdp_run: list[dict[str, Any]]) -> None:
    shapes = fsdp_run[0]["shapes"][0]
    # A (8, 8) block weight is split over the 2 ranks: each holds (4, 8) of its gradient.
    assert shapes["blocks.0.linear.weight"] == ((4, 8), (8, 8))
    assert shapes["head.bias"][1] == (1,)


@needs_fsdp2_on_cpu
def test_fsdp2_param_norms_equal_full_gradient_norms(fsdp_run: list[dict[str, Any]]) -> None:
    for step in MEASURED:
        full_grads = fsdp_run[0]["grads"][step]  # full_tensor() in the module's own hook
        torch.testing.assert_close(full_grads, fsdp_run[1]["grads"][step])
        for norm_type in NORM_TYPES:
            for record in fsdp_run:
                assert_full_gradient_norms(
                    record["measured"][norm_type][step], full_grads, norm_type
                )


@needs_fsdp2_on_cpu
def test_fsdp2_all_figures_equal_single_process_on_global_batch(
    fsdp_run: list[dict[str, Any]],
) -> None:
    for step in MEASURED:
        block_grads, param_grads = global_batch_reference(fsdp_run, step)
        for name, grad in param_grads.items():
            torch.testing.assert_close(fsdp_run[0]["grads"][step][name], grad)
        for norm_type in NORM_TYPES:
            expected = ref_metrics(
                BLOCKS, block_grads, param_grads, norm_type, param_keys=list(param_grads)
            )
            for record in fsdp_run:
                assert_figures_equal(record["measured"][norm_type][step], expected, rel=1e-5)
    # Per callback and measured step: one all_gather in all. The parameter partials (over the mesh
    # dim the gradients are split on) and the block rows (over the data-parallel ranks) share it,
    # as both reduce over the same process group.
    for record in fsdp_run:
        assert record["collectives"] == {step: len(NORM_TYPES) for step in MEASURED}
    assert fsdp_run[1]["logged"] == []
    assert [step for step, _ in fsdp_run[0]["logged"]] == [
        step for step in MEASURED for _ in NORM_TYPES
    ]


def on_cpu(strategy: Any) -> Any:
    """What ``check_strategy`` reads of a Trainer. FSDPStrategy refuses to build a CPU Trainer (it
    trains on GPUs only, see ``test_gpu.py``); its class and sharding strategy are what is checked."""
    return SimpleNamespace(
        strategy=strategy, precision="32-true", precision_plugin=Precision(), optimizers=[]
    )


def test_fsdp1_is_reported_not_measured() -> None:
    with pytest.warns(UserWarning, match=r"FSDPStrategy \(FSDP1\).*grad_norm_total.*not"):
        support = check_strategy(on_cpu(FSDPStrategy()))
    assert not support.params and "FSDP1" in support.reasons[0]
    assert check_strategy(on_cpu(FSDPStrategy(sharding_strategy="NO_SHARD"))).params


class DeepSpeedStrategy(SingleDeviceStrategy):
    """Carries DeepSpeed's class name (deepspeed is not installed here): detection is by name."""


def test_unmeasurable_params_are_left_out_with_a_warning(tmp_path: Path) -> None:
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[])
    fit = trainer(tmp_path, [callback], max_steps=1, strategy=DeepSpeedStrategy("cpu"))
    with pytest.warns(UserWarning, match="DeepSpeedStrategy.*not measured"):
        fit.fit(BlockNet())
    metrics = callback.last.metrics  # type: ignore[union-attr]
    assert not any(
        key.startswith(("grad_norm_total", "grad_stats/", "grad_param")) for key in metrics
    )
    assert all(math.isfinite(metrics[f"grad_norm/{name}"]) for name in BLOCKS)


def test_plain_strategies_measure_everything(tmp_path: Path) -> None:
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[])
    fit = trainer(tmp_path, [callback], max_steps=1)
    fit.fit(BlockNet())
    assert check_strategy(fit).params
    assert "grad_norm_total" in callback.last.metrics  # type: ignore[union-attr]


@needs_fsdp2_on_cpu
def test_fsdp2_logs_full_gradient_norms_and_global_batch_figures(tmp_path: Path) -> None:
    process = subprocess.run(
        [sys.executable, str(SCRIPT), "fsdp2", str(tmp_path)],
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
