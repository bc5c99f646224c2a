"""Example 5, a plain PyTorch loop with ``GradientGainMonitor`` (no Lightning, no logger).

The monitor hooks the blocks once; each backward fills in the block-output gradient norms, which
stay on the device until asked for. ``reset()`` before every backward (strict single-backward mode
raises on a second backward otherwise). The ``GradientGainMonitor`` API.

Run: ``python examples/ex05_plain_pytorch.py [--fast]``
"""

from __future__ import annotations

import sys

import torch
from common import MLPBlock, example_args, init_linear, make_classification
from torch import nn

from lightning_gradwatch import GradientGainMonitor


def main() -> int:
    args = example_args(__doc__.splitlines()[0], default_root="runs")
    steps = 5 if args.fast else 300
    torch.manual_seed(0)
    blocks = nn.ModuleList(MLPBlock(32, "tanh") for _ in range(8))
    init_linear(blocks, "xavier")
    model = nn.Sequential(nn.Linear(16, 32), *blocks, nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = make_classification(512, 16).tensors

    with GradientGainMonitor(blocks, norm_type="l2") as monitor:
        for step in range(steps):
            batch = torch.randint(0, len(x), (64,))
            monitor.reset()  # one backward per measurement
            optimizer.zero_grad()
            loss = nn.functional.binary_cross_entropy_with_logits(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
            if step % max(1, steps // 5) == 0:
                stats = monitor.summary_stats()
                print(
                    f"[ex05] step {step:3d}: loss {loss.item():.3f}, mean gain "
                    f"{stats['mean_gain']:.3f}, damping {stats['num_damping']}, "
                    f"healthy {stats['num_healthy']}"
                )
        print(monitor.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
