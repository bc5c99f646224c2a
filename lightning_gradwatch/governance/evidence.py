"""A rank's own view of a tripped step, and every rank's after the agreement's gather.

Each rank's own figures (its loss before the mean over ranks, its block-output gradient rows before
:mod:`lightning_gradwatch.measure.reduction` combines them) and its batch fingerprint are packed into
a few floats (:func:`pack_evidence`) that ride in the ``all_gather`` the agreement already makes when
a rule tripped (:func:`lightning_gradwatch.governance.agreement.agree`): no extra collective, and
nothing at all on steps where no rule trips. In one process the figures are the step's own, already
on the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from lightning_gradwatch.governance.fingerprints import digest_from_halves, digest_halves
from lightning_gradwatch.measure.record import GradientMeasurement
from lightning_gradwatch.numerics.norms import NormType, combines_by_max, finalize_norm

__all__ = [
    "BatchIndex",
    "EvidenceRound",
    "EvidenceSource",
    "LocalEvidence",
    "RankEvidence",
    "block_figures",
    "pack_evidence",
    "unpack_evidence",
]

#: Called on every rank, only when a rule tripped on some rank: this rank's evidence.
EvidenceSource = Callable[[], "LocalEvidence"]
#: A step's batch index: an int, or the list of its micro-batch indices under accumulation.
BatchIndex = Union[int, list[int]]
#: Floats in front of the block rows in a packed evidence vector.
_HEAD = 5  # has fingerprint, its two halves, loss, loss scale


@dataclass
class LocalEvidence:
    """What this rank knows about its own part of a step, taken when a rule tripped on some rank.

    Attributes:
        epoch: the current epoch.
        batch_idx: the step's batch index (a list under gradient accumulation).
        dataloader_idx: the dataloader it came from, where that is known and there are several.
        fingerprint: this rank's batch digest (:func:`~.fingerprints.fingerprint`), if the batch
            was kept.
        loss: this rank's own loss of the step (a device scalar, before the mean over ranks).
        rows: this rank's block rows ``[partial, numel, calls]`` before the reduction (device).
        block_names: the names of ``rows``, in order.
        scale: the AMP loss scale the rows carry (a device scalar), if any.
    """

    epoch: int = 0
    batch_idx: Optional[BatchIndex] = None
    dataloader_idx: Optional[int] = None
    fingerprint: Optional[str] = None
    loss: Optional[Tensor] = None
    rows: Optional[Tensor] = None
    block_names: list[str] = field(default_factory=list)
    scale: Optional[Tensor] = None


@dataclass
class RankEvidence:
    """One rank's evidence on the host, after the gather.

    Attributes:
        fingerprint: its batch digest (``None``: its batch was not kept).
        loss: its own loss (``None``: not known).
        block_norms: its local norm of each block's output gradient (``None``: not measured).
        grad_norm: its local norm over every watched block's output gradient together.
    """

    fingerprint: Optional[str]
    loss: Optional[float]
    block_norms: dict[str, Optional[float]]
    grad_norm: Optional[float]


def pack_evidence(evidence: LocalEvidence, device: torch.device) -> Tensor:
    """``evidence`` as one float64 vector (the same length on every rank, who all watch the same
    blocks): ``[has fingerprint, its halves, loss, scale, rows...]``; NaN where unknown."""
    head = torch.full((_HEAD,), math.nan, dtype=torch.float64, device=device)
    if evidence.fingerprint is not None:
        high, low = digest_halves(evidence.fingerprint)
        head[:3] = torch.tensor([1.0, high, low], dtype=torch.float64)
    else:
        head[0] = 0.0
    if evidence.loss is not None:
        head[3] = evidence.loss.detach().to(device=device, dtype=torch.float64).reshape(())
    head[4] = 1.0 if evidence.scale is None else evidence.scale.to(device, torch.float64)
    count = len(evidence.block_names)
    if evidence.rows is None or evidence.rows.shape[0] != count:
        rows = torch.full((count * 3,), math.nan, dtype=torch.float64, device=device)
    else:
        rows = evidence.rows.detach().to(device=device, dtype=torch.float64).reshape(-1)
    return torch.cat([head, rows])


def unpack_evidence(
    values: Sequence[float], block_names: Sequence[str], norm_type: NormType
) -> RankEvidence:
    """One rank's :class:`RankEvidence` from its packed floats."""
    has, high, low, loss, scale = values[:_HEAD]
    norms, grad_norm = block_figures(values[_HEAD:], block_names, norm_type, scale)
    return RankEvidence(
        fingerprint=digest_from_halves(high, low) if has == 1.0 else None,
        loss=None if math.isnan(loss) else loss,
        block_norms=norms,
        grad_norm=grad_norm,
    )


