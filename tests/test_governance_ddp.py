"""Governance under ``strategy="ddp"`` on 2 CPU processes: a rule that trips on rank 1 only halts
both ranks at the same step (no hang), the alert names the ranks that tripped (``rank``: the lowest
of them), rank 0 alone writes the audit trail, and the halt checkpoint holds the weights before the
bad update. A ``loss`` rule reads the loss averaged over the ranks as Lightning averages a value
logged with ``sync_dist=True``, so both ranks keep the same window and take the same decision.
Forensics: with a poisoned batch on rank 1 only, every alert names the epoch, the batch, each rank's
fingerprint and rank 1 as the origin; the rerun calls the poisoned batch reproducible and an output
corrupted once on rank 1 transient on rank 1."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from faults import EpochData, same_weights
from governance_worker import (
    CORRUPTED_STEP,
    FAULT_STEP,
    LOG_EVERY,
    LOSS_SPIKE_STEP,
    POISONED_BATCH,
)
from reference import csv_metrics

from lightning_gradwatch.governance.fingerprints import fingerprint
from lightning_gradwatch.governance.skip_list import SKIP_LIST_FILENAME
from lightning_gradwatch.governance.trail import read_alerts

WORKER = Path(__file__).with_name("governance_worker.py")


def run_ranks(scenario: str, out_dir: Path) -> list[dict]:
    """Run a 2-process worker scenario and return what each rank saved (rank 0 first)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(WORKER), scenario, str(out_dir)],
        capture_output=True,
        text=True,
        timeout=90,  # a rank left waiting in a collective would hang: fail instead
        env=env,
        cwd=WORKER.parent.parent,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
def test_trip_on_one_rank_halts_every_rank_at_the_same_step(tmp_path: Path) -> None:
    ranks = run_ranks("ddp", tmp_path)
    s = FAULT_STEP
    for record in ranks:
        assert record["halted"] and "nonfinite" in record["halt_reason"]
        assert record["global_step"] == s + 1 and record["last_step_started"] == s
        # The update of step s was skipped on both ranks: weights are those before it.
        assert same_weights(record["final"], record["weights_before"][s])
        assert not same_weights(record["weights_before"][s], record["weights_before"][0])
    # Both ranks agree on every decision: the block rule tripped on both at measured steps 0 and 2,
    # the non-finite rule on rank 1 only at step s.
    assert ranks[0]["alerts"] == ranks[1]["alerts"]
    checkpoint = ranks[0]["alerts"][-1][4]
    assert [a[:4] for a in ranks[0]["alerts"]] == [
        (0, "block0", "warn", [0, 1]),
        (2, "block0", "warn", [0, 1]),
        (s, "nonfinite", "halt", [1]),
    ]
    assert same_weights(ranks[0]["final"], ranks[1]["final"])
    # One audit trail, written by rank 0 with the ranks that tripped.
    records = read_alerts(str(tmp_path / "csv" / "version_0" / "gradwatch_alerts.jsonl"))
    assert [(r["step"], r["rule"], r["rank"], r["ranks"]) for r in records] == [
        (0, "block0", 0, [0, 1]),
        (2, "block0", 0, [0, 1]),
        (s, "nonfinite", 1, [1]),  # `rank`: where it tripped; rank 0 wrote it
    ]
    assert records[-1]["checkpoint"] == checkpoint and Path(checkpoint).exists()
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    assert same_weights(state, ranks[0]["weights_before"][s])


@pytest.mark.slow
def test_loss_rule_reads_the_mean_over_ranks_and_decides_the_same_on_both(tmp_path: Path) -> None:
    ranks = run_ranks("loss_ddp", tmp_path)
    s = LOSS_SPIKE_STEP
    mean = {step: (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2 for step in range(12)}
    # Rank 1's spike lifts the mean: the rule trips on both ranks, which skip the same step.
    for record in ranks:
        [(step, rule, action, on, value)] = record["alerts"]
        assert (step, rule, action, on) == (s, "loss_spike", "skip", [0, 1])
        assert value == pytest.approx(mean[s], rel=1e-6)
        assert same_weights(record["weights"][s + 1], record["weights"][s])
        assert not same_weights(record["weights"][s], record["weights"][s - 1])
    # The same window on both ranks: the averaged losses, the spike's taken in as the bound in
    # force then (mean + 6 std of the 8 values before it).
    assert ranks[0]["governance"] == ranks[1]["governance"]
    window = ranks[0]["governance"]["rules"]["loss_spike"]["windows"]["loss"]
    before = [mean[step] for step in range(s)][-8:]
    bound = statistics.fmean(before) + 6.0 * statistics.pstdev(before)
    accepted = [*(mean[step] for step in range(s)), bound, *(mean[t] for t in range(s + 1, 12))]
    assert window == pytest.approx(accepted[-8:], rel=1e-6)
    # The logged loss is the value Lightning logs with sync_dist=True (its mean over the ranks).
    rows = csv_metrics(str(tmp_path / "csv" / "version_0"))
    measured = [step for step in range(12) if step % LOG_EVERY == 0]
    for step in measured:
        assert rows[step]["gradwatch/loss"] == pytest.approx(rows[step]["lightning_loss"], rel=1e-6)
        assert rows[step]["gradwatch/loss"] == pytest.approx(mean[step], rel=1e-6)
    assert rows[s + 1]["gradwatch/loss_max"] == pytest.approx(mean[s], rel=1e-6)


def test_ddp_skip_when_one_rank_trips_skips_every_rank_and_training_goes_on(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, str(WORKER), "ddp_skip", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=90,  # a rank left waiting in a collective would hang: fail instead
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        cwd=Path(__file__).parent.parent,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    s = FAULT_STEP
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for record in ranks:
        assert record["global_step"] == 6 and not record["halted"]
        assert record["alerts"] == [(s, "nonfinite", "skip", 1, [1])]
        weights = record["weights"]
        assert same_weights(weights[s + 1], weights[s])  # the poisoned step changed nothing
        for step in (s - 1, s + 1):
            assert not same_weights(weights[step + 1], weights[step])  # the others trained
        assert all(torch.isfinite(w).all() for w in record["final"].values())
    assert same_weights(ranks[0]["final"], ranks[1]["final"])
    [line] = read_alerts(str(tmp_path / "csv" / "version_0" / "gradwatch_alerts.jsonl"))
    assert (line["step"], line["action"], line["rank"], line["ranks"]) == (s, "skip", 1, [1])


def rank_batch(rank: int, batch: int) -> list[torch.Tensor]:
    """Rank ``rank``'s batch ``batch`` of epoch 0 in the ``forensics_ddp`` scenario, rebuilt."""
    poison = {(0, POISONED_BATCH)} if rank == 1 else set()
    data = EpochData(64, 8, poison, seed=rank)
    items = [data[i] for i in range(batch * 8, (batch + 1) * 8)]
    return [torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])]


