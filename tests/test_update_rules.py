"""Rules on the update figures (``log_updates=True``): known only after the optimizer step, they may
warn or halt (a halt puts the weights from before that update back, then writes the halt
checkpoint); clip and skip are refused at construction. Also: the pre-step checks leave them alone,
a misspelt block is said once, the diagnosis names blocks whose ratio is out of range, the report
reads the ratios back, and memory stays flat over a long run."""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from lightning.pytorch.loggers import TensorBoardLogger
from models import BlockNet
from update_reference import UpdateRecording

from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.diagnosis.checks import diagnose
from lightning_gradwatch.diagnosis.run_history import RunHistory
from lightning_gradwatch.governance import RuleEngine
from lightning_gradwatch.keys import is_update_metric
from lightning_gradwatch.report.findings import run_history
from lightning_gradwatch.report.pictures import UPDATES_CHART, custom_scalars_layout
from lightning_gradwatch.report.reader import read_run

pytestmark = [RULE_TRIPS, WIRING_REPORT]

BLOCKS = [f"blocks.{i}" for i in range(4)]


class JumpNet(UpdateRecording, BlockNet):
    """SGD whose learning rate jumps ``jump``-fold from step ``at`` on (a per-step schedule)."""

    def __init__(self, at: int = 3, jump: float = 100.0, **kwargs: Any) -> None:
        torch.manual_seed(0)
        super().__init__(**kwargs)
        self.at, self.jump = at, jump

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: self.jump if step >= self.at else 1.0
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def run(tmp_path: Path, model: pl.LightningModule, rules: list[Rule], steps: int, **kw: Any) -> Any:
    callback = GradientFlowCallback(log_every_n_steps=1, log_updates=True, rules=rules, **kw)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=TensorBoardLogger(tmp_path, name="tb", version=0),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
    )
    trainer.fit(model)
    return callback, trainer


# -- construction ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metric", ["update_ratio_total", "update_ratio/blocks.0", "update_ratio/*"]
)
@pytest.mark.parametrize("action", ["clip", "skip"])
def test_clip_or_skip_on_update_figures_is_refused(metric: str, action: str) -> None:
    with pytest.raises(ValueError, match=r"`action` '(clip|skip)' cannot act on .*warn.*halt"):
        Rule(metric, max=1.0, action=action, clip_to=1.0 if action == "clip" else None)


def test_which_metrics_are_read_after_the_step() -> None:
    after = ["update_ratio_total", "update_ratio/blocks.0", "update_ratio_total/Adam", "update_*",
             "weight_norm_total", "optim/eps_fraction", "update_norm_total"]  # fmt: skip
    before = ["grad_norm_total", "grad_norm/*", "*", "grad_*", "loss", "nonfinite"]
    assert all(is_update_metric(m) for m in after)
    assert not any(is_update_metric(m) for m in before)
    rule = Rule("update_ratio_total", max=1.0, action="halt")
    assert rule.after_step and not rule.checks_every_step
    assert rule.matches("update_ratio_total/Adam-1") and not rule.matches("update_ratio/blocks.0")
    Rule("update_ratio_total/Adam", max=1.0)  # several optimizers: one optimizer's total
    with pytest.raises(ValueError, match="metric"):
        Rule("update_ratios", max=1.0)


def test_the_engine_checks_update_rules_after_the_step_only() -> None:
    engine = RuleEngine([Rule("update_ratio_total", max=1.0), Rule("*", max=1.0)])
    values = {"update_ratio_total": 2.0, "grad_norm_total": 2.0}
    before = engine.evaluate(values, nonfinite=False)
    after = engine.evaluate(values, nonfinite=None, after_step=True)
    assert [c.rule.metric for c in before] == ["*"]  # the pattern never sees update figures
    assert [(c.rule.metric, c.tripped) for c in after] == [("update_ratio_total", True)]


# -- in a run -------------------------------------------------------------------------------------


def test_halt_on_update_ratio_trips_at_the_jump_and_keeps_the_weights_before_it(
    tmp_path: Path,
) -> None:
    # Without the rule: the ratios before and after the jump.
    free = JumpNet()
    callback, _ = run(tmp_path / "free", free, [], steps=5)
    ratios = [free.expected_updates(s, BLOCKS)["update_ratio_total"] for s in range(5)]
    assert max(ratios[:3]) * 10 < min(ratios[3:])
    threshold = math.sqrt(max(ratios[:3]) * min(ratios[3:]))  # between the two regimes
    model = JumpNet()
    halt = Rule("update_ratio_total", max=threshold, action="halt")
    callback, trainer = run(tmp_path / "halt", model, [halt], steps=8)
    assert callback.halted and trainer.global_step == 4  # step 3 ran, then training stopped
    [alert] = callback.alerts
    assert (alert.step, alert.action, alert.metric) == (3, "halt", "update_ratio_total")
    assert alert.value == pytest.approx(ratios[3], rel=1e-5)
    before = model.update_refs[3]["before"]  # the weights before the update that tripped
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name  # put back in the model ...
    state = torch.load(alert.checkpoint, weights_only=False)["state_dict"]
    for name, value in before.items():
        assert torch.equal(state[name], value), name  # ... and in the halt checkpoint
    trail = (tmp_path / "halt" / "tb" / "version_0" / "gradwatch_alerts.jsonl").read_text()
    record = json.loads(trail.splitlines()[0])
    assert record["metric"] == "update_ratio_total" and record["action"] == "halt"


