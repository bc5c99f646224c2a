"""In-process checks of :mod:`lightning_gradwatch.measure.reduction`: the single-process plan does nothing,
plain gradients stay local, and the block-row rule under tensor parallelism (replicated rows once,
sequence-split rows summed) on rows as an ``all_gather`` would return them; the warning for
parameters no strategy synchronizes. The multi-process runs are in ``test_layouts.py``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.plugins import Precision
from models import BlockNet
from reference import trainer

import lightning_gradwatch.lightning.strategies as strategies
import lightning_gradwatch.measure.reduction as distributed
from lightning_gradwatch.measure.reduction import (
    ReductionPlan,
    param_partials,
    plan_reduction,
    reduce_block_rows,
)
from lightning_gradwatch.numerics.grad_stats import grad_stat_partials
from lightning_gradwatch.numerics.norms import foreach_partial_norms


def test_single_process_plan_does_nothing(tmp_path: Any) -> None:
    plan = plan_reduction(trainer(tmp_path, []))
    assert plan == ReductionPlan() and plan.group is None
    rows = torch.rand(3, 3)
    torch.testing.assert_close(reduce_block_rows(rows, "l2", plan), rows.double())


def test_plain_gradients_stay_local() -> None:
    grads = [torch.randn(4, 3), torch.zeros(0), torch.randn(5)]
    partials, stats = param_partials(
        grads, "l1", stats=True, large_threshold=0.5, assume_finite=False
    )
    torch.testing.assert_close(partials, foreach_partial_norms(grads, "l1").double())
    torch.testing.assert_close(stats, grad_stat_partials(grads, 0.5))
    assert param_partials([], "l2", stats=False, large_threshold=1.0, assume_finite=True)[1] is None


def grid_rows(replicated: list[float], split: list[list[float]]) -> torch.Tensor:
    """Rows of 4 ranks, data-parallel x tensor-parallel = 2 x 2, in rank order, for two blocks:
    block 0 replicated on the TP ranks (same row), block 1 split over them (its own row each)."""
    rows = []
    for dp in range(2):
        for tp in range(2):
            rows.append([[replicated[dp], 8.0, 1.0], [split[dp][tp], 4.0, 1.0]])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_tensor_parallel_rows(monkeypatch: pytest.MonkeyPatch, norm_type: str) -> None:
    gathered = grid_rows([2.0, 3.0], [[1.0, 5.0], [7.0, 0.5]])
    monkeypatch.setattr(distributed, "_all_gather", lambda tensor, group: gathered)
    plan = ReductionPlan(group=object(), data_parallel_size=2, tensor_parallel_size=2)
    out = reduce_block_rows(gathered[0].float(), norm_type, plan)  # type: ignore[arg-type]
    if norm_type == "l2":  # replicated: once per data-parallel rank; split: every shard
        expected = [[2.0 + 3.0, 16.0, 2.0], [1.0 + 5.0 + 7.0 + 0.5, 16.0, 4.0]]
    else:
        expected = [[3.0, 16.0, 2.0], [7.0, 16.0, 4.0]]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


def test_rows_follow_the_mesh_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mesh whose (dp, tp) cells are not in rank order: ranks 0, 2 form one TP group."""
    in_order = grid_rows([2.0, 3.0], [[1.0, 5.0], [7.0, 0.5]])
    gathered = in_order[[0, 2, 1, 3]]  # rank r holds cell grid[r]
    monkeypatch.setattr(distributed, "_all_gather", lambda tensor, group: gathered)
    plan = ReductionPlan(object(), 2, 2, grid=torch.tensor([0, 2, 1, 3]))
    out = reduce_block_rows(in_order[0], "l2", plan)  # type: ignore[arg-type]
    assert out[0, 0].item() == 5.0 and out[1, 0].item() == 13.5


class ModelParallelStrategy:
    """Carries the class name ``check_strategy`` recognises; two data-parallel ranks."""

    def __init__(self) -> None:
        self.distributed_sampler_kwargs = {"num_replicas": 2, "rank": 0}


def test_plain_parameters_under_model_parallel_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parameters left out of fully_shard (or expert weights held per rank) have gradients no one
    synchronizes: their figures cannot be the global ones, and the warning names them."""
    monkeypatch.setattr(
        strategies, "plan_reduction", lambda trainer: ReductionPlan(data_parallel_size=2)
    )
    fit = SimpleNamespace(
        strategy=ModelParallelStrategy(),
        lightning_module=BlockNet(depth=2),
        precision="32-true",
        precision_plugin=Precision(),
        optimizers=[],
    )
    with pytest.warns(UserWarning, match=r"plain tensors.*\(stem.weight, stem.bias, blocks.0"):
        support = strategies.check_strategy(fit)  # type: ignore[arg-type]
    assert support.params and "fully_shard" in support.reasons[0]
