"""The optimizers of a fit: what each one is called, which blocks and parameters it owns, and when its
step is measured. One optimizer is a list of one (named ``None``: its keys carry no suffix); several
(GANs, actor-critic) take the same path.

Lightning runs several optimizers in manual optimization only, and every ``optimizer.step()`` is one
``trainer.global_step``. Each step is measured over what that optimizer updates: its parameters, and
the blocks whose parameters it owns (with one optimizer: every measured parameter and every block).

Ownership rule (documented in the README): a block belongs to the optimizer that holds most of its
parameter elements; a block without trainable parameters belongs to the owner of the nearest block
before it that has one (else after it), since its output gradient flows into that block's chain.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Optional

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_gradwatch.keys import TOTAL_NORM_KEY, optimizer_of

__all__ = [
    "BlockOwnership",
    "OptimizerSteps",
    "block_owners",
    "check_optimizer_names",
    "optimizer_names",
    "optimizer_steps",
]


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


def check_optimizer_names(rules: Sequence[Any], names: Sequence[str]) -> None:
    """Raise ``ValueError`` for a rule on ``grad_norm_total/<name>`` naming no optimizer of the run
    (``names`` is empty with a single optimizer: its total is ``grad_norm_total``)."""
    for rule in rules:
        name = optimizer_of(rule.metric)
        if name is None or rule.is_pattern or name in names:
            continue
        known = (
            f"the optimizers are {list(names)}"
            if names
            else f"this run has one optimizer, whose total is {TOTAL_NORM_KEY!r}"
        )
        raise ValueError(
            f"Rule `metric` {rule.metric!r} names an optimizer {name!r} that this run does not have: "
            f"{known} (named as LearningRateMonitor names them)."
        )


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
    """Per-fit bookkeeping of the optimizers: which one is stepping, its name, parameters and blocks,
    the device rows of the probe buffer that belong to it, and whether its step is measured.

    Block rows accumulate over the backward passes that feed an optimizer's step: a backward that
    starts while all of an optimizer's gradients are ``None`` (``zero_grad()``, the default
    ``set_to_none=True``) starts its blocks' rows afresh (:meth:`forget_zeroed`), and the rows are
    cleared once its step has been measured. With ``zero_grad(set_to_none=False)`` the zeroing cannot
    be seen without a pass over the gradients: rows then count from the start of the batch.

    Args:
        optimizers: the Trainer's optimizers, in configuration order.
        names: their names (:func:`optimizer_names`; ``[None]`` for a single optimizer, which owns
            every measured parameter and every block).
        blocks: the watched ``(name, module)`` blocks.
        named_params: the measurable ``(name, parameter)`` pairs, frozen ones included
            (:attr:`params` holds those that train, see :meth:`track_trainable`).
        device: where the probe buffer lives.
    """

    def __init__(
        self,
        optimizers: Sequence[Optimizer],
        names: Sequence[Optional[str]],
        blocks: Sequence[tuple[str, nn.Module]],
        named_params: Sequence[tuple[str, nn.Parameter]],
        device: torch.device,
    ) -> None:
        self.optimizers = list(optimizers)
        self.names = list(names)
        if len(self.names) == 1:  # everything, also parameters the optimizer does not hold
            self.ownership = BlockOwnership([0] * len(blocks), {n: 0 for n, _ in named_params}, [])
        else:
            self.ownership = block_owners(blocks, named_params, optimizers)
        owner = self.ownership.param_owner
        self._owned = [
            [(n, p) for n, p in named_params if owner.get(n) == k] for k in range(len(self.names))
        ]
        self.params: list[list[tuple[str, nn.Parameter]]] = []
        self._epoch: Optional[int] = None
        self.track_trainable(None, force=True)
        self.blocks = [self.ownership.blocks_of(k) for k in range(len(optimizers))]
        self.block_names = [[blocks[i][0] for i in indices] for indices in self.blocks]
        self._rows = [
            torch.tensor(indices, dtype=torch.long, device=device) for indices in self.blocks
        ]
        self._ids = [id(getattr(o, "optimizer", o)) for o in optimizers]
        #: The global step of each optimizer's latest step (-1: none yet).
        self.last = [-1] * len(self.names)
        #: Whether a backward may have written each optimizer's rows since they were last zeroed.
        self._written = [False] * len(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def track_trainable(self, epoch: Optional[int], force: bool = False) -> None:
        """Re-read which of each optimizer's parameters train (``requires_grad``) at the first
        batch of each ``epoch``, or now with ``force`` (measured steps): a finetuning callback
        (``BackboneFinetuning``) unfreezes modules at an epoch start, before or after the
        gradient-flow callback's hooks. A host-side walk over the parameters, no tensor work."""
        if force or epoch != self._epoch:
            self._epoch = epoch
            self.params = [[(n, p) for n, p in owned if p.requires_grad] for owned in self._owned]

    def begin(self, step: int) -> None:
        """Training starts (or resumes) at global step ``step``: every optimizer counts as having
        stepped just before it, so a resumed run keeps the measuring grid of an uninterrupted one."""
        self.last = [step - 1] * len(self.names)

    def due(self, k: int, step: int, every: int) -> bool:
        """Whether optimizer ``k``'s step at global step ``step`` is measured: its first step at or
        after each multiple of ``every``, so every optimizer is measured once per interval whatever
        the order they step in (with ``every=1``: every step)."""
        return step // every > self.last[k] // every

    def may_be_due(self, step: int, every: int) -> bool:
        """Whether a batch starting at global step ``step`` may hold a measured step (each
        optimizer steps at most once per batch in the usual loop; more steps only widen this)."""
        end = step + len(self) - 1
        return any(end // every > last // every for last in self.last)

    def stepped(self, k: int, step: int) -> None:
        self.last[k] = step

    def measures(self, k: int, step: int, every: int) -> bool:
        """Whether optimizer ``k``'s step at ``step`` is measured: due, and not measured already
        (call before :meth:`stepped`)."""
        return self.last[k] != step and self.due(k, step, every)

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
        self._written[k] = False

    def zeroed(self) -> None:
        """The whole buffer was zeroed (the probe's reset): no rows are written."""
        self._written = [False] * len(self.names)

    def backward_done(self) -> None:
        """An armed backward ran: every optimizer's rows may hold figures now."""
        self._written = [True] * len(self.names)

    def forget_zeroed(self, buffer: Tensor) -> None:
        """Before a backward: clear the written rows of every optimizer whose gradients are all
        ``None`` (they fed no step). Rows nothing wrote are left alone: an in-place write between a
        compiled forward and its backward would break the compiled graph."""
        for k, params in enumerate(self.params):
            if self._written[k] and params and all(p.grad is None for _, p in params):
                self.clear(buffer, k)


def optimizer_steps(
    trainer: Any,
    blocks: Sequence[tuple[str, nn.Module]],
    named_params: Sequence[tuple[str, nn.Parameter]],
    device: torch.device,
    rules: Sequence[Any],
) -> OptimizerSteps:
    """The :class:`OptimizerSteps` of a fit, after checking that every rule naming an optimizer's
    total names one of them; with several optimizers one warning lists the blocks whose owner had
    to be chosen. No optimizer at all (``validate``-only models, Lightning's mock optimizer) counts
    as one."""
    if len(trainer.optimizers) < 2:
        check_optimizer_names(rules, [])
        return OptimizerSteps(trainer.optimizers, [None], blocks, named_params, device)
    names = optimizer_names(trainer.optimizers, trainer.lr_scheduler_configs)
    check_optimizer_names(rules, names)
    steps = OptimizerSteps(trainer.optimizers, names, blocks, named_params, device)
    if steps.ownership.notes:
        rank_zero_warn(
            "GradientFlowCallback: with several optimizers each block is measured at the steps "
            "of the optimizer that owns it; " + "; ".join(steps.ownership.notes) + "."
        )
    return steps
