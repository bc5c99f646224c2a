"""Helpers for the multi-process tests: run ``dist_worker.py`` and compute the single-process reference.

The reference is a plain PyTorch forward/backward of a fresh ``RefNet`` (same weights) on the *global*
batch of a step: every micro-batch of every rank, concatenated. With a mean-reduced loss and equal
micro-batch sizes its gradients are the gradients of the objective that DDP/FSDP optimize
(``(1/N) * sum of the rank losses``, each loss divided by the accumulation count).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from dist_worker import DEPTH, WIDTH
from reference import RefNet, assert_metrics_equal, ref_norm
from torch import Tensor, nn

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parent.parent


def run_worker(
    scenario: str, out_dir: Path, timeout: float = 170, *, script: Path = WORKER, ranks: int = 2
) -> list[dict[str, Any]]:
    """Run ``script``'s multi-process ``scenario`` and return each rank's record (rank 0 first)."""
    process = subprocess.run(
        [sys.executable, str(script), scenario, str(out_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )
    assert process.returncode == 0, process.stdout[-4000:] + process.stderr[-4000:]
    return load_records(out_dir, ranks)


def load_records(out_dir: Path, ranks: int) -> list[dict[str, Any]]:
    """The ``rank<r>.pt`` records a worker saved, rank 0 first."""
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(ranks)]


def global_batch_reference(
    records: list[dict[str, Any]], step: int, **options: Any
) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Block-output and parameter gradients of one process on step ``step``'s global batch
    (``records``: one per data-parallel rank; ``options``: ``RefNet`` arguments)."""
    model = RefNet(**{"depth": DEPTH, "width": WIDTH, **options})
    model.load_state_dict(records[0]["weights"][step])
    batches = [batch for record in records for batch in record["batches"][step]]
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    nn.functional.mse_loss(model(x), y).backward()
    blocks = [output.grad for output in model._outputs if output is not None]
    params = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return blocks, params  # type: ignore[return-value]


#: :func:`reference.assert_metrics_equal` (tolerances derived per key: log-gains absolute,
#: ``grad_stats/mean`` relative to the spread), under the name the multi-process tests use.
assert_figures_equal = assert_metrics_equal


def assert_full_gradient_norms(
    measured: Mapping[str, float], full_grads: Mapping[str, Tensor], norm_type: str
) -> None:
    """The total and per-parameter norms in ``measured`` are those of the full gradients."""
    assert measured["grad_norm_total"] == pytest.approx(
        ref_norm(list(full_grads.values()), norm_type), rel=1e-5
    )
    for name, grad in full_grads.items():
        assert measured[f"grad_param_norm/{name}"] == pytest.approx(
            ref_norm(grad, norm_type), rel=1e-5, abs=1e-12
        ), name
