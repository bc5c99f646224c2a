"""Example 10, edge of stability: the sharpness rises to 2/lr before the loss oscillates.

Full-batch gradient descent (SGD, lr 0.05) on a small tanh network (4-32-32-1, 100 regression
samples). As Cohen et al. (2021, figure 1) found, the top eigenvalue of the loss Hessian (the
sharpness) rises during training until it reaches the stability threshold 2/lr, and stays near it;
the loss then stops falling smoothly and spikes. ``log_curvature=True`` measures the sharpness every
10 steps (``curvature/hessian_max_eig``, ``curvature/sharpness_ratio`` = sharpness / (2/lr)), a warn
rule at a ratio of 0.8 trips well before the first loss rise, and the diagnosis names the
``edge_of_stability`` finding. TensorBoard's custom-scalars tab shows the sharpness against its
threshold.

Run: ``python examples/ex10_edge_of_stability.py [--root runs] [--fast]``
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
import torch
from common import example_args, report, run_dir, tensorboard_logger, train
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientFlowCallback, Rule

EXPERIMENT = "ex10_edge_of_stability"
LR = 0.05


class FullBatchTanh(pl.LightningModule):
    """A 4-32-32-1 tanh MLP trained by full-batch gradient descent; keeps every step's loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        x = torch.randn(100, 4)
        self.x, self.y = x, (x[:, :1] * x[:, 1:2]).tanh() * 2 + torch.sin(3 * x[:, 2:3])
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1)
        )
        self.losses: dict[int, float] = {}

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = nn.functional.mse_loss(self.net(batch[0]), batch[1])
        # setdefault: the callback re-runs curvature steps' batches; keep the step's own loss.
        self.losses.setdefault(self.global_step, float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=len(self.x))


def main() -> int:
    args = example_args(__doc__.splitlines()[0], default_root="runs")
    steps = 40 if args.fast else 350
    model = FullBatchTanh()
    callback = GradientFlowCallback(
        log_every_n_steps=10,
        log_curvature=True,
        curvature_every_n_steps=10,
        curvature_probes=2,
        rules=[Rule("curvature/sharpness_ratio", max=0.8, action="warn")],
    )
    logger = tensorboard_logger(args.root, EXPERIMENT, "full_batch_gd")
    train(model, callback, logger, steps, max_epochs=-1)
    losses = [model.losses[s] for s in sorted(model.losses)]
    rise = next((s for s in range(1, len(losses)) if losses[s] > losses[s - 1]), None)
    trips = [a.step for a in callback.alerts if a.metric == "curvature/sharpness_ratio"]
    print(f"[ex10] threshold 2/lr = {2 / LR:g}")
    print(f"[ex10] warn rule (ratio > 0.8) first tripped at step: {trips[0] if trips else None}")
    print(f"[ex10] the loss first went up at step: {rise}")
    for finding in callback.findings:
        if finding.name == "edge_of_stability":
            print(f"[ex10] finding: {finding.title}")
    return report([run_dir(logger)], args.root, EXPERIMENT)


if __name__ == "__main__":
    sys.exit(main())
