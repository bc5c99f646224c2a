"""Example 8, two optimizers: a small GAN on 2-D data (a ring of 8 Gaussians), trained in
Lightning's manual-optimization pattern: per batch, the discriminator's backward and step, then the
generator's.

Every ``optimizer.step()`` is one ``trainer.global_step``, and the callback measures each step over
what that optimizer updates: the discriminator's blocks and parameters at its steps, the generator's
at its steps. The total gradient norm is logged per optimizer as ``grad_norm_total/Adam`` (the
discriminator's, configured first) and ``grad_norm_total/Adam-1`` (the generator's), the names
Lightning's ``LearningRateMonitor`` gives them; gains and the flow summary stay within one network.
A clip rule on ``grad_norm_total/Adam`` clips the discriminator only.

Run: ``python examples/ex08_gan.py [--root runs] [--fast]``, then ``tensorboard --logdir runs``.
"""

from __future__ import annotations

import math
import sys

import lightning.pytorch as pl
import torch
from common import example_args, tensorboard_logger, train
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientFlowCallback, Rule

LATENT = 8


def ring_of_gaussians(n: int, modes: int = 8, radius: float = 2.0, std: float = 0.05) -> Tensor:
    """``n`` points around a circle of ``modes`` Gaussian blobs (the classic GAN toy target)."""
    g = torch.Generator().manual_seed(0)
    angle = torch.randint(modes, (n,), generator=g).float() * (2 * math.pi / modes)
    centres = torch.stack([angle.cos(), angle.sin()], dim=1) * radius
    return centres + std * torch.randn(n, 2, generator=g)


def mlp(sizes: list[int], final: nn.Module) -> nn.Sequential:
    """Blocks ``Linear -> LeakyReLU`` (the last with ``final``): ``gen.0``, ``gen.1``, ..."""
    layers = [
        nn.Sequential(nn.Linear(a, b), nn.LeakyReLU(0.2) if i < len(sizes) - 2 else final)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))
    ]
    return nn.Sequential(*layers)


class GAN(pl.LightningModule):
    """A generator and a discriminator, one Adam each (discriminator first)."""

    def __init__(self, lr: float = 2e-3) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = mlp([LATENT, 64, 64, 2], nn.Identity())
        self.disc = mlp([2, 64, 64, 1], nn.Identity())
        self.lr = lr

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> None:
        (real,) = batch
        opt_disc, opt_gen = self.optimizers()  # type: ignore[misc]
        bce = nn.functional.binary_cross_entropy_with_logits
        noise = torch.randn(real.shape[0], LATENT)
        fake = self.gen(noise)

        opt_disc.zero_grad()
        real_logits, fake_logits = self.disc(real), self.disc(fake.detach())
        loss_disc = bce(real_logits, torch.ones_like(real_logits)) + bce(
            fake_logits, torch.zeros_like(fake_logits)
        )
        self.manual_backward(loss_disc)
        opt_disc.step()

        opt_gen.zero_grad()
        logits = self.disc(fake)
        loss_gen = bce(logits, torch.ones_like(logits))
        self.manual_backward(loss_gen)
        opt_gen.step()
        self.log_dict({"loss/disc": loss_disc, "loss/gen": loss_gen}, prog_bar=True)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(ring_of_gaussians(4096)), batch_size=128, shuffle=True)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        betas = (0.5, 0.999)
        return [
            torch.optim.Adam(self.disc.parameters(), lr=self.lr, betas=betas),
            torch.optim.Adam(self.gen.parameters(), lr=self.lr, betas=betas),
        ]


def main() -> int:
    args = example_args(__doc__.splitlines()[0], default_root="runs")
    steps = 20 if args.fast else 1200  # optimizer steps: two per batch
    torch.manual_seed(0)
    callback = GradientFlowCallback(
        blocks=["gen.0", "gen.1", "gen.2", "disc.0", "disc.1", "disc.2"],
        log_every_n_steps=10,
        rules=[
            Rule("nonfinite", action="halt"),
            Rule("grad_norm_total/Adam", max=5.0, action="clip", clip_to=5.0, name="clip_disc"),
        ],
    )
    model = GAN()
    logger = tensorboard_logger(args.root, "ex08_gan", "gan")
    trainer = train(model, callback, logger, max_steps=steps)
    assert callback.last is not None
    sample = model.gen(torch.randn(2048, LATENT)).detach()
    radius = sample.norm(dim=1)
    clips = sum(1 for alert in callback.alerts if alert.action == "clip")
    print(
        f"[ex08] {trainer.global_step} optimizer steps; generated points: radius "
        f"{radius.mean():.2f} +- {radius.std():.2f} (target 2.00); discriminator clipped at "
        f"{clips} step(s); logs in {logger.log_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
