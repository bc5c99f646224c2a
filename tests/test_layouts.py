"""Exact figures under 2-D layouts and on several nodes: tensor parallelism + FSDP2 and HSDP on 4 CPU
processes, DDP on two simulated nodes (``layout_worker.py``).

References: ``full_tensor()`` of every gradient on every rank, and one process's forward/backward on
the step's global batch (every data-parallel rank's batch; the TP ranks of one data-parallel rank
share theirs). A world-wide sum would count the parameters TP leaves replicated twice (total about
1.3x), every HSDP replica once more (x sqrt(2)) and TP-replicated block outputs twice (x sqrt(2)).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from layout_worker import CLIP_TO, DEPTH, LOG_EVERY, MAX_STEPS, NORM_TYPES, WIDTH
from lightning.fabric.plugins.environments.lightning import find_free_network_port
from parallel import (
    ROOT,
    assert_figures_equal,
    global_batch_reference,
    load_records,
    run_worker,
)
from reference import (
    FLOAT32_SUM_REL,
    approx_stats,
    csv_metrics,
    ref_grad_stats,
    ref_metrics,
    ref_norm,
)
from torch_features import needs_fsdp2_on_cpu

from lightning_gradwatch.governance.alerts import ALERTS_FILENAME
from lightning_gradwatch.numerics.grad_stats import finalize_grad_stats
from lightning_gradwatch.numerics.norms import finalize_norm

WORKER = Path(__file__).with_name("layout_worker.py")
BLOCKS = [f"blocks.{i}" for i in range(DEPTH)]
MEASURED = tuple(range(0, MAX_STEPS, LOG_EVERY))
#: Keys only rank 0's measurement carries once the rules' extra figures are merged for logging.
RULE_KEYS = ("grad_alerts/", "grad_norm_total_clipped")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("tp")
    records = run_worker("tp", out, script=WORKER, ranks=4)
    records[0]["logged"] = csv_metrics(str(out / "node0" / "csv" / "version_0"))
    return records


@pytest.fixture(scope="module")
def hsdp_run(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return run_worker("hsdp", tmp_path_factory.mktemp("hsdp"), script=WORKER, ranks=4)


def run_nodes(out_dir: Path, timeout: float = 170) -> list[dict[str, Any]]:
    """Two "nodes" of one process each, started as a cluster would: same script, ``NODE_RANK``."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(find_free_network_port())}
    env["WORLD_SIZE"] = "2"
    nodes = [
        subprocess.Popen(
            [sys.executable, str(WORKER), "nodes", str(out_dir)],
            env={**env, "NODE_RANK": str(node)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        output, _ = node.communicate(timeout=timeout)
        assert node.returncode == 0, output[-4000:]
    return load_records(out_dir, 2)


def assert_exact_figures(records: list[dict[str, Any]]) -> None:
    """Every rank's figures, at every measured step and for every norm type, equal one process's on
    the global batch; the every-step ``grad_norm_total`` (alert values) equals the full gradients'."""
    by_dp_rank = {record["dp_rank"]: record for record in reversed(records)}
    data_parallel = [by_dp_rank[rank] for rank in sorted(by_dp_rank)]
    for step in MEASURED:
        block_grads, param_grads = global_batch_reference(
            data_parallel, step, depth=DEPTH, width=WIDTH, block="mlp"
        )
        for record in records:
            torch.testing.assert_close(record["grads"][step], param_grads)
        for norm_type in NORM_TYPES:
            expected = ref_metrics(
                BLOCKS, block_grads, param_grads, norm_type, param_keys=list(param_grads)
            )
            for record in records:
                measured = record["measured"][norm_type][step]
                figures = {k: v for k, v in measured.items() if not k.startswith(RULE_KEYS)}
                assert_figures_equal(figures, expected, rel=1e-5)
    for record in records:
        every_step = {
            step: value for step, rule, _, value in record["alerts"] if rule == "every_step"
        }
        assert sorted(every_step) == list(range(MAX_STEPS))
        for step, value in every_step.items():
            want = ref_norm(list(record["grads"][step].values()), "l2")
            assert value == pytest.approx(want, rel=FLOAT32_SUM_REL)


@needs_fsdp2_on_cpu
def test_tensor_parallel_with_fsdp2_is_exact(tp_run: list[dict[str, Any]]) -> None:
    # (16, 8) split over dp and tp; the LayerNorm over dp only (replicated on the TP ranks).
    assert tp_run[0]["shapes"]["blocks.0.up.weight"] == (2 * WIDTH // 4, WIDTH)
    assert tp_run[0]["shapes"]["blocks.0.norm.weight"] == (WIDTH // 2,)
    assert_exact_figures(tp_run)
    # Per measured step: parameters over the data-parallel and the TP group, block rows over the
    # world, for each of the four callbacks; the every-step check: the two parameter gathers.
    for record in tp_run:
        expected = {s: 3 * len(NORM_TYPES) if s in MEASURED else 2 for s in range(MAX_STEPS)}
        assert record["collectives"] == expected


@needs_fsdp2_on_cpu
def test_tensor_parallel_clip_and_halt_agree(tp_run: list[dict[str, Any]]) -> None:
    last = MAX_STEPS - 1
    for record in tp_run:  # the same decisions at the same steps on every rank
        actions = [(step, rule, action) for step, rule, action, _ in record["alerts"]]
        assert [(s, a) for s, r, a in actions if r == "clip"] == [(s, "clip") for s in range(4)]
        halts = [(s, a) for s, r, a in actions if r == "halt"]
        assert halts == [*((s, "none") for s in range(last)), (last, "halt")]
        assert ("l2", True) in record["halted"]
        assert record["clipped"][last] == {}  # halted: the update was dropped on every rank
    for step in range(last):
        total = ref_norm(list(tp_run[0]["grads"][step].values()), "l2")
        # clip_grad_norm_'s coefficient, clip_to / (total + 1e-6), applied to the exact total.
        want = CLIP_TO * total / (total + 1e-6)
        for record in tp_run:
            clipped = ref_norm(list(record["clipped"][step].values()), "l2")
            assert clipped == pytest.approx(want, rel=1e-5)
        if step in MEASURED:  # rank 0 logs it
            logged = tp_run[0]["logged"][step]["grad_norm_total_clipped"]
            assert logged == pytest.approx(want, rel=1e-5)


@needs_fsdp2_on_cpu
def test_any_placement_is_exact(tp_run: list[dict[str, Any]]) -> None:
    """Pending sums (redistributed first), splits over both mesh dims, empty shards."""
    for record in tp_run:
        cases = record["placements"]
        for norm_type in NORM_TYPES:
            measured = cases["partials"][norm_type]
            for partial, grad in zip(measured, cases["full"]):
                norm = finalize_norm(partial, grad.numel(), norm_type)
                assert norm == pytest.approx(ref_norm(grad, norm_type), rel=1e-5)
        stats = finalize_grad_stats(cases["stats"])
        assert stats == approx_stats(ref_grad_stats(cases["full"]))
        split, pending, replicated = cases["block_values"]
        torch.testing.assert_close(split[0], split[1])  # the local shard
        columns = cases["full"][1].tensor_split(2, dim=1)  # split over dp, pending over tp
        torch.testing.assert_close(pending[0], columns[record["dp_rank"]])
        torch.testing.assert_close(replicated[0], cases["full"][2])


@needs_fsdp2_on_cpu
def test_hsdp_is_exact(hsdp_run: list[dict[str, Any]]) -> None:
    assert hsdp_run[0]["shapes"]["blocks.0.up.weight"] == (WIDTH, WIDTH)  # split over "shard"
    assert_exact_figures(hsdp_run)
    # Parameters over the shard group, block rows over the 4 data-parallel ranks.
    for record in hsdp_run:
        expected = {s: 2 * len(NORM_TYPES) if s in MEASURED else 1 for s in range(MAX_STEPS)}
        assert record["collectives"] == expected


def test_two_nodes_are_exact_and_only_rank_zero_writes(tmp_path: Path) -> None:
    records = run_nodes(tmp_path)
    assert_exact_figures(records)
    for record in records:  # DDP: parameters are whole on every rank; block rows: one gather
        assert record["collectives"] == {step: len(NORM_TYPES) for step in MEASURED}
    log_dir = tmp_path / "node0" / "csv" / "version_0"
    assert (log_dir / ALERTS_FILENAME).read_text().count('"every_step"') == MAX_STEPS
    written = csv_metrics(str(log_dir))
    for step in MEASURED:
        assert written[step]["grad_norm_total"] == pytest.approx(
            records[0]["measured"]["l2"][step]["grad_norm_total"]
        )
    assert [p for p in (tmp_path / "node1").rglob("*") if p.is_file()] == []
