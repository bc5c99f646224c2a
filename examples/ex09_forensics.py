"""Example 9, bad-batch forensics: an incident from the alert to the resumed run.

A classifier trains on a dataset in which one batch was logged in the wrong unit (its features x
1000): it comes back in every epoch, at the same index. Once, the "accelerator" also corrupts the
model's output (a simulated flaky device: the first execution of one step only). A loss rule skips
the optimizer step of both and asks for a rerun (``rerun=True``):

1. every alert names its batch: epoch, ``batch_idx``, the batch's fingerprint and the rank;
2. the rerun tells the two apart: the bad data trips again (``reproducible``), the flaky device
   does not (``transient``);
3. the bad batch's steps go into ``gradwatch_skipped_batches.json`` (the transient one does not:
   its data is fine);
4. a second run resumed from the checkpoint taken after the first epoch, with no rule at all but
   ``skip_batches="auto"``, skips the bad batch again by its fingerprint and ends with exactly the
   weights of the first run;
5. ``gradwatch report`` lists the incidents; TensorBoard's TEXT tab has one entry per incident.

Run: ``python examples/ex09_forensics.py [--root runs] [--fast]``
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from common import MLPClassifier, example_args, make_classification, report, tensorboard_logger
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor

from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.governance.skip_list import SKIP_LIST_FILENAME

BATCH = 32
BAD_BATCH = 5  # the index of the batch with features in the wrong unit, in every epoch


class FlakyDevice(MLPClassifier):
    """The classifier, on a device that corrupts the output of step ``flaky_step``'s first
    execution (a rerun of the same batch comes out clean)."""

    def __init__(self, flaky_step: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.flaky_step = flaky_step
        self.glitched = False
        self.first_batch: Optional[tuple[int, int]] = None  # (epoch, batch_idx) this fit began at

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.first_batch is None:
            self.first_batch = (self.current_epoch, batch_idx)

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if self.trainer.global_step == self.flaky_step and not self.glitched:
            self.glitched = True
            out = out * 1e4
        return out

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.dataset, batch_size=BATCH)  # a fixed order


def fit(
    model: pl.LightningModule,
    callback: GradientFlowCallback,
    logger: Any,
    steps: int,
    checkpoint: Optional[ModelCheckpoint] = None,
    resume: Optional[str] = None,
) -> None:
    """Train on CPU for ``steps`` steps (with ``checkpoint`` saving; from ``resume``)."""
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        callbacks=[callback] if checkpoint is None else [callback, checkpoint],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        enable_checkpointing=checkpoint is not None,
    )
    trainer.fit(model, ckpt_path=resume)


def main() -> int:
    args = example_args(__doc__.splitlines()[0], default_root="runs")
    per_epoch = 8 if args.fast else 32
    data = make_classification(per_epoch * BATCH, 16, seed=3)
    data.tensors[0][BAD_BATCH * BATCH : (BAD_BATCH + 1) * BATCH] *= 1000.0  # the wrong unit
    flaky_step = 2
    steps = 2 * per_epoch
    root = Path(args.root) / "ex09_forensics"

    def make() -> FlakyDevice:
        torch.manual_seed(0)
        return FlakyDevice(flaky_step, depth=3, width=32, lr=0.05, dataset=data)

    # 1-3: the incidents, with a checkpoint after the first epoch.
    model = make()
    rule = Rule("loss", max=2.0, action="skip", rerun=True, name="bad_batch")  # BCE starts ~0.7
    callback = GradientFlowCallback(log_every_n_steps=4, rules=[rule])
    logger = tensorboard_logger(args.root, "ex09_forensics", "incident")
    # Saved after each epoch's last batch: a resume then starts the next epoch at its first batch.
    every_epoch = ModelCheckpoint(
        root / "checkpoints", every_n_train_steps=per_epoch, save_top_k=-1
    )
    fit(model, callback, logger, steps, checkpoint=every_epoch)
    for alert in callback.alerts:
        verdict = alert.rerun["verdict"] if alert.rerun else "-"
        print(
            f"[ex09] step {alert.step}: epoch {alert.epoch}, batch {alert.batch_idx}, "
            f"fingerprint {alert.fingerprints[0]}, rank {alert.origin_rank}, "
            f"action {alert.action}, rerun {verdict}"
        )
    listed = Path(logger.log_dir) / SKIP_LIST_FILENAME
    print(f"[ex09] skip list {listed}:\n{listed.read_text().strip()}")

    # 4: resumed from the checkpoint after epoch 0, no rule, the skip list replayed.
    checkpoint = root / "checkpoints" / f"epoch=0-step={per_epoch}.ckpt"
    resumed = make()
    replay = GradientFlowCallback(log_every_n_steps=4, rules=[], skip_batches="auto")
    again = tensorboard_logger(args.root, "ex09_forensics", "resumed")
    fit(resumed, replay, again, steps, resume=str(checkpoint))
    for alert in replay.alerts:
        print(f"[ex09] resumed: {alert.message}")
    print(f"[ex09] resumed at (epoch, batch) {resumed.first_batch}")
    if resumed.first_batch == (1, 0):  # where the first run was when the checkpoint was taken
        same = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
        print(f"[ex09] the resumed run ends with the first run's weights: {same}")
    else:  # Lightning 2.4 resumes such a checkpoint inside epoch 0 again: another data order
        print("[ex09] this Lightning resumed inside epoch 0 again: no like-for-like comparison")

    # 5: the report's incidents section.
    return report([Path(logger.log_dir)], args.root, "ex09_forensics")


if __name__ == "__main__":
    sys.exit(main())
