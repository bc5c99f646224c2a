"""Update figures (``log_updates=True``) are exact at scale: under DDP (2 processes, gradient
accumulation), FSDP2, HSDP and TP + FSDP2 every rank reports what one process computes on the full
tensors (``full_tensor()`` of the weights before and after the step, of the gradients the step used
and of AdamW's state), the same on every rank, with one ``all_gather`` per process group the
parameters are split over (none under DDP), and a rule on them trips on every rank alike.

Workers: ``dist_worker.py ddp_updates|fsdp2_updates``, ``layout_worker.py tp_updates|hsdp_updates``;
reference: ``update_reference.ref_update_metrics`` (tolerance and why: its docstring).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from dist_worker import DEPTH as DIST_DEPTH
from layout_worker import DEPTH as LAYOUT_DEPTH
from layout_worker import LOG_EVERY, MAX_STEPS
from parallel import run_worker
from reference import assert_metrics_equal
from torch_features import needs_fsdp2_on_cpu
from update_reference import REL, ref_update_metrics

pytestmark = pytest.mark.slow

LAYOUT_WORKER = Path(__file__).with_name("layout_worker.py")


def assert_exact(
    records: list[dict[str, Any]], steps: tuple[int, ...], depth: int, grads: str
) -> None:
    """Every rank's logged update figures equal the full-tensor reference at every measured step."""
    blocks = [f"blocks.{i}" for i in range(depth)]
    for step in steps:
        reference = records[0]
        expected = ref_update_metrics(
            reference["weights"][step],
            reference["after"][step],
            reference[grads][step],
            blocks,
            state=reference["state"][step],
        )
        assert "optim/eps_fraction" in expected and 0 < expected["optim/eps_fraction"] < 1
        for record in records:
            assert_metrics_equal(record["updates"][step], expected, rel=REL)
            # Every rank alike, up to the last bits in which TP's replicated copies may differ.
            assert record["updates"][step] == pytest.approx(records[0]["updates"][step], rel=1e-9)


@pytest.mark.parametrize(
    "scenario", ["ddp_updates", pytest.param("fsdp2_updates", marks=needs_fsdp2_on_cpu)]
)
def test_ddp_and_fsdp2_update_figures_are_exact(tmp_path: Path, scenario: str) -> None:
    records = run_worker(scenario, tmp_path)
    measured = (0, 2)
    assert_exact(records, measured, DIST_DEPTH, grads="grads")
    # Per measured step: the gradient figures' gather; FSDP2 only: the update partials' gather
    # over the data-parallel group (DDP: none, every rank holds the whole parameters); then the
    # rule's agreement (one boolean all_reduce, and one all_gather of who tripped: it trips).
    per_step = (2 if scenario.startswith("fsdp2") else 1) + 2
    for record in records:
        assert record["collectives"] == {step: per_step for step in measured}
        values = {step: record["updates"][step]["update_ratio_total"] for step in measured}
        assert [(s, m, a) for s, m, a, _ in record["alerts"]] == [
            (s, "update_ratio_total", "warn") for s in measured
        ]
        assert {s: v for s, _, _, v in record["alerts"]} == pytest.approx(values, rel=1e-12)


@needs_fsdp2_on_cpu
@pytest.mark.parametrize("scenario", ["tp_updates", "hsdp_updates"])
def test_tensor_parallel_and_hsdp_update_figures_are_exact(tmp_path: Path, scenario: str) -> None:
    records = run_worker(scenario, tmp_path, script=LAYOUT_WORKER, ranks=4)
    measured = tuple(range(0, MAX_STEPS, LOG_EVERY))
    assert_exact(records, measured, LAYOUT_DEPTH, grads="clipped")
    # Package gathers per measured step: the gradient figures' (TP: dp, tp, world; HSDP: shard,
    # dp), then the update partials' (TP: dp and tp; HSDP: shard); nothing on the other steps.
    per_step = 5 if scenario.startswith("tp") else 3
    for record in records:
        assert record["collectives"] == {step: per_step for step in measured}
        assert [(s, r, a) for s, r, a, _ in record["alerts"]] == [
            (s, "ratio", "warn") for s in measured
        ]
        assert set(record["alert_keys"]) == {"update_ratio/blocks.0"}
