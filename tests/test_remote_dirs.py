"""Log directories that are URLs, and loggers without a log directory: every file the callback writes
(the alert trail, the model facts, the halt checkpoint) goes through the fsspec filesystem of its
folder, as Lightning's own logs and checkpoints do, and ``gradwatch report`` reads them back there.

Real Trainers on fsspec's in-memory filesystem (``memory://``), a real fsspec filesystem that cannot
append (registered here, as an object store behaves), and real ``Logger`` subclasses whose
``log_dir`` is not a path. Each test runs in an empty working directory that must stay empty
(``os.path``/``open()`` on a URL would create a folder named ``memory:`` there).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Optional
from unittest.mock import MagicMock

import fsspec
import lightning.pytorch as pl
import pytest
import torch
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from faults import FaultNet, same_weights
from fsspec.implementations.memory import MemoryFileSystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from reference import ref_norm

from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.diagnosis.run_history import FACTS_FORMAT
from lightning_gradwatch.files import can_append, dirname, join
from lightning_gradwatch.governance.trail import read_alerts
from lightning_gradwatch.report.cli import main

pytestmark = [RULE_TRIPS, WIRING_REPORT]

ALERTS = "gradwatch_alerts.jsonl"
FACTS = "gradwatch_model_facts.json"
STEPS = 4


@pytest.fixture
def cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working directory (nothing may be written there)."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh ``memory://`` folder, removed afterwards."""
    name = f"/gradwatch-test-{uuid.uuid4().hex[:10]}"
    yield f"memory://{name}"
    memory = fsspec.filesystem("memory")
    if memory.exists(name):
        memory.rm(name, recursive=True)


def warn_on_every_step() -> Rule:
    return Rule("grad_norm_total", max=1e-9, action="warn", name="always")


