"""Bad-batch forensics in one process: an alert names the epoch, the batch index (the micro-batch
indices under accumulation), the rank and each rank's batch fingerprint; a skip decision lists the
batch in ``gradwatch_skipped_batches.json``; a run resumed from a checkpoint taken before it skips
exactly that step (by fingerprint) and ends with the weights of the uninterrupted run, while a
shuffled resume, whose batch at that index holds other data, is warned about and not skipped."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Optional

import fsspec
import lightning.pytorch as pl
import pytest
import torch
from expected_warnings import NEW_CHECKPOINT_DIR, RULE_TRIPS, WIRING_REPORT
from faults import EpochData, PoisonNet, fit_csv, same_weights, snapshot
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.governance.fingerprints import fingerprint
from lightning_gradwatch.governance.skip_list import SKIP_LIST_FILENAME
from lightning_gradwatch.governance.trail import read_alerts
from lightning_gradwatch.report.cli import main

pytestmark = [
    RULE_TRIPS,
    WIRING_REPORT,
    NEW_CHECKPOINT_DIR,
    # Lightning, resuming without the ModelCheckpoint that wrote the checkpoint: on purpose here.
    pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning"),
]

BATCH, SAMPLES = 8, 32  # 4 batches per epoch
POISON = (1, 2)  # epoch 1, batch 2: optimizer step 6
STEP = 6


def bad_batch_rule(**options: Any) -> Rule:
    return Rule("loss", max=50.0, action="skip", name="bad_batch", **options)


def poisoned_batch(epoch: int, batch: int, n: int = SAMPLES) -> list[torch.Tensor]:
    """The batch Lightning hands over at ``(epoch, batch)``, rebuilt from the data (default
    collate: a list ``[x, y]``)."""
    data = EpochData(n, BATCH, {POISON}, epoch=lambda: epoch)
    items = [data[i] for i in range(batch * BATCH, (batch + 1) * BATCH)]
    return [torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])]


def run(
    tmp_path: Path,
    name: str,
    model: PoisonNet,
    callback: GradientFlowCallback,
    checkpoints: bool = False,
    ckpt_path: Optional[str] = None,
    **options: Any,
) -> Path:
    """Fit 12 steps (3 epochs), logging to ``tmp_path/name`` (``checkpoints``: one every 4 steps,
    i.e. after each epoch's last batch, in ``tmp_path/ckpt``; ``ckpt_path``: resume from it); the
    run's folder. (A ``ModelCheckpoint`` saving in ``on_train_epoch_end`` instead makes Lightning
    2.6 resume inside epoch 0 again, shifting every later batch.)"""
    logger = CSVLogger(str(tmp_path), name=name, version=0)
    callbacks: list[Any] = [callback]
    if checkpoints:
        every = ModelCheckpoint(str(tmp_path / "ckpt"), every_n_train_steps=4, save_top_k=-1)
        callbacks.append(every)
    trainer = pl.Trainer(
        **{
            "accelerator": "cpu",
            "max_steps": 12,
            "logger": logger,
            "callbacks": callbacks,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": checkpoints,
            "default_root_dir": str(tmp_path / name),
            **options,
        }
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return Path(logger.log_dir)


#: The checkpoint at the end of epoch 0, before the bad batch.
BEFORE = "epoch=0-step=4.ckpt"


def test_alert_names_the_batch_and_the_skip_list_holds_it(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PoisonNet(poison=(POISON,), n_samples=SAMPLES, batch_size=BATCH)
    callback = GradientFlowCallback(log_every_n_steps=4, rules=[bad_batch_rule()])
    folder = run(tmp_path, "run", model, callback)

    (alert,) = callback.alerts
    digest = fingerprint(poisoned_batch(*POISON))[0]
    assert (alert.step, alert.epoch, alert.batch_idx, alert.action) == (STEP, 1, 2, "skip")
    assert alert.origin_rank == 0 and alert.rank == 0 and alert.fingerprints == [digest]
    assert "(epoch 1, batch 2)" in alert.message
    # The same batch index in another epoch holds other data, and another digest.
    assert fingerprint(poisoned_batch(0, 2))[0] != digest
    # The loss it tripped on is this rank's own, recorded per rank.
    assert alert.local["loss"] == [pytest.approx(alert.value, rel=1e-6)]
    # The update was skipped, and only that one.
    weights = model.weights
    assert same_weights(weights[STEP + 1], weights[STEP])
    assert not same_weights(weights[STEP], weights[STEP - 1])
    assert not same_weights(weights[STEP + 2], weights[STEP + 1])
    listed = json.loads((folder / SKIP_LIST_FILENAME).read_text())
    assert listed == [
        {"epoch": 1, "batch_idx": 2, "fingerprints": [digest], "step": STEP, "rule": "bad_batch"}
    ]
    (record,) = read_alerts(str(folder / "gradwatch_alerts.jsonl"))
    assert record["batch_idx"] == 2 and record["fingerprints"] == [digest]
    assert record["origin_rank"] == 0 and record["skip_list"] == str(folder / SKIP_LIST_FILENAME)


def test_under_accumulation_the_alert_names_the_micro_batches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PoisonNet(poison=((0, 5),), n_samples=64, batch_size=BATCH)
    callback = GradientFlowCallback(log_every_n_steps=4, rules=[bad_batch_rule()])
    folder = run(tmp_path, "acc", model, callback, max_steps=4, accumulate_grad_batches=2)

    (alert,) = callback.alerts
    assert (alert.step, alert.epoch, alert.batch_idx) == (2, 0, [4, 5])
    data = EpochData(64, BATCH, {(0, 5)})
    micro = [
        [torch.stack([data[i][k] for i in range(b * BATCH, (b + 1) * BATCH)]) for k in (0, 1)]
        for b in (4, 5)
    ]
    assert alert.fingerprints == [fingerprint(micro)[0]]
    assert "(epoch 0, batches 4-5)" in alert.message
    assert same_weights(model.weights[3], model.weights[2])
    (entry,) = json.loads((folder / SKIP_LIST_FILENAME).read_text())
    assert entry["batch_idx"] == [4, 5] and entry["step"] == 2


def resumed(
    tmp_path: Path, name: str, checkpoint: str, skip_batches: Any, shuffle: bool = False
) -> tuple[PoisonNet, GradientFlowCallback]:
    """A run without rules resumed from ``checkpoint``, replaying ``skip_batches``."""
    model = PoisonNet(poison=(POISON,), n_samples=SAMPLES, batch_size=BATCH, shuffle=shuffle)
    callback = GradientFlowCallback(log_every_n_steps=4, rules=[], skip_batches=skip_batches)
    run(tmp_path, name, model, callback, ckpt_path=checkpoint)
    return model, callback


def test_a_resumed_run_skips_exactly_the_listed_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PoisonNet(poison=(POISON,), n_samples=SAMPLES, batch_size=BATCH)
    callback = GradientFlowCallback(log_every_n_steps=4, rules=[bad_batch_rule()])
    folder = run(tmp_path, "first", model, callback, checkpoints=True)
    uninterrupted = snapshot(model)
    before = str(tmp_path / "ckpt" / BEFORE)

    resumed_at = {}
    for name, skip_batches in (("path", str(folder / SKIP_LIST_FILENAME)), ("auto", "auto")):
        again, watcher = resumed(tmp_path, name, before, skip_batches)
        resumed_at[name] = again.seen[0]
        (alert,) = watcher.alerts  # exactly one step skipped: the listed batch's
        assert (alert.epoch, alert.batch_idx, alert.action) == (1, 2, "skip")
        assert same_weights(again.weights[alert.step + 1], again.weights[alert.step])
        assert alert.condition == "skipped from list" and "skipped from list" in alert.message
        assert alert.skip_list == str(folder / SKIP_LIST_FILENAME)
        assert alert.fingerprints == callback.alerts[0].fingerprints
        (record,) = read_alerts(str(tmp_path / name / "version_0" / "gradwatch_alerts.jsonl"))
        assert record["condition"] == "skipped from list" and record["step"] == alert.step
        if resumed_at[name] == (4, 1, 0):  # Lightning resumed at epoch 1's first batch
            assert alert.step == STEP
            assert same_weights(snapshot(again), uninterrupted), name
    if set(resumed_at.values()) != {(4, 1, 0)}:
        # Lightning 2.4 resumes this checkpoint inside epoch 0 again (one more batch there), so
        # no uninterrupted run has the same data order to compare the final weights with.
        pytest.skip(f"Lightning resumed at (step, epoch, batch) {resumed_at}, not (4, 1, 0)")


def test_a_shuffled_resume_does_not_skip_the_wrong_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PoisonNet(poison=(POISON,), n_samples=SAMPLES, batch_size=BATCH)
    callback = GradientFlowCallback(log_every_n_steps=4, rules=[bad_batch_rule()])
    listed = str(run(tmp_path, "first", model, callback, checkpoints=True) / SKIP_LIST_FILENAME)
    before = str(tmp_path / "ckpt" / BEFORE)

    with pytest.warns(UserWarning, match="other content .* not skipped"):
        again, watcher = resumed(tmp_path, "shuffled", before, listed, shuffle=True)
    assert watcher.alerts == []
    assert not same_weights(again.weights[STEP + 1], again.weights[STEP])


def test_skip_batches_and_rerun_are_checked_at_construction(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="skip_batches"):
        GradientFlowCallback(skip_batches=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="skip_batches"):
        GradientFlowCallback(skip_batches="")
    with pytest.raises(ValueError, match=r"skip_batches.*no such file"):
        GradientFlowCallback(skip_batches=str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="skip_batches"):
        GradientFlowCallback(skip_batches=broken)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"epoch": 0}]))
    with pytest.raises(ValueError, match=r"skip_batches.*entry 0"):
        GradientFlowCallback(skip_batches=wrong)
    held = tmp_path / "held.json"
    held.write_text(json.dumps({"batches": [{"epoch": 0, "batch_idx": 3, "fingerprints": None}]}))
    assert GradientFlowCallback(skip_batches=held)._extras.forensics.skip_batches == str(held)
    assert GradientFlowCallback(skip_batches="auto")._extras.forensics.skip_batches == "auto"
    with pytest.raises(TypeError, match="rerun"):
        Rule("loss", max=1.0, rerun="yes")  # type: ignore[arg-type]


def test_fingerprints_hash_content_in_structures() -> None:
    x, y = torch.arange(6.0).reshape(2, 3), torch.tensor([1, 2])
    base = fingerprint({"x": x, "y": y})[0]
    assert len(base) == 16 and int(base, 16) >= 0
    assert fingerprint({"y": y.clone(), "x": x.clone()})[0] == base  # content and keys, not order
    assert fingerprint({"x": x.t().contiguous().t(), "y": y})[0] == base  # not the memory layout
    assert fingerprint({"x": x + 1, "y": y})[0] != base
    assert fingerprint({"x": x.double(), "y": y})[0] != base  # the dtype counts
    assert fingerprint([x, y])[0] != fingerprint((x, y))[0]
    _, skipped = fingerprint({"x": x, "handle": object()})
    assert skipped == ["object"]


def test_report_and_tensorboard_show_the_incident(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = PoisonNet(poison=(POISON,), n_samples=SAMPLES, batch_size=BATCH)
    callback = GradientFlowCallback(log_every_n_steps=2, rules=[bad_batch_rule(rerun=True)])
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    fit_csv(tmp_path, model, [callback], logger=logger, max_steps=12)
    folder = Path(logger.log_dir)
    listed = str(folder / SKIP_LIST_FILENAME)
    (alert,) = callback.alerts

    assert main(["report", str(folder), "--format", "json"]) == 0
    (run_report,) = json.loads(capsys.readouterr().out)["runs"]
    (row,) = run_report["incidents"]
    assert {k: row[k] for k in ("step", "rule", "action", "epoch", "batch_idx", "rank")} == {
        "step": STEP,
        "rule": "bad_batch",
        "action": "skip",
        "epoch": 1,
        "batch_idx": 2,
        "rank": 0,
    }
    assert row["verdict"] == "reproducible" and row["fingerprints"] == alert.fingerprints
    assert run_report["skip_list"] == listed
    out = tmp_path / "report"
    assert main(["report", str(folder), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"Incidents (skip list: {listed}):" in text
    line = f"step {STEP}: SKIP rule=bad_batch batch (epoch 1, batch 2) rank 0 rerun=reproducible"
    assert line in text
    page = (out / "report.html").read_text()
    assert '<section class="incidents">' in page and "epoch 1, batch 2" in page
    # TensorBoard's TEXT tab holds the incident at its step.
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0}).Reload()
    (event,) = events.Tensors("gradwatch/incidents/text_summary")
    markdown = event.tensor_proto.string_val[0].decode()
    assert event.step == STEP
    assert "| batch | epoch 1, batch 2 |" in markdown and "| rerun | reproducible |" in markdown
    assert alert.message in markdown


def test_skip_list_on_a_url_is_written_and_replayed_through_fsspec(tmp_path: Path) -> None:
    root = f"memory://gradwatch-forensics-{uuid.uuid4().hex[:10]}"
    memory = fsspec.filesystem("memory")
    try:
        for name, rules, skip_batches in (
            ("first", [bad_batch_rule()], None),
            ("again", [], f"{root}/first/version_0/{SKIP_LIST_FILENAME}"),
        ):
            torch.manual_seed(0)
            model = PoisonNet(poison=(POISON,), n_samples=SAMPLES, batch_size=BATCH)
            callback = GradientFlowCallback(rules=rules, skip_batches=skip_batches)
            logger = CSVLogger(root, name=name, version=0)
            fit_csv(tmp_path, model, [callback], logger=logger, max_steps=8, default_root_dir=root)
            (alert,) = callback.alerts
            assert (alert.step, alert.batch_idx, alert.action) == (STEP, 2, "skip")
            assert same_weights(model.weights[STEP + 1], model.weights[STEP])
        assert alert.condition == "skipped from list" and alert.skip_list == skip_batches
        (entry,) = json.loads(memory.cat_file(skip_batches.removeprefix("memory://")))
        assert entry["step"] == STEP
        assert not list(tmp_path.glob("memory:*")) and not Path("memory:").exists()
    finally:
        if memory.exists(root.removeprefix("memory://")):
            memory.rm(root.removeprefix("memory://"), recursive=True)