def block_figures(
    rows: Sequence[float], block_names: Sequence[str], norm_type: NormType, scale: float = 1.0
) -> tuple[dict[str, Optional[float]], Optional[float]]:
    """Each block's norm from its flattened ``[partial, numel, calls]`` row (``None``: no
    gradient reached it), and their norm together; ``scale`` undoes an AMP loss scale."""
    norms: dict[str, Optional[float]] = {}
    partials, numels = [], []
    for i, name in enumerate(block_names):
        partial, numel, calls = rows[3 * i : 3 * i + 3]
        if math.isnan(calls) or calls <= 0:
            norms[name] = None
            continue
        norms[name] = finalize_norm(partial, numel, norm_type, scale)
        partials.append(partial)
        numels.append(numel)
    if not partials:
        return norms, None
    combined = max(partials) if combines_by_max(norm_type) else math.fsum(partials)
    return norms, finalize_norm(combined, float(sum(numels)), norm_type, scale)


class EvidenceRound:
    """One checked step's evidence: this rank's, taken only when a rule tripped on some rank, and
    every rank's after the agreement.

    With several ranks :meth:`payload` (the agreement calls it) packs this rank's figures into the
    agreement's ``all_gather``; in one process nothing is gathered and this rank's figures are the
    step's own, already on the host in the measurement (no extra copy).

    Args:
        source: this rank's evidence (batch, fingerprint, block rows before the reduction).
        local_loss: this rank's own loss of the step (a device scalar), if any.
        trainer: the Trainer (its device and world size).
    """

    def __init__(
        self,
        source: Callable[[], LocalEvidence],
        local_loss: Callable[[], Optional[Tensor]],
        trainer: Any,
    ) -> None:
        self.source = source
        self.local_loss = local_loss
        self.trainer = trainer
        self.local: Optional[LocalEvidence] = None

    def payload(self) -> Tensor:
        local = self.local = self.source()
        local.loss = self.local_loss()
        return pack_evidence(local, self.trainer.strategy.root_device)

    def settle(
        self,
        extras: Optional[list[list[float]]],
        measurement: GradientMeasurement,
        measured: bool,
        norm_type: NormType,
    ) -> tuple[LocalEvidence, list[RankEvidence]]:
        """This rank's evidence and every rank's (rank order)."""
        if extras is not None and self.local is not None:
            names = self.local.block_names
            return self.local, [unpack_evidence(values, names, norm_type) for values in extras]
        local = self.local = self.source()
        norms = dict(zip(measurement.block_names, measurement.block_norms)) if measured else {}
        own = {name: norms.get(name) for name in local.block_names}
        rank = RankEvidence(
            fingerprint=local.fingerprint,
            loss=measurement.loss,
            block_norms=own,
            grad_norm=_combined([n for n in own.values() if n is not None], norm_type),
        )
        return local, [rank]


def _combined(norms: Sequence[float], norm_type: NormType) -> Optional[float]:
    """Several blocks' norms taken together (``None`` for ``"mean"``, whose element counts are
    not kept here, or without any)."""
    if not norms or norm_type == "mean":
        return None
    if norm_type == "l2":
        return math.sqrt(math.fsum(n * n for n in norms))
    return max(norms) if norm_type == "linf" else math.fsum(norms)
