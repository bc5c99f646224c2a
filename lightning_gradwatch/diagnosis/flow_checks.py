"""The flow checks of the diagnosis: vanishing, exploding, and Post-LN gains that compound with depth.

Each check reads the :class:`~lightning_gradwatch.diagnosis.findings.FlowSummary` (medians over the
measured steps) and the model facts, and returns a
:class:`~lightning_gradwatch.diagnosis.findings.Finding` or ``None``.
Thresholds are module constants, chosen so that a textbook case (a sigmoid MLP, std-5 init, a
Post-LN stack) is found and a Pre-LN residual net is not; they are heuristics, and each finding
says which numbers crossed them. :func:`lightning_gradwatch.diagnosis.checks.diagnose` runs them all.

Pure: no tensors, no Lightning.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from lightning_gradwatch.diagnosis.findings import Finding, FlowSummary, fmt, short_list
from lightning_gradwatch.diagnosis.model_facts import ModelFacts
from lightning_gradwatch.diagnosis.remedies import GENERIC, PRE_LN, WARMUP_OR_LOWER, Structure
from lightning_gradwatch.diagnosis.run_history import ClipBound, RunHistory
from lightning_gradwatch.numerics.norms import Category

__all__ = [
    "HE_INIT",
    "RELU_FAMILY",
    "SATURATING",
    "blocks_text",
    "exploding_flow",
    "post_norm_gains",
    "vanishing_flow",
]

#: Activations whose derivative tends to 0 on both sides (saturation).
SATURATING = ("Sigmoid", "Tanh", "Hardtanh", "Softsign", "Hardsigmoid", "LogSigmoid")
#: Activations with an exactly-zero gradient region (units can die).
RELU_FAMILY = ("ReLU", "ReLU6", "Threshold")
#: End-to-end gain at or below this is "tiny" (the first block gets 10x less gradient).
TINY_END_TO_END = 0.1
#: End-to-end gain at or above this, with amplifying transitions, is exploding.
LARGE_END_TO_END = 10.0
#: End-to-end gain at or above this is exploding whatever the transitions.
HUGE_END_TO_END = 1e3
#: Total norm growth (median of the last 3 over the first 3 measured steps) that is exploding.
FAST_GROWTH = 100.0
#: ``weight.std() * sqrt(fan_in)`` above this is a large init (He gives 1.41).
LARGE_INIT = 2.0
#: ``weight.std() * sqrt(fan_in)`` below this is a small init for ReLU (PyTorch's default: 0.58).
SMALL_INIT = 1.0
#: Post-LN: share of transitions moving the norm the same way, and the compounded factor.
POST_NORM_SAME_WAY = 2 / 3
POST_NORM_FACTOR = 2.0
#: The init to suggest for ReLU-family layers.
HE_INIT = "nn.init.kaiming_normal_(weight, nonlinearity='relu')"
#: The suggestions of the flow checks to take when no model facts say what the blocks have.
_GENERIC_RESIDUAL = (
    "add normalisation (LayerNorm/BatchNorm) inside each block and residual connections "
    "(x + f(x)), so the gradient keeps an identity path"
)
_GENERIC_INIT = "use He (ReLU/GELU) or Xavier (tanh) initialisation: std about sqrt(2/fan_in)"
_GENERIC_NORM = "add normalisation (LayerNorm/BatchNorm) inside the blocks"
#: At most this many suggestions per finding, most promising first.
MAX_SUGGESTIONS = 3


def vanishing_flow(history: RunHistory, s: FlowSummary) -> Optional[Finding]:
    """Most transitions shrink the gradient and the end-to-end gain is tiny (or no gradient at all
    reaches most blocks' outputs)."""
    present = s.present
    if present == 0:
        return None
    zero = s.count(Category.VANISHING)
    damping = s.count(Category.DAMPING)
    shrinking = sum(1 for g in s.gains if g is not None and g < 1.0)
    tiny = s.end_to_end is not None and s.end_to_end <= TINY_END_TO_END
    if not ((tiny and shrinking + zero > present / 2) or zero > present / 2):
        return None
    lo = history.settings.damping_threshold
    evidence = [
        f"{shrinking} of {present} transitions shrink the gradient going backward "
        f"({damping} below the damping threshold {fmt(lo)}); median gains: {s.gain_list()}"
    ]
    if s.end_to_end is not None and math.isfinite(s.end_to_end):
        evidence.append(_end_to_end_sentence(s))
    if zero:
        evidence.append(f"{zero} transition(s) carry no gradient at all (output norm <= eps)")
    facts = history.facts
    saturating = facts.blocks_with(SATURATING) if facts else {}
    evidence += [
        f"saturating activation {name} in {blocks_text(b)}" for name, b in saturating.items()
    ]
    ratio, layer = _init_extreme(facts, min)
    relu = bool(facts and facts.blocks_with(RELU_FAMILY))
    small_init = relu and ratio is not None and ratio < SMALL_INIT
    if small_init and ratio is not None:
        evidence.append(_init_sentence(ratio, layer))
    said, suggestions = _vanishing_fixes(facts, list(saturating), small_init)
    strong = damping + zero > present / 2 and (zero > present / 2 or _below(s, 1e-3))
    return Finding(
        "vanishing_flow",
        "Vanishing gradient flow: early blocks get little or no gradient",
        "high" if strong else "medium",
        evidence + said,
        suggestions,
        blocks=[t for t, g in zip(s.transitions, s.gains) if g is not None and g < 1.0],
        figures=_flow_figures(s) | {"shrinking": shrinking, "zero": zero},
    )


def exploding_flow(history: RunHistory, s: FlowSummary) -> Optional[Finding]:
    """Amplifying transitions with a large end-to-end gain, a huge end-to-end gain, a fast-growing
    total norm, or infinite total norms."""
    amplifying = s.count(Category.AMPLIFYING)
    e2e = s.end_to_end if s.end_to_end is not None and math.isfinite(s.end_to_end) else None
    ends = _ends(s)
    growth = ends[1] / ends[0] if ends is not None and ends[0] > 0 else None
    by_blocks = e2e is not None and (
        (amplifying > s.present / 2 and e2e >= LARGE_END_TO_END) or e2e >= HUGE_END_TO_END
    )
    by_total = growth is not None and growth >= FAST_GROWTH
    if not (by_blocks or by_total or s.infinite_totals):
        return None
    evidence = []
    if by_blocks:
        hi = history.settings.amplifying_threshold
        evidence.append(
            f"{amplifying} of {s.present} transitions grow the gradient above the amplifying "
            f"threshold {fmt(hi)}; median gains: {s.gain_list()}"
        )
        evidence.append(_end_to_end_sentence(s))
    if by_total and ends is not None:
        evidence.append(
            f"the total gradient norm grew {fmt(growth)}x over the run (median of the first 3 "
            f"measured steps {fmt(ends[0])} -> of the last 3 {fmt(ends[1])})"
        )
    if s.infinite_totals:
        evidence.append(f"{s.infinite_totals} measured step(s) had an infinite total norm")
    ratio, layer = _init_extreme(history.facts, max)
    if ratio is not None:
        evidence.append(_init_sentence(ratio, layer))
    said, suggestions = _exploding_fixes(history, ratio is not None and ratio > LARGE_INIT)
    high = (e2e is not None and e2e >= HUGE_END_TO_END) or (growth or 0) >= 1e3
    return Finding(
        "exploding_flow",
        "Exploding gradient flow: gradients grow going backward or over the steps",
        "high" if high or s.infinite_totals else "medium",
        evidence + said,
        suggestions,
        blocks=[t for t, c in zip(s.transitions, s.categories) if c == Category.AMPLIFYING],
        figures=_flow_figures(s) | {"growth": growth, "init_ratio": ratio, "init_layer": layer},
    )


def post_norm_gains(history: RunHistory, s: FlowSummary) -> Optional[Finding]:
    """Post-LN blocks (``norm(x + f(x))``) whose gains move the norm the same way block after block,
    compounding with depth."""
    facts = history.facts
    if facts is None:
        return None
    post = [b for b in facts.blocks if b.post_norm]
    logs = [math.log(g) for g in s.gains if g is not None and 0 < g < math.inf]
    if len(post) < max(2, len(facts.blocks) / 2) or len(logs) < 2 or s.end_to_end is None:
        return None
    down = sum(1 for v in logs if v < 0)
    same = max(down, len(logs) - down)
    factor = s.end_to_end
    if same < POST_NORM_SAME_WAY * len(logs) or 1 / POST_NORM_FACTOR < factor < POST_NORM_FACTOR:
        return None
    way = "shrink" if down > len(logs) - down else "grow"
    norms = sorted({n for b in post for n in b.norms})
    return Finding(
        "post_norm_gains",
        "Post-LN blocks: the gradient changes block after block, compounding with depth",
        "medium",  # the Post-LN shape is a structural heuristic; Pre-LN is the usual remedy
        [
            f"{len(post)} of {len(facts.blocks)} blocks end in {'/'.join(norms)} applied to a sum "
            f"(Post-LN, norm(x + f(x))): {blocks_text([b.name for b in post])}",
            f"{same} of {len(logs)} transitions {way} the gradient (median gains: "
            f"{s.gain_list()}), compounding to an end-to-end gain of {fmt(factor)}",
        ],
        [
            PRE_LN,
            "if you keep Post-LN: learning-rate warm-up and a smaller init of each block's last "
            "layer",
        ],
        blocks=[b.name for b in post],
        figures=_flow_figures(s) | {"same_way": same, "post_norm_blocks": len(post)},
    )


def _vanishing_fixes(
    facts: Optional[ModelFacts], saturating: list[str], small_init: bool
) -> tuple[list[str], list[str]]:
    """Evidence on what the blocks have, and the fixes for what they lack: an activation that
    saturates, a small init for ReLU, an init that is not variance-scaled, missing normalisation
    or residual connections; with nothing structural missing, what is left (Pre-LN placement for
    a Post-LN stack, warm-up or a lower learning rate)."""
    if facts is None:
        return [GENERIC], [_GENERIC_INIT, _GENERIC_RESIDUAL]
    structure = Structure.of(facts)
    fixes = []
    if saturating:
        fixes.append(f"replace {'/'.join(saturating)} with ReLU or GELU, with He init ({HE_INIT})")
    elif small_init:
        fixes.append(f"use He/Kaiming init for the ReLU layers ({HE_INIT}): std sqrt(2/fan_in)")
    elif structure.init.lack:
        fixes.append(
            f"use He (ReLU/GELU) or Xavier (tanh) initialisation in "
            f"{blocks_text(structure.init.lack)}: their weight std matches no variance-scaled init"
        )
    fixes += structure.missing()
    if not structure.lacks:
        fixes += [PRE_LN, WARMUP_OR_LOWER] if structure.post_ln else [WARMUP_OR_LOWER]
    present = structure.present()
    return ([present] if present else []), fixes[:MAX_SUGGESTIONS]


def _exploding_fixes(history: RunHistory, large_init: bool) -> tuple[list[str], list[str]]:
    """Evidence on what the blocks have, and the fixes: a re-init for a large init, normalisation
    where the blocks lack it, clipping where the run does not clip yet, and the learning rate."""
    facts, bounds = history.facts, history.settings.clip_bounds
    said, fixes = [], []
    if large_init:
        fixes.append(f"re-initialise with std = gain/sqrt(fan_in) ({HE_INIT}, or xavier_normal_)")
    if facts is None:
        said.append(GENERIC)
        fixes = fixes or [_GENERIC_NORM]
    else:
        structure = Structure.of(facts)
        fixes += structure.missing(residual=False)
        present = structure.present(residual=False)
        said += [present] if present else []
    fixes.append(_clip_advice(bounds))
    return said, fixes[:MAX_SUGGESTIONS]


def _clip_advice(bounds: list[ClipBound]) -> str:
    if not bounds:
        return (
            "clip the total norm (Trainer(gradient_clip_val=...) or a clip Rule) and lower the "
            "learning rate"
        )
    where = short_list([f"{b.source} at {fmt(b.threshold)}" for b in bounds], 3)
    return f"the run already clips the total norm ({where}): lower the learning rate or warm it up"


def _end_to_end_sentence(s: FlowSummary) -> str:
    e2e = s.end_to_end or 0.0
    if e2e == 0:
        what = "the first block gets no gradient at all"
    elif e2e < 1:
        what = f"the first block's gradient is {fmt(1 / e2e)}x smaller than the last block's"
    else:
        what = f"the first block's gradient is {fmt(e2e)}x larger than the last block's"
    return f"median end-to-end gain {fmt(e2e)} over {s.span}: {what}"


def _init_sentence(ratio: float, layer: Optional[str]) -> str:
    return (
        f"weight std x sqrt(fan_in) is {fmt(ratio)} at {layer} (PyTorch's default init gives "
        "0.58, He/Kaiming 1.41, Xavier about 1)"
    )


def _init_extreme(
    facts: Optional[ModelFacts], pick: Callable[..., tuple[float, str]]
) -> tuple[Optional[float], Optional[str]]:
    """The largest (``max``) or smallest (``min``) init ratio over the blocks, with its layer."""
    ratios = [
        (b.init_ratio, b.init_layer or b.name)
        for b in (facts.blocks if facts else [])
        if b.init_ratio is not None
    ]
    if not ratios:
        return None, None
    ratio, layer = pick(ratios)
    return ratio, layer


def _ends(s: FlowSummary) -> Optional[tuple[float, float]]:
    """Medians of the run's first 3 and of the last 3 total norms (at least 4 measured steps)."""
    if s.steps < 4 or len(s.early_totals) < 3 or len(s.totals) < 3:
        return None
    return sorted(s.early_totals)[1], sorted(s.totals[-3:])[1]


def _below(s: FlowSummary, bound: float) -> bool:
    return s.end_to_end is not None and s.end_to_end <= bound


def blocks_text(names: list[str]) -> str:
    return short_list(names, 4)


def _flow_figures(s: FlowSummary) -> dict[str, object]:
    return {
        "end_to_end_gain": s.end_to_end,
        "median_gains": dict(zip(s.transitions, s.gains)),
        "transitions": s.present,
        "measured_steps": s.steps,
        "window": s.window,
    }
