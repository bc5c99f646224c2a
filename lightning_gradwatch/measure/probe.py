"""Hook mechanics: a forward hook per block registers a tensor hook on the block's primary output
tensor; the tensor hook writes the gradient's partial norm into a preallocated device buffer.

Why not ``register_full_backward_hook``: it silently skips dict outputs, breaks on in-place ops on the
output and fires wrongly under activation checkpointing. A forward hook guarded by
``torch.is_grad_enabled() and out.requires_grad`` registers exactly one tensor hook per block and
backward, in every checkpointing mode. Nothing here logs or syncs with the host.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_gradwatch._compat import DTENSOR_TYPES, replicate_placement
from lightning_gradwatch.measure.blocks import BlockList, ForwardOrderCheck, primary_tensor
from lightning_gradwatch.numerics.norms import (
    NormType,
    accumulation_dtype,
    combines_by_max,
    partial_norm,
)

#: Columns of the probe buffer.
PARTIAL, NUMEL, CALLS = 0, 1, 2


class GradientProbe:
    """Measures the gradient arriving at each block's output while :attr:`armed`.

    The buffer has one row per block: ``[partial norm, element count, tensor-hook calls]``. With
    ``accumulate=True`` successive backward passes (micro-batches) are combined (sum, or max for
    L-inf); otherwise each pass overwrites the previous one. ``strict_single_backward`` raises
    ``RuntimeError`` when a block's gradient arrives twice between two :meth:`reset` calls.

    Args:
        blocks: ``(name, module)`` pairs, in forward order.
        norm_type: one of ``"l2"``, ``"l1"``, ``"linf"``, ``"mean"``.
        accumulate: combine successive backward passes instead of overwriting.
        strict_single_backward: raise on a second backward without :meth:`reset`.
        keep_grads: keep a detached reference to each block's latest output gradient (histograms).
        check_order: warn once when the forward pass does not first reach the blocks in the order
            given (:class:`~lightning_gradwatch.measure.blocks.ForwardOrderCheck`; eager mode only).
        device: where the buffer lives when no block has a parameter or buffer to tell (no blocks
            at all, or parameter-free ones); default: CPU.
    """

    def __init__(
        self,
        blocks: BlockList,
        norm_type: NormType,
        *,
        accumulate: bool = True,
        strict_single_backward: bool = False,
        keep_grads: bool = False,
        check_order: bool = False,
        device: Optional[torch.device] = None,
    ) -> None:
        self.names = [name for name, _ in blocks]
        self.modules = [module for _, module in blocks]
        self.norm_type = norm_type
        self.accumulate = accumulate
        self.strict_single_backward = strict_single_backward
        self.keep_grads = keep_grads
        self.armed = False
        self.buffer = torch.zeros(
            len(blocks), 3, dtype=_dtype_of(self.modules), device=_device_of(self.modules, device)
        )
        self.grads: list[Optional[Tensor]] = [None] * len(blocks)
        #: Whether block i's input was block i-1's output tensor itself in the armed forward (eager
        #: only): then a NaN/Inf appearing between the two outputs came from block i's backward.
        self.chained = [False] * len(blocks)
        self._previous: Optional[tuple[int, weakref.ref[Tensor]]] = None
        self._order = ForwardOrderCheck(self.names) if check_order else None
        self._fired = [False] * len(blocks)
        self._tensor_hooks = [self._make_tensor_hook(i) for i in range(len(blocks))]
        self._handles: list[RemovableHandle] = [
            module.register_forward_hook(self._make_forward_hook(i))
            for i, module in enumerate(self.modules)
        ]

    def __len__(self) -> int:
        return len(self.names)

    def arm(self) -> None:
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def reset(self) -> None:
        """Forget everything measured since the last reset."""
        self.buffer.zero_()
        self._fired = [False] * len(self.names)
        self.grads = [None] * len(self.names)
        self.chained = [False] * len(self.names)
        self._previous = None

    def remove(self) -> None:
        """Remove every hook this probe registered. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.armed = False

    def _make_forward_hook(self, index: int) -> Callable[[nn.Module, Any, Any], None]:
        tensor_hook = self._tensor_hooks[index]

        def forward_hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if not self.armed or not torch.is_grad_enabled():
                return None
            tensor = primary_tensor(output)
            if tensor is not None and tensor.requires_grad:
                tensor.register_hook(tensor_hook)
                if not torch.compiler.is_compiling():  # host-side bookkeeping, no tensor work
                    previous, given = self._previous, primary_tensor(inputs)
                    self.chained[index] = (
                        given is not None
                        and previous is not None
                        and previous[0] == index - 1
                        and previous[1]() is given
                    )
                    self._previous = (index, weakref.ref(tensor))
                    if self._order is not None:
                        self._order.reached(index)
            return None  # a returned value would replace the block's output

        return forward_hook

    def _make_tensor_hook(self, index: int) -> Callable[[Tensor], None]:
        by_max = combines_by_max(self.norm_type)
        # Views and increments made once (the buffer is only ever zeroed in place): indexing and
        # scalar adds in the hook cost microseconds per block and backward, more than the norm of a
        # small block's gradient.
        row = self.buffer[index]
        partial_cell, counts = row[PARTIAL], row[NUMEL:]  # counts: [numel, calls]
        increments: dict[int, Tensor] = {}

        def increment(numel: int) -> Tensor:
            if torch.compiler.is_compiling():
                # Traced into a compiled graph: a constant there, and no write to Python state (a
                # dict write in a traced tensor hook makes Dynamo drop the whole forward to eager).
                return torch.tensor([numel, 1], dtype=row.dtype, device=row.device)
            value = increments.get(numel)
            if value is None:  # one per distinct gradient size; filled on the device, no copy
                value = increments[numel] = torch.ones(2, dtype=row.dtype, device=row.device)
                value[0] = numel
            return value

        def tensor_hook(grad: Tensor) -> None:
            if self.strict_single_backward:
                if self._fired[index]:
                    raise RuntimeError(
                        f"Block {index} ({self.names[index]!r}) received a second gradient without "
                        "reset(). Call reset() between backward passes, or use "
                        "strict_single_backward=False (e.g. for gradient accumulation)."
                    )
                self._fired[index] = True
            if isinstance(grad, DTENSOR_TYPES):
                grad = _local_values(grad)
            partial = partial_norm(grad, self.norm_type)
            if partial.device != row.device:
                partial = partial.to(row.device)
            if not self.accumulate:
                partial_cell.copy_(partial)
                counts[0].fill_(grad.numel())
                counts[1].add_(1)
            elif by_max:
                # torch.maximum propagates NaN, so a non-finite gradient is never hidden.
                torch.maximum(partial_cell, partial, out=partial_cell)
                counts.add_(increment(grad.numel()))
            else:
                partial_cell.add_(partial)
                counts.add_(increment(grad.numel()))
            # Not in compiled code: a write to a Python list there makes Dynamo run the whole forward
            # eagerly, so under torch.compile block-output histograms are left out instead.
            if self.keep_grads and not torch.compiler.is_compiling():
                self.grads[index] = grad.detach()
            return None

        return tensor_hook


