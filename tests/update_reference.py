"""Independent reference for the update figures (``log_updates=True``): the parameters copied before
``optimizer.step()`` and read after it, the gradients the step used and the optimizer's state, turned
into the expected keys in float64 with plain torch ops (no code shared with ``lightning_gradwatch``).

Tolerance of the comparisons: 1e-5 relative. ``after - before`` of a float32 weight is exact
(Sterbenz: a step moves each weight by far less than half its value) and is taken the same way here;
what differs is the accumulation: the callback sums squares in float32 per tensor (relative error
about n * 6e-8 for a tensor of n elements, at most 1e-6 for these models' 4k-element tensors), this
reference in float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from torch import Tensor

#: See the module docstring.
REL = 1e-5


def _sq(tensors: Sequence[Tensor]) -> float:
    return sum(float(t.double().square().sum()) for t in tensors)


def _ratio(update_sq: float, weight_sq: float) -> float:
    return 0.0 if update_sq == 0.0 else math.sqrt(update_sq / weight_sq)


def ref_update_metrics(
    before: Mapping[str, Tensor],
    after: Mapping[str, Tensor],
    grads: Mapping[str, Optional[Tensor]],
    blocks: Sequence[str],
    *,
    state: Optional[Mapping[str, Mapping[str, Any]]] = None,
    optimizer: Optional[str] = None,
) -> dict[str, float]:
    """The keys one step should log: per block (parameters named ``<block>.*``), then the totals
    (suffixed ``/<optimizer>`` with several optimizers). ``state``: per parameter name, its
    ``exp_avg``, ``exp_avg_sq``, ``step``, ``eps`` and ``beta2`` (Adam-style optimizers only)."""
    names = list(before)
    delta = {n: after[n].double() - before[n].double() for n in names}
    metrics: dict[str, float] = {}
    for block in blocks:
        inside = [n for n in names if n.startswith(block + ".")]
        if inside:
            w, u = _sq([before[n] for n in inside]), _sq([delta[n] for n in inside])
            metrics[f"update_ratio/{block}"] = _ratio(u, w)
            metrics[f"weight_norm/{block}"] = math.sqrt(w)
    w, u = _sq(list(before.values())), _sq(list(delta.values()))
    present = [n for n in names if grads.get(n) is not None]
    g = _sq([grads[n] for n in present])  # type: ignore[misc]
    dot = sum(float((delta[n] * -grads[n].double()).sum()) for n in present)  # type: ignore[union-attr]
    totals = {
        "update_ratio_total": _ratio(u, w),
        "weight_norm_total": math.sqrt(w),
        "update_norm_total": math.sqrt(u),
        "optim/update_grad_cosine": 0.0 if u == 0 or g == 0 else dot / math.sqrt(u * g),
    }
    if state:
        below = numel = 0
        for entry in state.values():
            v_hat = entry["exp_avg_sq"].double() / (1.0 - entry["beta2"] ** float(entry["step"]))
            below += int((v_hat.sqrt() < entry["eps"]).sum())
            numel += entry["exp_avg_sq"].numel()
        totals["optim/eps_fraction"] = below / numel
        totals["optim/moment_norm"] = math.sqrt(_sq([e["exp_avg"] for e in state.values()]))
    for key, value in totals.items():
        metrics[key if optimizer is None else f"{key}/{optimizer}"] = value
    return metrics


def adam_state(
    optimizer: Any, named: Mapping[str, Tensor], full: Any = lambda t: t
) -> dict[str, dict[str, Any]]:
    """Per parameter name, a copy of its Adam-style state (``full``: DTensor -> full tensor),
    with its group's ``eps`` and ``beta2``; empty for optimizers without such state."""
    inner = getattr(optimizer, "optimizer", optimizer)
    group_of = {id(p): group for group in inner.param_groups for p in group["params"]}
    out = {}
    for name, p in named.items():
        entry = inner.state.get(p, {})
        if "exp_avg" in entry and "exp_avg_sq" in entry:
            group = group_of[id(p)]
            out[name] = {
                "exp_avg": full(entry["exp_avg"]).detach().clone(),
                "exp_avg_sq": full(entry["exp_avg_sq"]).detach().clone(),
                "step": float(entry["step"]),
                "eps": group["eps"],
                "beta2": group["betas"][1],
            }
    return out


class UpdateRecording:
    """A LightningModule mixin (automatic optimization): ``optimizer_step`` copies every parameter
    before ``optimizer.step()`` (the closure inside it runs forward and backward, which change no
    weight) and after it, with the gradients the step used and the optimizer's state:
    ``update_refs[global step]``."""

    update_refs: dict[int, dict[str, Any]]

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        if not hasattr(self, "update_refs"):
            self.update_refs = {}
        step = self.trainer.global_step  # type: ignore[attr-defined]
        named = dict(self.named_parameters())  # type: ignore[attr-defined]
        before = {n: p.detach().clone() for n, p in named.items()}
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # type: ignore[misc]
        self.update_refs[step] = {
            "before": before,
            "after": {n: p.detach().clone() for n, p in named.items()},
            "grads": {
                n: None if p.grad is None else p.grad.detach().clone() for n, p in named.items()
            },
            "state": adam_state(optimizer, named),
        }

    def expected_updates(self, step: int, blocks: Sequence[str]) -> dict[str, float]:
        ref = self.update_refs[step]
        return ref_update_metrics(
            ref["before"], ref["after"], ref["grads"], blocks, state=ref["state"]
        )
