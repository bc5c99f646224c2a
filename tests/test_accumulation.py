"""Gradient accumulation: a measured step's block figures combine all of its micro-batches.

With ``accumulate_grad_batches=3`` each optimizer step back-propagates three micro-batches (Lightning
divides each loss by 3). The block-output figures of a measured step must describe the same gradient
as the parameter figures: that of one backward pass over the three micro-batches concatenated (L2:
square root of the summed squares, L1: sum, L-inf: maximum, mean: total sum / total count). Steps are
counted in optimizer steps, and the hooks do nothing on the micro-batches of unmeasured steps.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from dist_worker import DEPTH, LOG_EVERY, NORM_TYPES, Recorder
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from parallel import assert_figures_equal, global_batch_reference
from reference import ref_metrics, trainer

from lightning_gradwatch import GradientFlowCallback

pytestmark = [RULE_TRIPS, WIRING_REPORT]

ACCUMULATE = 3
BLOCKS = [f"blocks.{i}" for i in range(DEPTH)]


def test_measured_step_combines_all_micro_batches(tmp_path: Path) -> None:
    callbacks = [
        GradientFlowCallback(
            log_every_n_steps=LOG_EVERY, norm_type=norm_type, log_param_norms=True, rules=[]
        )
        for norm_type in NORM_TYPES
    ]
    model = Recorder(fsdp=False)
    fit = trainer(tmp_path, callbacks, max_steps=4, accumulate_grad_batches=ACCUMULATE)
    fit.fit(model)
    record = model.record
    assert fit.global_step == 4
    for step in (0, 2):
        assert len(record["batches"][step]) == ACCUMULATE
        block_grads, param_grads = global_batch_reference([record], step)
        # The accumulated parameter gradients are those of the concatenated batch.
        for name, grad in param_grads.items():
            torch.testing.assert_close(record["grads"][step][name], grad)
        for norm_type in NORM_TYPES:
            expected = ref_metrics(
                BLOCKS, block_grads, param_grads, norm_type, param_keys=list(param_grads)
            )
            assert_figures_equal(record["measured"][norm_type][step], expected, rel=1e-5)
    # Every block's hook ran once per micro-batch of the measured steps, and not at all on the
    # micro-batches of unmeasured steps (1 and 3: the buffer stays as the measured step left it).
    assert record["calls"] == {
        step: [float(ACCUMULATE if step % LOG_EVERY == 0 else 0)] * DEPTH for step in range(4)
    }
    # Logged at optimizer steps 0 and 2 (not micro-batch indices), once per callback.
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row["grad_norm/blocks.0"]]
    assert steps == [0] * len(NORM_TYPES) + [2] * len(NORM_TYPES)


def test_hooks_do_nothing_on_unmeasured_micro_batches(tmp_path: Path) -> None:
    callback = GradientFlowCallback(log_every_n_steps=100, rules=[])
    model = Recorder(fsdp=False)
    fit = trainer(tmp_path, [callback], max_steps=3, accumulate_grad_batches=ACCUMULATE)
    fit.fit(model)
    # Step 0 is measured (3 hook calls per block); steps 1 and 2 add none.
    assert model.record["calls"] == {
        step: [float(ACCUMULATE if step == 0 else 0)] * DEPTH for step in range(3)
    }
    assert callback.last is not None and callback.last.step == 0