def memory_trainer(root: str, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        callbacks=callbacks,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def info_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_paths_join_with_slashes_for_urls_and_os_path_for_local_paths() -> None:
    assert join("memory://run/", "csv", "a.jsonl") == "memory://run/csv/a.jsonl"
    assert join("s3://bucket/run", "gradwatch_halt_step3.ckpt") == (
        "s3://bucket/run/gradwatch_halt_step3.ckpt"
    )
    assert join("logs/run", "a.jsonl") == os.path.join("logs/run", "a.jsonl")
    assert dirname("gs://bucket/run/a.jsonl") == "gs://bucket/run"
    assert dirname("memory://a.jsonl") == "memory://"
    assert dirname("logs/a.jsonl") == "logs" and dirname("a.jsonl") == ""
    assert can_append("logs/a") and can_append("file:///x/a") and can_append("memory://a")
    assert not can_append("s3://bucket/a") and not can_append("gs://bucket/a")


# -- memory:// ------------------------------------------------------------------------------------


def test_memory_dir_holds_trail_facts_and_report(
    cwd: Path, memory_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = FaultNet(depth=3)
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[warn_on_every_step()])
    loggers = [
        TensorBoardLogger(memory_root, name="tb", version=0),
        CSVLogger(memory_root, name="csv", version=0),
    ]
    trainer = memory_trainer(memory_root, [callback], logger=loggers)
    trainer.fit(model)

    assert list(cwd.iterdir()) == []  # no `memory:` folder (nor anything else) in the cwd
    memory = fsspec.filesystem("memory")
    run = memory_root[len("memory://") :]
    files = set(memory.find(run))
    trail = f"{memory_root}/tb/version_0/{ALERTS}"  # the first logger's log_dir
    assert f"{run}/tb/version_0/{ALERTS}" in files
    assert f"{run}/csv/version_0/{ALERTS}" not in files
    # The trail, read back from the memory filesystem: one line per step, the right rule and value
    # (the total norm of the gradients the optimizer saw, computed here).
    lines = memory.cat_file(trail).decode().splitlines()
    records = [json.loads(line) for line in lines]
    assert records == read_alerts(trail)
    assert [r["step"] for r in records] == list(range(STEPS))
    assert {r["rule"] for r in records} == {"always"} and {r["action"] for r in records} == {"warn"}
    for record in records:
        reference = ref_norm(list(model.grads_at_step[record["step"]].values()), "l2")
        assert record["value"] == pytest.approx(reference, rel=1e-5)
    # The model facts beside each logger's logs.
    for name in ("tb", "csv"):
        facts = json.loads(memory.cat_file(f"{memory_root}/{name}/version_0/{FACTS}"))
        assert facts["format"] == FACTS_FORMAT and facts["blocks"] == callback.block_names

    # `gradwatch report` on the URL: both runs, their facts, the alerts of the TensorBoard run.
    assert main(["report", memory_root, "--format", "json"]) == 0
    reports = {r["name"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert set(reports) == {"tb/version_0", "csv/version_0"}
    tb, csv = reports["tb/version_0"], reports["csv/version_0"]
    assert tb["source"] == "tensorboard" and csv["source"] == "csv"
    assert tb["path"] == f"{memory_root}/tb/version_0"
    assert [b["name"] for b in tb["blocks"]] == callback.block_names
    assert tb["measured_steps"] == {"count": STEPS, "first": 0, "last": STEPS - 1}
    assert [a["step"] for a in tb["alerts"]] == list(range(STEPS)) and csv["alerts"] == []
    assert tb["diagnosis"]["model_facts"] and csv["diagnosis"]["model_facts"]
    # Pictures and page written to a URL too.
    pytest.importorskip("matplotlib")
    out = f"{memory_root}/report"
    assert main(["report", f"{memory_root}/tb/version_0", "--out", out]) == 0
    written = {path.rsplit("/", 1)[1] for path in memory.find(out)}
    assert written == {"report.html", "norms.png", "gains.png", "total_norm.png"}
    assert b"<html" in memory.cat_file(f"{out}/report.html")
    assert list(cwd.iterdir()) == []


def test_halt_checkpoint_in_memory_dir(cwd: Path, memory_root: str) -> None:
    torch.manual_seed(0)
    model = FaultNet(depth=3, poison_block=1, poison_steps=(2,))
    callback = GradientFlowCallback(log_every_n_steps=50)  # default rule: halt on non-finite
    trainer = memory_trainer(
        memory_root, [callback], logger=CSVLogger(memory_root, name="csv", version=0)
    )
    trainer.fit(model)

    assert callback.halted and max(model.weights) == 2  # no step after the halted one
    assert list(cwd.iterdir()) == []
    checkpoint = f"{memory_root}/csv/version_0/gradwatch_halt_step2.ckpt"
    [record] = read_alerts(f"{memory_root}/csv/version_0/{ALERTS}")
    assert record["rule"] == "nonfinite" and record["action"] == "halt" and record["step"] == 2
    assert record["checkpoint_path"] == checkpoint == callback.alerts[0].checkpoint
    with fsspec.open(checkpoint, "rb") as handle:
        saved = torch.load(handle, weights_only=False)
    assert saved["global_step"] == 2
    weights = {name: tensor for name, tensor in saved["state_dict"].items()}
    assert same_weights(weights, model.weights[2])  # the weights before the bad update


# -- a store that cannot append -------------------------------------------------------------------


class NoAppendFileSystem(MemoryFileSystem):
    """fsspec's memory filesystem under its own protocol, refusing to append (like s3 or gs)."""

    protocol = ("noappend",)
    root_marker = "/"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(path.removeprefix("noappend://"))

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "a" in mode:
            raise NotImplementedError(f"noappend: cannot open {path} in mode {mode!r}")
        return super()._open(path, mode, *args, **kwargs)


class LoggerOutsideFiles(Logger):
    """A logger of a service: it keeps the metrics in memory and has no log directory."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[Optional[int], dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "service"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class TrailAtCheckpoints(Callback):
    """Reads the uploaded trail whenever a checkpoint is saved (after the gradwatch callback)."""

    def __init__(self, trail: str) -> None:
        self.trail = trail
        self.seen: dict[int, list[int]] = {}

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: Any) -> None:
        fs = NoAppendFileSystem()
        lines = fs.cat_file(self.trail).decode().splitlines() if fs.exists(self.trail) else []
        self.seen[trainer.global_step] = [json.loads(line)["step"] for line in lines]


@pytest.fixture
def noappend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    fsspec.register_implementation("noappend", NoAppendFileSystem, clobber=True)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where the spool goes
    (tmp_path / "tmp").mkdir()
    yield f"noappend://run-{uuid.uuid4().hex[:10]}"
    NoAppendFileSystem.store.clear()


def test_store_that_cannot_append_gets_a_spool_uploaded_at_checkpoints_and_end(
    cwd: Path, tmp_path: Path, noappend: str, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    trail = f"{noappend}/{ALERTS}"
    fs = NoAppendFileSystem()
    # An earlier run's line: the spool starts from it, so the upload keeps it.
    fs.pipe_file(trail, b'{"step": -7, "rule": "earlier"}\n')
    probe = TrailAtCheckpoints(trail)
    checkpoints = ModelCheckpoint(dirpath=f"{noappend}/ckpt", every_n_train_steps=2, save_top_k=-1)
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[warn_on_every_step()])
    trainer = memory_trainer(noappend, [callback, probe, checkpoints], logger=LoggerOutsideFiles())
    with caplog.at_level(logging.INFO):
        trainer.fit(FaultNet(depth=3))

    [notice] = info_lines(caplog, "cannot append")
    match = re.search(r"written to the local file (\S+) and copied whole to (\S+) at each", notice)
    assert match is not None, notice
    spool, target = Path(match.group(1)), match.group(2)
    assert target == trail and spool.is_relative_to(tmp_path / "tmp") and spool.name == ALERTS
    # At each checkpoint the trail held every alert so far; at the end, all of them.
    assert probe.seen == {2: [-7, 0, 1], 4: [-7, 0, 1, 2, 3]}
    uploaded = fs.cat_file(trail)
    assert uploaded == spool.read_bytes()
    assert [json.loads(line)["step"] for line in uploaded.decode().splitlines()] == [-7, 0, 1, 2, 3]
    assert list(cwd.iterdir()) == []


class FailsAtStep(FaultNet):
    """Raises in ``training_step`` at step ``fail_step`` (a crash the run does not survive)."""

    def __init__(self, fail_step: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_step = fail_step

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.trainer.global_step == self.fail_step:
            raise RuntimeError("the run fails here")
        return super().training_step(batch, batch_idx)


def test_spooled_trail_is_uploaded_when_the_fit_fails(cwd: Path, noappend: str) -> None:
    torch.manual_seed(0)
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[warn_on_every_step()])
    trainer = memory_trainer(
        noappend, [callback], logger=LoggerOutsideFiles(), enable_checkpointing=False
    )
    with pytest.raises(RuntimeError, match="the run fails here"):
        trainer.fit(FailsAtStep(fail_step=3, depth=3))

    lines = NoAppendFileSystem().cat_file(f"{noappend}/{ALERTS}").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]
    assert list(cwd.iterdir()) == []


# -- loggers whose log_dir is not a path ----------------------------------------------------------


class MagicDirLogger(LoggerOutsideFiles):
    log_dir = MagicMock()  # type: ignore[assignment]


class IntDirLogger(LoggerOutsideFiles):
    @property
    def log_dir(self) -> Any:
        return 3


class FailingDirLogger(LoggerOutsideFiles):
    @property
    def log_dir(self) -> Optional[str]:
        raise AttributeError("no log_dir before the service connects")


@pytest.mark.parametrize(
    ("logger_class", "why"),
    [
        (LoggerOutsideFiles, "log_dir is None"),
        (MagicDirLogger, "log_dir is not a path but a MagicMock"),
        (IntDirLogger, "log_dir is not a path but a int"),
        (FailingDirLogger, "no log_dir attribute"),
    ],
    ids=["none", "magicmock", "int", "missing"],
)
def test_logger_without_a_log_dir_puts_the_trail_in_default_root_dir(
    cwd: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, logger_class: type, why: str
) -> None:
    torch.manual_seed(0)
    root = tmp_path / "root"
    logger = logger_class()
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[warn_on_every_step()])
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        callbacks=[callback],
        logger=logger,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(FaultNet(depth=3))

    assert trainer.global_step == STEPS
    trail = root / ALERTS
    assert [r["step"] for r in read_alerts(str(trail))] == list(range(STEPS))
    [line] = info_lines(caplog, "has no log directory")
    assert f"({logger_class.__name__})" in line and why in line and str(trail) in line
    # The figures still reach the logger.
    assert [step for step, metrics in logger.metrics if "grad_norm_total" in metrics] == list(
        range(STEPS)
    )
    assert list(cwd.iterdir()) == []  # a MagicMock's __fspath__ is a relative path: not used
