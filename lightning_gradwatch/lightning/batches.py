"""The batches of the current optimizer step, as Lightning hands them to ``on_train_batch_start``:
references to them (no copy), their indices and, when a rule may rerun the step, the RNG state at
each one's start. Nothing is hashed or copied here on the way through a step: the fingerprint is
taken only when asked for (a rule tripped, or a skip list is being replayed).

The references keep the step's micro-batches alive until its optimizer step has run (the batch of
a single-batch step is alive then anyway). A training step that changes its batch in place changes
what a later fingerprint or rerun sees: both read the batch as it is at the optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_gradwatch.governance.fingerprints import fingerprint

__all__ = ["RngState", "StepBatches", "capture_rng", "restore_rng"]


@dataclass(frozen=True)
class RngState:
    """The torch generators a training step draws from: the CPU one and, where CUDA is in use,
    the current device's."""

    cpu: Tensor
    cuda: Optional[tuple[int, Tensor]] = None


def capture_rng() -> RngState:
    """The RNG state now (a few KB copied on the host; no device sync)."""
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        cuda = (device, torch.cuda.get_rng_state(device))
    return RngState(torch.get_rng_state(), cuda)


def restore_rng(state: RngState) -> None:
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda[1], state.cuda[0])


class StepBatches:
    """The current optimizer step's micro-batches (one without gradient accumulation).

    Example::

        batches = StepBatches()
        batches.start(trainer, keep_rng=True)           # on_fit_start
        batches.batch_start(trainer, batch, batch_idx)  # on_train_batch_start
        batches.fingerprint(trainer)                    # only when needed
        batches.stepped()                               # on_before_optimizer_step
        batches.batch_end()                             # on_train_batch_end
    """

    def __init__(self) -> None:
        self.keep_rng = False
        self.accumulating = False
        self.epoch = 0
        self.batches: list[Any] = []
        self.indices: list[int] = []
        self.rng: list[RngState] = []
        self._stepped = False
        self._digest: Optional[tuple[int, int, str]] = None  # (step, batches, digest)
        self._warned = False

    def start(self, trainer: pl.Trainer, keep_rng: bool) -> None:
        """A fit starts: whether to keep RNG states (some rule reruns), and whether steps gather
        several micro-batches (``accumulate_grad_batches > 1``: ``batch_idx`` is then a list)."""
        self.keep_rng = keep_rng
        self.accumulating = trainer.accumulate_grad_batches > 1
        self._warned = False
        self._clear()

    def batch_start(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        """A micro-batch starts: keep a reference (the first of a step forgets the last step's)."""
        if self._stepped or trainer.current_epoch != self.epoch:
            self._clear()
        self.epoch = trainer.current_epoch
        self.batches.append(batch)
        self.indices.append(int(batch_idx))
        if self.keep_rng:
            self.rng.append(capture_rng())

    def stepped(self) -> None:
        """An optimizer step ran on these batches: the next micro-batch starts a new step."""
        self._stepped = True

    def batch_end(self) -> None:
        """A batch ended: after its step's optimizer step, let go of the references."""
        if self._stepped:
            self._clear()

    @property
    def batch_idx(self) -> Optional[Union[int, list[int]]]:
        """The step's batch index, or its micro-batch indices under accumulation."""
        if not self.indices:
            return None
        return list(self.indices) if self.accumulating else self.indices[-1]

    def fingerprint(self, trainer: pl.Trainer) -> Optional[str]:
        """This rank's digest of the step's batch (of the list of its micro-batches under
        accumulation), computed once per step; ``None`` when no batch was seen."""
        if not self.batches:
            return None
        key = (trainer.global_step, len(self.batches))
        if self._digest is not None and self._digest[:2] == key:
            return self._digest[2]
        content = list(self.batches) if self.accumulating else self.batches[-1]
        digest, skipped = fingerprint(content)
        if skipped and not self._warned:
            self._warned = True
            rank_zero_warn(
                "GradientFlowCallback: batch fingerprints leave out what has no stable content "
                f"to hash ({', '.join(skipped)}: objects whose repr is a memory address, or "
                "sparse/quantized tensors); the rest of the batch is hashed."
            )
        self._digest = (*key, digest)
        return digest

    def _clear(self) -> None:
        self.batches, self.indices, self.rng = [], [], []
        self._stepped = False