def test_warn_on_a_block_ratio_with_patience(tmp_path: Path) -> None:
    model = JumpNet(at=100)
    warn = Rule("update_ratio/blocks.1", max=0.0, patience=2, action="warn")
    callback, _ = run(tmp_path, model, [warn], steps=4)
    assert [(a.step, a.action) for a in callback.alerts] == [
        (0, "none"), (1, "warn"), (2, "warn"), (3, "warn")
    ]  # fmt: skip
    assert not callback.halted
    want = model.expected_updates(2, BLOCKS)["update_ratio/blocks.1"]
    assert callback.alerts[2].value == pytest.approx(want, rel=1e-5)


def test_a_rule_on_a_missing_block_is_said_once(tmp_path: Path) -> None:
    rule = Rule("update_ratio/blocks.9", max=1.0)
    with pytest.warns(
        UserWarning, match=r"'update_ratio/blocks.9'.*matches none.*update_ratio/<block>"
    ):
        run(tmp_path, JumpNet(), [rule], steps=2)


def test_the_diagnosis_and_the_report_name_blocks_whose_updates_are_too_large(
    tmp_path: Path,
) -> None:
    model = JumpNet(at=0, jump=20.0)  # lr 0.2 from the first step: ratios far above 1e-2
    callback, trainer = run(tmp_path, model, [], steps=6)
    [finding] = [f for f in callback.findings if f.name == "update_ratio_range"]
    assert finding.blocks and set(finding.blocks) <= set(BLOCKS)
    assert "lower the learning rate" in " ".join(finding.suggestions)
    for block in finding.blocks:
        ratios = [model.expected_updates(s, BLOCKS)[f"update_ratio/{block}"] for s in range(6)]
        assert sum(r > 1e-2 for r in ratios) > 3
    logged = read_run(trainer.logger.log_dir)
    assert logged is not None
    assert set(logged.scalars) >= {f"update_ratio/{b}" for b in BLOCKS}
    assert written_layout(trainer.logger.log_dir)[UPDATES_CHART] == [
        *(f"update_ratio/{b}" for b in BLOCKS),
        "update_ratio_total",
    ]
    history = run_history(logged, 0.5, 2.0, 1e-30)
    kept = callback._diagnosis.history.steps
    assert [r.step for r in history.steps] == [r.step for r in kept] == list(range(6))
    for read, seen in zip(history.steps, kept):  # TensorBoard keeps float32
        assert read.update_ratios == pytest.approx(seen.update_ratios, rel=1e-6)
    assert "update_ratio_range" in [f.name for f in diagnose(history)]


def written_layout(log_dir: str) -> dict[str, list[str]]:
    """The custom-scalars layout in the run's event files: chart title -> its tags."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2

    charts: dict[str, list[str]] = {}
    for path in Path(log_dir).glob("events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "custom_scalars__config__":
                    layout = layout_pb2.Layout.FromString(value.tensor.string_val[0])
                    for category in layout.category:
                        for chart in category.chart:
                            charts[chart.title] = list(chart.multiline.tag)
    return charts


def test_tensorboard_layout_charts_the_ratios_per_block() -> None:
    layout = custom_scalars_layout(BLOCKS, ["update_ratio_total"])
    assert layout["gradwatch"][UPDATES_CHART][1] == [f"update_ratio/{b}" for b in BLOCKS] + [
        "update_ratio_total"
    ]
    assert UPDATES_CHART not in custom_scalars_layout(BLOCKS)["gradwatch"]


def test_ratios_in_range_give_no_finding() -> None:
    history = RunHistory(["a", "b"])
    for step in range(10):
        history.add(step, [1.0, 1.0])
        history.add_update_ratios(step, [1e-3, 2e-3 if step % 2 else 5e-2])
    assert [f.name for f in diagnose(history)] == []  # b is above 1e-2 on half the steps only
    history.add(10, [1.0, 1.0])
    history.add_update_ratios(10, [1e-6, 5e-2])
    low = RunHistory(["a"])
    for step in range(5):
        low.add(step, [1.0])
        low.add_update_ratios(step, [1e-6])
    [finding] = diagnose(low)
    assert (
        finding.name == "update_ratio_range" and "raise the learning rate" in finding.suggestions[0]
    )


class TensorCount(pl.Callback):
    """Live tensors and their bytes at each batch end (after the gradwatch callback's)."""

    def __init__(self) -> None:
        self.counts: list[tuple[int, int]] = []

    def on_train_batch_end(self, *args: Any) -> None:
        gc.collect()
        # issubclass(type(o)): isinstance would read torch.distributed's deprecated proxies
        tensors = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]
        self.counts.append((len(tensors), sum(t.element_size() * t.nelement() for t in tensors)))


def test_memory_is_flat_over_a_long_run(tmp_path: Path) -> None:
    counter = TensorCount()
    model = JumpNet(at=10**6)
    callback = GradientFlowCallback(log_every_n_steps=1, log_updates=True, rules=[])
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=40,
        logger=TensorBoardLogger(tmp_path, name="tb"),
        callbacks=[callback, counter],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    model.optimizer_step = super(UpdateRecording, model).optimizer_step  # type: ignore[misc]
    trainer.fit(model)
    assert len(counter.counts) == 40
    assert counter.counts[-1] == counter.counts[10]  # no snapshot, no figure kept per step
    assert callback._extras.updates._pending == {}