@pytest.mark.slow
def test_forensics_name_the_rank_and_rerun_tells_bad_data_from_a_transient_fault(
    tmp_path: Path,
) -> None:
    ranks = run_ranks("forensics_ddp", tmp_path)
    assert ranks[0]["alerts"] == ranks[1]["alerts"]  # every rank records the same
    alerts = {(a["step"], a["rule"]): a for a in ranks[0]["alerts"]}
    b, s = POISONED_BATCH, CORRUPTED_STEP
    assert sorted(alerts) == [(b, "bad_batch"), (b, "spike"), (s, "bad_batch"), (s, "spike")]
    prints = [fingerprint(rank_batch(rank, b))[0] for rank in (0, 1)]
    assert prints[0] != prints[1]
    for rule in ("bad_batch", "spike"):
        poisoned, corrupted = alerts[(b, rule)], alerts[(s, rule)]
        assert (poisoned["epoch"], poisoned["batch_idx"], poisoned["fingerprints"]) == (
            0,
            b,
            prints,
        )
        assert corrupted["fingerprints"] == [fingerprint(rank_batch(r, s))[0] for r in (0, 1)]
        assert poisoned["origin_rank"] == corrupted["origin_rank"] == 1
    # The rank's own figures behind it: rank 1's loss and local gradient norm dwarf rank 0's.
    local = alerts[(b, "spike")]["local"]
    assert local["loss"][1] > 1000 * local["loss"][0]
    assert local["grad_norm"][1] > 100 * local["grad_norm"][0]
    ratio = local["grad_norm"][1] / local["grad_norm"][0]
    assert (
        f"rank 1's batch (epoch 0, batch {b}) has a local gradient norm {ratio:.3g}×"  # noqa: RUF001
        in (alerts[(b, "spike")]["message"])
    )
    assert (
        f"rank 1's batch (epoch 0, batch {b}) has a local loss"
        in alerts[(b, "bad_batch")]["message"]
    )
    # Rerun: the poisoned data trips again on every rank; the corruption does not on rank 1.
    assert alerts[(b, "bad_batch")]["rerun"]["verdict"] == "reproducible"
    transient = alerts[(s, "bad_batch")]["rerun"]
    assert transient["verdict"] == "transient" and transient["ranks"] == [1]
    assert transient["first"]["loss"][0] == pytest.approx(transient["rerun"]["loss"][0], rel=1e-6)
    assert transient["first"]["loss"][1] > 100 * transient["rerun"]["loss"][1]
    assert "rerun: transient on rank 1" in alerts[(s, "bad_batch")]["message"]
    assert alerts[(b, "spike")]["rerun"] is None  # that rule did not ask for one
    for record in ranks:  # both steps skipped on both ranks, the others trained
        weights = record["weights"]
        assert same_weights(weights[b + 1], weights[b]) and same_weights(weights[s + 1], weights[s])
        assert not same_weights(weights[b + 2], weights[b + 1])
    assert same_weights(ranks[0]["final"], ranks[1]["final"])
    folder = tmp_path / "csv" / "version_0"
    listed = json.loads((folder / SKIP_LIST_FILENAME).read_text())
    # The transient trip's batch is not listed: a replay would skip good data.
    assert [(e["step"], e["batch_idx"], e["rule"]) for e in listed] == [(b, b, "bad_batch")]
    assert listed[0]["fingerprints"] == prints
    trail = read_alerts(str(folder / "gradwatch_alerts.jsonl"))
    assert [(r["step"], r["rule"], r["origin_rank"]) for r in trail] == [
        (b, "bad_batch", 1),
        (b, "spike", 1),
        (s, "bad_batch", 1),
        (s, "spike", 1),
    ]
    # A later run without rules replays the list: both ranks skip that step, and only that one.
    run_ranks("forensics_replay", tmp_path)
    replays = [torch.load(tmp_path / f"replay{r}.pt", weights_only=False) for r in (0, 1)]
    for replay in replays:
        (alert,) = replay["alerts"]
        assert (alert["step"], alert["batch_idx"], alert["action"]) == (b, b, "skip")
        assert alert["condition"] == "skipped from list" and alert["fingerprints"] == prints
        weights = replay["weights"]
        assert same_weights(weights[b + 1], weights[b])
        assert all(not same_weights(weights[t + 1], weights[t]) for t in range(7) if t != b)
