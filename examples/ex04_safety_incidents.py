"""Example 4, a safety-incident classifier: 10 % positives and unscaled features.

Raw sensor-like features (scales from 1 to 1000) and a rare positive class make the first layers'
gradients large and spiky. Rules turn that into governance (the policy "a norm above 5.0 means
pause and notify"): every step whose total gradient norm is above 5 is clipped by norm and
recorded, spikes are flagged, and when a corrupted batch (a NaN reading) makes the gradients NaN,
training halts before the update and a checkpoint of the last good weights is saved. Every alert lands in
``gradwatch_alerts.jsonl`` next to the logs and in the report's alert timeline.

Run: ``python examples/ex04_safety_incidents.py [--root runs] [--fast]``
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from common import (
    MLPClassifier,
    example_args,
    make_classification,
    report,
    tensorboard_logger,
    train,
)

from lightning_gradwatch import GradientFlowCallback, Rule


def main() -> int:
    args = example_args(__doc__.splitlines()[0], default_root="runs")
    batch_size, corrupt_step = 32, (8 if args.fast else 100)
    scales = torch.logspace(0, 3, 16)  # feature i is measured in units 10^(3i/15) times too small
    data = make_classification(4096, 16, positive_fraction=0.1, feature_scales=scales, seed=7)
    data.tensors[0][corrupt_step * batch_size, 3] = math.nan  # one corrupted reading
    model = MLPClassifier(
        depth=4, width=32, activation="relu", lr=1e-3, optimizer="adam", dataset=data
    )
    model.train_dataloader = lambda: torch.utils.data.DataLoader(data, batch_size=batch_size)
    rules = [
        Rule("grad_norm_total", max=5.0, action="clip", clip_to=5.0, name="norm_above_5"),
        Rule("grad_norm_total", zscore=4.0, window=50, warmup=10, action="warn", name="spike"),
        Rule("nonfinite", action="halt"),
    ]
    logger = tensorboard_logger(args.root, "ex04_safety_incidents", "incident_classifier")
    callback = GradientFlowCallback(log_every_n_steps=2, rules=rules)
    train(model, callback, logger, max_steps=corrupt_step + 40)
    by_action: dict[str, int] = {}
    for alert in callback.alerts:
        by_action[alert.action] = by_action.get(alert.action, 0) + 1
    print(f"[ex04] alerts by action: {by_action}")
    print(f"[ex04] halted: {callback.halted} ({callback.halt_reason})")
    checkpoints = [a.checkpoint for a in callback.alerts if a.checkpoint]
    print(f"[ex04] halt checkpoint: {checkpoints[0] if checkpoints else None}")
    print(f"[ex04] audit trail: {Path(logger.log_dir) / 'gradwatch_alerts.jsonl'}")
    print("[ex04] total_norm.png in the report marks the clip and halt alerts")
    return report([Path(logger.log_dir)], args.root, "ex04_safety_incidents")


if __name__ == "__main__":
    sys.exit(main())
