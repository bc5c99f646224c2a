"""Several optimizers (GANs, actor-critic): what each one is called and which blocks it owns.

Lightning runs several optimizers in manual optimization only, and every ``optimizer.step()`` is one
``trainer.global_step``. Each step is measured over what that optimizer updates: its parameters, and
the blocks whose parameters it owns. Nothing here touches tensors or Lightning's loops.

Ownership rule (documented in the README): a block belongs to the optimizer that holds most of its
parameter elements; a block without trainable parameters belongs to the owner of the nearest block
before it that has one (else after it), since its output gradient flows into that block's chain.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["BlockOwnership", "OptimizerSteps", "block_owners", "optimizer_names"]


def optimizer_names(
    optimizers: Sequence[Optimizer], scheduler_configs: Sequence[Any] = ()
) -> list[str]:
    """Each optimizer's name as Lightning's ``LearningRateMonitor`` gives it, without its ``lr-``
    prefix and parameter-group suffix: the class name, ``-1``, ``-2``, ... for further optimizers of
    the same class; a ``name`` set in the optimizer's LR-scheduler config wins.

    ``LearningRateMonitor`` names optimizers that have a scheduler first, then the others; the class
    counters run in that order too, so the same order is followed here.

    Example::

        optimizer_names([Adam(g.parameters()), Adam(d.parameters())])  # ["Adam", "Adam-1"]
    """
    names: dict[int, str] = {}
    seen: Counter[type] = Counter()

    def name_of(optimizer: Any, configured: Optional[str]) -> str:
        inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps the native optimizer
        if configured is not None:
            return configured
        seen[type(inner)] += 1
        count = seen[type(inner)]
        return type(inner).__name__ + (f"-{count - 1}" if count > 1 else "")

    ids = [id(getattr(o, "optimizer", o)) for o in optimizers]
    for config in scheduler_configs:
        optimizer = config.scheduler.optimizer
        key = id(getattr(optimizer, "optimizer", optimizer))
        if key in ids and key not in names:
            names[key] = name_of(optimizer, getattr(config, "name", None))
    for optimizer, key in zip(optimizers, ids):
        if key not in names:
            names[key] = name_of(optimizer, None)
    return [names[key] for key in ids]


class BlockOwnership:
    """Which optimizer owns each block and each named parameter.

    Attributes:
        block_owner: per block, the index of its optimizer (``None``: no optimizer updates it).
        param_owner: parameter name -> optimizer index.
        notes: one sentence per block whose owner had to be chosen (no parameters of its own, or
            parameters in several optimizers), for a warning at fit start.
    """

    def __init__(
        self,
        block_owner: list[Optional[int]],
        param_owner: dict[str, int],
        notes: list[str],
    ) -> None:
        self.block_owner = block_owner
        self.param_owner = param_owner
        self.notes = notes

    def blocks_of(self, optimizer_index: int) -> list[int]:
        """Indices of the blocks optimizer ``optimizer_index`` owns, in forward order."""
        return [i for i, owner in enumerate(self.block_owner) if owner == optimizer_index]


def block_owners(
    blocks: Sequence[tuple[str, nn.Module]],
    named_params: Sequence[tuple[str, nn.Parameter]],
    optimizers: Sequence[Optimizer],
) -> BlockOwnership:
    """Assign every block and parameter to one optimizer (see the module docstring for the rule)."""
    index_of = {
        id(p): k for k, opt in enumerate(optimizers) for g in opt.param_groups for p in g["params"]
    }
    param_owner = {name: index_of[id(p)] for name, p in named_params if id(p) in index_of}
    owners: list[Optional[int]] = []
    notes: list[str] = []
    for name, module in blocks:
        elements: Counter[int] = Counter()
        for p in module.parameters():
            if p.requires_grad and id(p) in index_of:
                elements[index_of[id(p)]] += p.numel()
        owners.append(elements.most_common(1)[0][0] if elements else None)
        if len(elements) > 1:
            notes.append(
                f"block {name!r} has parameters in {len(elements)} optimizers: it is measured with "
                "the one holding most of its parameter elements"
            )
    for i, (name, _) in enumerate(blocks):
        if owners[i] is None:
            before = [o for o in owners[:i] if o is not None]
            after = [o for o in owners[i + 1 :] if o is not None]
            owners[i] = before[-1] if before else (after[0] if after else None)
            if owners[i] is not None:
                notes.append(
                    f"block {name!r} has no trainable parameters: it is measured with the "
                    "optimizer of the nearest block before it (else after it)"
                )
    return BlockOwnership(owners, param_owner, notes)


class OptimizerSteps:
    """Per-fit bookkeeping for runs with several optimizers: which optimizer is stepping, its name,
    parameters and blocks, and the device rows of the probe buffer that belong to it.

    Block rows accumulate over the backward passes that feed an optimizer's step: a backward that
    starts while all of an optimizer's gradients are ``None`` (``zero_grad()``, the default
    ``set_to_none=True``) starts its blocks' rows afresh (:meth:`forget_zeroed`), and the rows are
    cleared once its step has been measured. With ``zero_grad(set_to_none=False)`` the zeroing cannot
    be seen without a pass over the gradients: rows then count from the start of the batch.

    Args:
        optimizers: the Trainer's optimizers, in configuration order.
        names: their names (:func:`optimizer_names`).
        blocks: the watched ``(name, module)`` blocks.
        named_params: the measured ``(name, parameter)`` pairs.
        device: where the probe buffer lives.
    """

    def __init__(
        self,
        optimizers: Sequence[Optimizer],
        names: Sequence[str],
        blocks: Sequence[tuple[str, nn.Module]],
        named_params: Sequence[tuple[str, nn.Parameter]],
        device: torch.device,
    ) -> None:
        self.optimizers = list(optimizers)
        self.names = list(names)
        self.ownership = block_owners(blocks, named_params, optimizers)
        owner = self.ownership.param_owner
        self.params = [
            [(n, p) for n, p in named_params if owner.get(n) == k] for k in range(len(optimizers))
        ]
        self.blocks = [self.ownership.blocks_of(k) for k in range(len(optimizers))]
        self.block_names = [[blocks[i][0] for i in indices] for indices in self.blocks]
        self._rows = [
            torch.tensor(indices, dtype=torch.long, device=device) for indices in self.blocks
        ]
        self._ids = [id(getattr(o, "optimizer", o)) for o in optimizers]

    def __len__(self) -> int:
        return len(self.optimizers)

    def index(self, optimizer: Any) -> int:
        """The position of ``optimizer`` (or the optimizer it wraps) among the Trainer's."""
        key = id(getattr(optimizer, "optimizer", optimizer))
        return self._ids.index(key) if key in self._ids else 0

    def rows(self, buffer: Tensor, k: int) -> Tensor:
        """Optimizer ``k``'s block rows of the probe buffer (a device gather, no sync)."""
        return buffer.index_select(0, self._rows[k])

    def clear(self, buffer: Tensor, k: int) -> None:
        """Start optimizer ``k``'s block rows afresh."""
        if len(self._rows[k]):
            buffer.index_fill_(0, self._rows[k], 0.0)

    def forget_zeroed(self, buffer: Tensor) -> None:
        """Before a backward: clear the rows of every optimizer whose gradients are all ``None``."""
        for k, params in enumerate(self.params):
            if params and all(p.grad is None for _, p in params):
                self.clear(buffer, k)
