"""Where a tripped step came from: the batch (epoch, index, per-rank fingerprints) and the rank
whose local contribution drove the trip, from every rank's evidence
(:mod:`~lightning_gradwatch.governance.evidence`); and the sentences that say it."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from lightning_gradwatch.governance.engine import Decision
from lightning_gradwatch.governance.evidence import BatchIndex, LocalEvidence, RankEvidence
from lightning_gradwatch.keys import LOSS, NORM_PREFIX

__all__ = [
    "Origin",
    "batch_text",
    "find_origin",
    "incident_fields",
    "origin_text",
    "rerun_text",
]


@dataclass
class Origin:
    """The rank whose own contribution drove a trip.

    Attributes:
        rank: that rank.
        figure: what was compared: ``"loss"``, ``"gradient norm"`` (every watched block's output
            gradient on that rank together) or a ``grad_norm/<block>`` key.
        ratio: its value over the median of the other ranks' (``None`` with one rank or no
            figure; ``inf`` where the other ranks' median is 0).
        nonfinite: its figure was NaN/Inf.
        local: the per-rank figures behind it (``loss``, ``grad_norm`` and ``figure``'s values).
    """

    rank: int
    figure: Optional[str] = None
    ratio: Optional[float] = None
    nonfinite: bool = False
    local: dict[str, list[Optional[float]]] = field(default_factory=dict)


def find_origin(decision: Decision, ranks: Sequence[RankEvidence]) -> Origin:
    """The rank behind ``decision``: among the ranks where the rule tripped (all of them when it
    tripped everywhere, as rules on reduced figures do), the one with a non-finite local figure,
    else the one whose local figure is the largest multiple of the other ranks' median."""
    local: dict[str, list[Optional[float]]] = {
        LOSS: [r.loss for r in ranks],
        "grad_norm": [r.grad_norm for r in ranks],
    }
    figure, values = _figure(decision, ranks)
    if figure is not None and figure not in local:
        local[figure] = values
    world = len(ranks)
    tripped = [r for r in decision.ranks if 0 <= r < world]
    candidates = tripped if 0 < len(tripped) < world else list(range(world))
    if world <= 1:
        return Origin(rank=candidates[0] if candidates else 0, figure=figure, local=local)
    if figure is None:
        return Origin(rank=candidates[0], local=local)
    known = [r for r in candidates if values[r] is not None]
    bad = [r for r in known if not math.isfinite(values[r])]  # type: ignore[arg-type]
    if bad:
        return Origin(rank=bad[0], figure=figure, ratio=math.inf, nonfinite=True, local=local)
    ratios = {r: _ratio(values, r) for r in known}
    if not ratios:
        return Origin(rank=candidates[0], local=local)
    rank = max(ratios, key=lambda r: (ratios[r], -r))
    return Origin(rank=rank, figure=figure, ratio=ratios[rank], local=local)


def _figure(
    decision: Decision, ranks: Sequence[RankEvidence]
) -> tuple[Optional[str], list[Optional[float]]]:
    """What to compare across ranks for ``decision``: the loss for a loss rule, the block's own
    norm for a ``grad_norm/<block>`` rule, else the local gradient norm (the loss where no block
    was measured)."""
    worst = decision.check.worst
    key = worst.key if worst is not None else decision.rule.metric
    if key == LOSS:
        return LOSS, [r.loss for r in ranks]
    if key.startswith(NORM_PREFIX) and all(key[len(NORM_PREFIX) :] in r.block_norms for r in ranks):
        block = key[len(NORM_PREFIX) :]
        return key, [r.block_norms[block] for r in ranks]
    if any(r.grad_norm is not None for r in ranks):
        return "gradient norm", [r.grad_norm for r in ranks]
    if any(r.loss is not None for r in ranks):
        return LOSS, [r.loss for r in ranks]
    return None, []


def _ratio(values: Sequence[Optional[float]], rank: int) -> float:
    own = values[rank]
    others = [v for r, v in enumerate(values) if r != rank and v is not None and math.isfinite(v)]
    if own is None or not others:
        return math.nan
    middle = statistics.median(abs(v) for v in others)
    if middle == 0:
        return math.inf if own != 0 else 1.0
    return abs(own) / middle


def batch_text(epoch: int, batch_idx: Optional[BatchIndex]) -> str:
    """``"epoch 0, batch 7"`` (``"batches 6-7"`` for a step's micro-batches)."""
    if batch_idx is None:
        return f"epoch {epoch}, batch unknown"
    if isinstance(batch_idx, int):
        return f"epoch {epoch}, batch {batch_idx}"
    if len(batch_idx) == 1:
        return f"epoch {epoch}, batch {batch_idx[0]}"
    consecutive = list(batch_idx) == list(range(batch_idx[0], batch_idx[0] + len(batch_idx)))
    shown = f"{batch_idx[0]}-{batch_idx[-1]}" if consecutive else ", ".join(map(str, batch_idx))
    return f"epoch {epoch}, batches {shown}"


def origin_text(origin: Origin, world: int, where: str) -> str:
    """The sentence that names the batch and the rank, e.g. ``rank 3's batch (epoch 0, batch 7)
    has a local gradient norm 240× the other ranks' median``."""  # noqa: RUF002
    if world <= 1:
        return f"from the batch ({where}) on rank {origin.rank}"
    text = f"rank {origin.rank}'s batch ({where})"
    if origin.figure is None or origin.ratio is None:
        return text
    figure = origin.figure
    if origin.nonfinite:
        return f"{text} has a non-finite local {figure}"
    if math.isnan(origin.ratio):
        return text
    return f"{text} has a local {figure} {origin.ratio:.3g}× the other ranks' median"  # noqa: RUF001


def incident_fields(
    decision: Decision, evidence: LocalEvidence, ranks: Sequence[RankEvidence]
) -> tuple[dict[str, Any], str]:
    """The alert fields of one decision's incident (``batch_idx``, ``dataloader_idx``,
    ``fingerprints``, ``origin_rank``, ``local``) and its sentence."""
    origin = find_origin(decision, ranks)
    fields = {
        "batch_idx": evidence.batch_idx,
        "dataloader_idx": evidence.dataloader_idx,
        "fingerprints": [r.fingerprint for r in ranks],
        "origin_rank": origin.rank,
        "local": origin.local,
    }
    where = batch_text(evidence.epoch, evidence.batch_idx)
    return fields, origin_text(origin, len(ranks), where)


def rerun_text(record: dict[str, Any]) -> str:
    """The sentence of a rerun's record (``verdict``, ``ranks``, ``first``, ``rerun``, ``reason``)."""
    verdict = record.get("verdict")
    if verdict == "reproducible":
        return "rerun: reproducible (the same loss and local figures: the data or the model state)"
    if verdict == "transient":
        ranks = list(record.get("ranks") or [])
        on = ""
        if ranks:
            on = f" on rank {ranks[0]}" if len(ranks) == 1 else f" on ranks {ranks}"
        figures = ""
        first, again = record.get("first", {}).get(LOSS), record.get("rerun", {}).get(LOSS)
        if ranks and isinstance(first, list) and isinstance(again, list):
            r = ranks[0]
            if r < len(first) and r < len(again):
                figures = f", loss {_num(first[r])} first, {_num(again[r])} on rerun"
        return f"rerun: transient{on}{figures} (hardware or non-determinism)"
    return f"rerun: unavailable ({record.get('reason') or 'no reason given'})"


def _num(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, (int, float)) else str(value)
