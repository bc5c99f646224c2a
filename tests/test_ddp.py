"""DDP over gloo with 2 CPU processes: the callback reports what one process would on the global batch.

One run (``dist_worker.py ddp``: 2 ranks, ``accumulate_grad_batches=2``, measured steps 0 and 2, one
callback per norm type) is checked for: every logged figure against a single-process reference on the
concatenated global batch, identical figures on both ranks, one collective per callback and measured
step (none on unmeasured steps), all micro-batches combined, and logging by rank 0's loggers only.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from dist_worker import ACCUMULATE, DEPTH, NORM_TYPES
from global_batch import (
    MICRO,
    ShardedDataNet,
    assert_logged_like_reference,
    fit_kwargs,
    logged_rows,
    plain_reference,
    watchers,
)
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from parallel import assert_figures_equal, global_batch_reference, run_worker
from reference import ref_metrics, ref_norm

MEASURED = (0, 2)
BLOCKS = [f"blocks.{i}" for i in range(DEPTH)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp_path_factory.mktemp("ddp")
    return out, run_worker("ddp", out)


def test_ddp_figures_equal_single_process_on_global_batch(
    ddp_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, records = ddp_run
    for step in MEASURED:
        block_grads, param_grads = global_batch_reference(records, step)
        # The reference really is the gradient DDP applied: its synchronized gradients.
        for name, grad in param_grads.items():
            torch.testing.assert_close(records[0]["grads"][step][name], grad)
        for norm_type in NORM_TYPES:
            expected = ref_metrics(
                BLOCKS, block_grads, param_grads, norm_type, param_keys=list(param_grads)
            )
            for record in records:
                assert_figures_equal(record["measured"][norm_type][step], expected, rel=1e-5)


def test_ddp_ranks_agree_and_combine_in_one_collective(
    ddp_run: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, (rank0, rank1) = ddp_run
    assert rank0["world_size"] == 2
    assert rank0["measured"] == rank1["measured"]  # every rank holds the combined figures
    for record in (rank0, rank1):
        # One all_gather per callback (4 norm types) per measured step, nothing on step 1.
        assert record["collectives"] == {step: len(NORM_TYPES) for step in MEASURED}
        # Both micro-batches of each measured step reached every block once each; on the
        # unmeasured step 1 no hook fired.
        assert record["calls"] == {
            step: [float(ACCUMULATE if step in MEASURED else 0)] * DEPTH for step in (0, 1, 2)
        }
    # The two ranks back-propagated different samples, so per-rank figures alone would differ.
    assert not torch.equal(rank0["batches"][0][0][0], rank1["batches"][0][0][0])


def test_ddp_logged_once_by_rank_zero(ddp_run: tuple[Path, list[dict[str, Any]]]) -> None:
    out, (rank0, rank1) = ddp_run
    assert rank1["logged"] == []  # rank 1's logger is never called
    steps = [step for step, _ in rank0["logged"]]
    assert steps == [step for step in MEASURED for _ in NORM_TYPES]  # callbacks in order
    with open(out / "csv" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("grad_norm/blocks.0")]
    assert [int(row["step"]) for row in rows] == steps
    for row, (_, metrics) in zip(rows, rank0["logged"]):
        for key in (*[f"grad_norm/{b}" for b in BLOCKS], "grad_norm_total"):
            assert float(row[key]) == pytest.approx(metrics[key], rel=1e-6)
    # What was logged is the combined measurement, callback by callback.
    for index, (step, metrics) in enumerate(rank0["logged"]):
        assert metrics == rank0["measured"][NORM_TYPES[index % len(NORM_TYPES)]][step]


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