def _local_values(grad: Tensor) -> Tensor:
    """A DTensor output gradient's local values (the rows of the tensor-parallel ranks are then
    combined by :func:`lightning_gradwatch.measure.reduction.reduce_block_rows`).

    A pending sum (``Partial``) has no local norm: it is redistributed to ``Replicate`` first, one
    collective per such block and backward, with a warning.
    """
    placements = grad.placements  # type: ignore[attr-defined]
    if any(p.is_partial() for p in placements):
        warnings.warn(
            "GradientFlowCallback: a block output's gradient is a DTensor with a Partial "
            f"placement ({tuple(placements)}): it is redistributed to Replicate to be measured "
            "exactly (one collective per such block and backward).",
            stacklevel=2,
        )
        target = [replicate_placement() if p.is_partial() else p for p in placements]
        grad = grad.redistribute(grad.device_mesh, target)  # type: ignore[attr-defined]
    return grad.to_local()  # type: ignore[attr-defined]


def _dtype_of(modules: list[nn.Module]) -> torch.dtype:
    """The buffer's dtype: :func:`~lightning_gradwatch.numerics.norms.accumulation_dtype` of every
    floating parameter and buffer of the blocks (float64 where any is float64, e.g. under
    ``precision="64-true"``: the block outputs' gradients are then float64 and their partials too)."""
    dtypes = {
        tensor.dtype
        for module in modules
        for tensor in (*module.parameters(), *module.buffers())
        if tensor.is_floating_point()
    }
    return accumulation_dtype(*dtypes)


def _device_of(modules: list[nn.Module], default: Optional[torch.device]) -> torch.device:
    for module in modules:
        for param in module.parameters():
            return param.device
        for buffer in module.buffers():
            return buffer.device
    return torch.device("cpu") if default is None else torch.device(default)
