"""The diagnosis checks: :func:`diagnose` turns a run's history and model facts into findings.

The flow checks (vanishing, exploding, Post-LN) live in :mod:`lightning_gradwatch.diagnosis.flow_checks`,
the update-ratio check in :mod:`lightning_gradwatch.diagnosis.update_checks`;
here are the checks on parameters (dead units, disconnected and dead parameters), on clipping and on
the batch size, and :data:`CHECKS`, the list of every check. Each is a :data:`FindingCheck`: it
returns a :class:`~lightning_gradwatch.diagnosis.findings.Finding` or ``None``; thresholds are module
constants (heuristics: each finding says which numbers crossed them).

Pure: no tensors, no Lightning.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from lightning_gradwatch.diagnosis.findings import (
    Finding,
    FlowSummary,
    fmt,
    quantile,
    short_list,
    summarize,
)
from lightning_gradwatch.diagnosis.flow_checks import (
    HE_INIT,
    RELU_FAMILY,
    blocks_text,
    exploding_flow,
    post_norm_gains,
    vanishing_flow,
)
from lightning_gradwatch.diagnosis.remedies import GENERIC
from lightning_gradwatch.diagnosis.run_history import RunHistory
from lightning_gradwatch.diagnosis.update_checks import update_ratio_range

__all__ = ["CHECKS", "FindingCheck", "diagnose"]

#: Median ``grad_stats/zero_fraction`` at or above this points to dead units.
DEAD_ZERO_FRACTION = 0.5
#: Share of the measured steps on which a clip bound acts that makes it "most steps".
CLIP_MOST = 0.5
#: Batch / noise scale outside ``[1 / NOISE_FACTOR, NOISE_FACTOR]`` is far from the critical batch.
NOISE_FACTOR = 10.0
#: Measured steps with a noise scale before its average is trusted beyond "low" confidence.
NOISE_SETTLED = 5

#: A sharpness ratio at or above this is at the edge of stability (1: the optimizer's threshold).
EDGE_RATIO = 0.9
#: The most recent curvature steps the edge-of-stability check reads.
EDGE_RECENT = 5

#: A check: the run's history and its summary in, a finding (or ``None``: nothing found) out.
FindingCheck = Callable[[RunHistory, FlowSummary], Optional[Finding]]


def dead_units(history: RunHistory, s: FlowSummary) -> Optional[Finding]:
    """Many exactly-zero gradient entries with ReLU-family activations in the blocks."""
    zf, facts = s.zero_fraction, history.facts
    relu = facts.blocks_with(RELU_FAMILY) if facts else {}
    if zf is None or zf < DEAD_ZERO_FRACTION or (facts is not None and not relu):
        return None
    evidence = [
        f"median gradient zero fraction {zf:.0%} over {s.span}: that share of "
        "parameter-gradient entries is exactly zero"
    ]
    evidence += [f"ReLU-family activation {name} in {blocks_text(b)}" for name, b in relu.items()]
    share = facts.embedding_params / facts.trainable if facts and facts.trainable else 0.0
    relu_blocks = {block for blocks in relu.values() for block in blocks}
    he = bool(relu_blocks) and all(
        b.init_schemes == ["he"] for b in (facts.blocks if facts else []) if b.name in relu_blocks
    )
    if facts is None:
        evidence += ["the activations cannot be checked", GENERIC]
    elif share > 0:
        evidence.append(f"embeddings hold {share:.0%} of the trainable parameters (unused rows "
                        "also get zero gradients)")  # fmt: skip
    confidence = "low" if facts is None or share >= 0.1 else "high" if zf >= 0.8 else "medium"
    return Finding(
        "dead_units",
        "Dead units: many gradient entries are exactly zero",
        confidence,
        evidence,
        [
            "use LeakyReLU or GELU (no zero-gradient region), or check the biases"
            + (
                " (a negative bias shift kills ReLU units; the init is already He-scaled)"
                if he
                else f" and init (a negative bias shift kills ReLU units; {HE_INIT})"
            ),
            "lower the learning rate (large updates push units into the dead region)",
        ],
        blocks=sorted(relu_blocks),
        figures={"zero_fraction": zf, "embedding_share": share},
    )


def disconnected_parameters(history: RunHistory, s: FlowSummary) -> Optional[Finding]:
    """Parameters that require grad but got ``grad is None`` on the first measured step."""
    wiring = history.wiring
    if wiring is None or not wiring.no_grad:
        return None
    return Finding(
        "disconnected_parameters",
        "Disconnected parameters: no gradient at all (grad is None)",
        "high",
        [
            f"{len(wiring.no_grad)} parameter(s) require grad but got `grad is None` at step "
            f"{wiring.step} (not connected to the loss): {short_list(wiring.no_grad)}"
        ],
        [
            "check that forward uses them (a branch not taken, .detach(), a tensor rebuilt from "
            "numpy or .item()); if unused on purpose, set requires_grad=False",
        ],
        blocks=list(wiring.no_grad),
        figures={"no_grad": len(wiring.no_grad)},
    )


def dead_parameters(history: RunHistory, s: FlowSummary) -> Optional[Finding]:
    """Parameters connected to the loss whose gradient was exactly zero everywhere."""
    wiring = history.wiring
    if wiring is None or not wiring.zero_grad:
        return None
    return Finding(
        "dead_parameters",
        "Dead parameters: connected, but the gradient is exactly zero",
        "high",
        [
            f"{len(wiring.zero_grad)} parameter(s) got an all-zero gradient at step {wiring.step} "
            f"(connected, but every local derivative is zero): {short_list(wiring.zero_grad)}"
        ],
        [
            "look for what zeroes them: dead ReLU units feeding them, a multiplication by zero, "
            "a mask, or a saturated activation",
        ],
        blocks=list(wiring.zero_grad),
        figures={"zero_grad": len(wiring.zero_grad)},
    )


def clipping_always(history: RunHistory, s: FlowSummary) -> Optional[Finding]:
    """A norm-clipping bound below the typical total norm: it acts on most measured steps."""
    if not s.totals:
        return None
    firing = []
    for bound in history.settings.clip_bounds:
        trips = sum(1 for total in s.totals if total > bound.threshold)
        if trips >= CLIP_MOST * len(s.totals):
            firing.append((bound, trips))
    if not firing:
        return None
    n = len(s.totals)
    median, high = quantile(s.totals, 0.5), quantile(s.totals, 0.9)
    evidence = [
        f"the total norm exceeded the {b.source} bound {fmt(b.threshold)} on {trips} of {n} "
        "measured step(s)" + ("" if b.target is None else f" (clipping to {fmt(b.target)})")
        for b, trips in firing
    ]
    evidence.append(f"observed total norms: median {fmt(median)}, 90th percentile {fmt(high)}")
    share = min(trips for _, trips in firing) / n
    return Finding(
        "clipping_always",
        "Clipping acts on most steps: the clip bound is below the typical gradient norm",
        "high" if share >= 0.9 and n >= 5 else "medium" if n >= 3 else "low",
        evidence,
        [
            f"set the bound near the 90th percentile of the observed total norms, about "
            f"{fmt(high)}, so that it catches outlier steps only",
            "if every update should be smaller, lower the learning rate instead (clipping on "
            "every step is a learning-rate cut that varies with the gradient norm)",
        ],
        figures={"median_total": median, "p90_total": high, "measured": n},
    )


def batch_vs_noise_scale(history: RunHistory, s: FlowSummary) -> Optional[Finding]:
    """The batch is far from the gradient noise scale (the critical batch size estimate)."""
    if s.noise is None:
        return None
    b_simple, batch, count = s.noise
    ratio = batch / b_simple if b_simple > 0 else math.inf
    if 1 / NOISE_FACTOR < ratio < NOISE_FACTOR:
        return None
    evidence = [
        f"gradient noise scale b_simple = {fmt(b_simple)} samples (smoothed; {count} estimate(s) "
        f"in the window) against a global batch of {fmt(batch)}: {fmt(ratio)}x"
    ]
    if ratio <= 1 / NOISE_FACTOR:
        title = "Batch far below the gradient noise scale: larger batches would scale well"
        change = [
            f"raise the batch toward {fmt(b_simple)} samples (more ranks or accumulation) and "
            "scale the learning rate with it: steps drop almost in proportion",
        ]
    else:
        title = "Batch far above the gradient noise scale: compute per step is mostly wasted"
        change = [
            f"use a batch nearer {fmt(b_simple)} samples and more steps: the same progress for "
            "less compute (b_simple grows as the loss falls: check again later in training)",
        ]
    return Finding(
        "batch_vs_noise_scale",
        title,
        "medium" if count >= NOISE_SETTLED else "low",
        evidence,
        change,
        figures={"b_simple": b_simple, "batch_size": batch, "ratio": ratio, "measured": count},
    )


def edge_of_stability(history: RunHistory, s: FlowSummary) -> Optional[Finding]:
    """The sharpness sits at the optimizer's stability threshold on most recent curvature steps
    (Cohen et al. 2021): the loss will oscillate or spike."""
    recent = [r for r in history.steps if r.sharpness_ratio is not None][-EDGE_RECENT:]
    ratios = [r.sharpness_ratio for r in recent if r.sharpness_ratio is not None]
    at_edge = [x for x in ratios if x >= EDGE_RATIO]
    if len(ratios) < 2 or 2 * len(at_edge) <= len(ratios):
        return None
    evidence = [
        f"sharpness ratio (top Hessian eigenvalue over the optimizer's stability threshold) >= "
        f"{fmt(EDGE_RATIO)} on {len(at_edge)} of the last {len(ratios)} curvature steps "
        f"(steps {recent[0].step}..{recent[-1].step}; latest {fmt(ratios[-1])}, highest "
        f"{fmt(max(ratios))})"
    ]
    return Finding(
        "edge_of_stability",
        "At the edge of stability: the sharpness has reached what the learning rate tolerates",
        "high" if len(at_edge) == len(ratios) and len(ratios) >= 3 else "medium",
        evidence,
        [
            f"lower the learning rate (by ~{fmt(max(ratios))}x or more brings the ratio back "
            "under 1), or decay it from here",
            "add or lengthen learning-rate warm-up, so that the sharpness is not driven to the "
            "edge early; a larger batch also lowers the noise that spikes there",
        ],
        figures={"latest_ratio": ratios[-1], "max_ratio": max(ratios), "at_edge": len(at_edge)},
    )


#: Every check, in the order findings are listed.
CHECKS: tuple[FindingCheck, ...] = (
    disconnected_parameters,
    dead_parameters,
    vanishing_flow,
    exploding_flow,
    post_norm_gains,
    dead_units,
    clipping_always,
    batch_vs_noise_scale,
    edge_of_stability,
    update_ratio_range,
)


def diagnose(history: RunHistory) -> list[Finding]:
    """Every finding that ``history`` supports (empty: nothing found; see ``healthy_summary``).

    Example::

        history = RunHistory(["blocks.0", "blocks.1", "blocks.2"])
        history.add(0, [1e-6, 1e-3, 1.0])
        [finding.name for finding in diagnose(history)]  # ['vanishing_flow']
    """
    summary = summarize(history)
    return [f for f in (check(history, summary) for check in CHECKS) if f is not None]
