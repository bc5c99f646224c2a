"""The DDP curvature run: ``python tests/curvature_worker.py ddp OUT`` (Lightning's launcher runs it
again for rank 1). Two CPU processes over gloo, each on its own data (``use_distributed_sampler=False``),
curvature every 2 steps; each rank saves what its ``training_step`` saw (``rank<r>.pt``), rank 0's
CSVLogger the figures."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from curvature_models import TanhNet
from lightning.pytorch.loggers import CSVLogger

from lightning_gradwatch import GradientFlowCallback

EVERY, PROBES, STEPS = 2, 10, 5


class RankDataNet(TanhNet):
    """Rank ``r`` trains on the samples drawn with seed ``r`` (different data on each rank)."""

    def setup(self, stage: str) -> None:
        gen = torch.Generator().manual_seed(100 + self.global_rank)
        self.x = torch.randn(64, 8, generator=gen)
        self.y = torch.randn(64, 4, generator=gen)


def main(out: Path) -> None:
    module = RankDataNet(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    callback = GradientFlowCallback(
        log_curvature=True, curvature_every_n_steps=EVERY, curvature_probes=PROBES
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        use_distributed_sampler=False,
        logger=CSVLogger(str(out), name="csv", version=0),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
    )
    trainer.fit(module)
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    record = {"seen": module.seen, "calls": module.calls, "final": weights}
    torch.save(record, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[2]))
