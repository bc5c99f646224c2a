"""What the blocks do in their first training forward: whether each has a residual connection and
whether it is Post-LN shaped, seen by one-off forward hooks and one walk of its autograd graph.

Cost: one forward hook per submodule of the blocks until each block has run one training forward
(grad enabled, module in training mode); then the hooks remove themselves. Nothing on later steps.

Post-LN test (conservative, documented in the README): a block is Post-LN shaped when the last
submodule to *finish* inside its forward is a normalisation layer whose input was made by an
addition (``grad_fn`` ``AddBackward0``), i.e. ``norm(x + f(x))``. A Pre-LN block
(``x + f(norm(x))``) finishes with its sublayer; a norm called as a function (``F.layer_norm``), a
residual added by ``torch.add`` under another name, or a block under torch.compile (no capture:
hooks added to a compiled module are ignored or break its graph) is left undecided (``None``).

Residual test: the block's autograd graph, from its output back to its inputs, holds an addition
whose two operands both lead back to one tensor (a block input or a submodule's output) and first
meet the block's tensors at different ones: ``x + f(x)`` (``x`` against ``f``'s output) or
``g(x) + f(x)`` (a projected shortcut). An addition inside one function of one tensor
(``x + 0.044715 * x**3`` in a tanh-GELU, a rotary embedding's ``q * cos + rot(q) * sin``) meets
the same tensor first on both sides and is not a residual. ``x + f(x)`` on a block input that needs
no gradient (raw data into the first block) leaves no trace in the graph: undecided (``None``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from lightning_gradwatch.diagnosis.model_facts import ModelFacts, norm_name
from lightning_gradwatch.measure.blocks import primary_tensor

__all__ = ["MAX_NODES", "StructureCapture", "has_residual"]

#: Autograd nodes one walk visits at most (a block has tens to hundreds): beyond, undecided.
MAX_NODES = 20_000


class StructureCapture:
    """One-off forward hooks that decide each block's ``post_norm`` and ``residual`` during its
    first training forward (grad enabled, module in training mode), then remove themselves.

    Example::

        capture = StructureCapture(blocks, facts)
        model(x).sum().backward()  # facts.blocks[i].post_norm, .residual are now True or False
        capture.remove()
    """

    def __init__(self, blocks: Sequence[tuple[str, nn.Module]], facts: ModelFacts) -> None:
        self._facts = facts
        self._handles: list[list[RemovableHandle]] = []
        self._last: list[Optional[tuple[nn.Module, Any]]] = [None] * len(blocks)
        # The autograd nodes of this forward's submodule outputs, per block, until it decides.
        self._made: list[set[Node]] = [set() for _ in blocks]
        for index, (_, block) in enumerate(blocks):
            handles = [
                child.register_forward_hook(self._child_hook(index))
                for child in block.modules()
                if child is not block
            ]
            handles.append(block.register_forward_hook(self._block_hook(index), with_kwargs=True))
            self._handles.append(handles)

    @property
    def done(self) -> bool:
        return not any(self._handles)

    def remove(self) -> None:
        for handles in self._handles:
            for handle in handles:
                handle.remove()
            handles.clear()
        self._last = [None] * len(self._last)
        for made in self._made:
            made.clear()

    def _child_hook(self, index: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            # Inside torch.compile: a no-op (traced as such), so the capture adds no graph break.
            if torch.compiler.is_compiling():
                return
            self._last[index] = (module, inputs[0] if inputs else None)
            node = getattr(primary_tensor(output), "grad_fn", None)
            if node is not None:
                self._made[index].add(node)

        return hook

    def _block_hook(self, index: int) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            if torch.compiler.is_compiling():
                return
            last, made = self._last[index], set(self._made[index])
            self._last[index] = None  # no activation kept alive past this forward
            self._made[index].clear()
            # Sanity validation runs under no_grad; reentrant checkpointing re-runs the forward.
            if not (torch.is_grad_enabled() and module.training):
                return
            facts = self._facts.blocks[index]
            facts.post_norm = last is not None and _is_norm_of_sum(*last)
            inputs = _grad_tensors([*args, *kwargs.values()])
            facts.residual = has_residual(primary_tensor(output), inputs, made)
            for handle in self._handles[index]:
                handle.remove()
            self._handles[index].clear()

        return hook


def has_residual(
    output: Optional[Tensor], inputs: Sequence[Tensor], made: set[Node]
) -> Optional[bool]:
    """Whether the graph from ``output`` back to ``inputs`` (tensors that require grad) holds a
    residual addition (see the module docstring); ``made``: the nodes of the submodule outputs.
    ``None``: cannot tell (no graph, a graph over :data:`MAX_NODES`, or no input with a gradient
    and no residual found)."""
    root = getattr(output, "grad_fn", None)
    if root is None:
        return None
    stops = {get_gradient_edge(tensor).node for tensor in inputs}
    marks = stops | made
    nodes = _reach(root, stops)
    if nodes is None:
        return None
    for node in nodes:  # nearest the output first: the block's own residual is found quickly
        if node in stops or not type(node).__name__.startswith("AddBackward"):
            continue
        operands = [operand for operand, _ in node.next_functions if operand is not None]
        if len(operands) != 2:  # an added constant, or a tensor that needs no gradient
            continue
        left, right = (_reach(operand, stops) for operand in operands)
        if left is None or right is None:
            return None
        if left.keys() & right.keys() & marks and _first_marks(operands[0], marks) != _first_marks(
            operands[1], marks
        ):
            return True
    return False if stops else None


def _reach(start: Node, stops: set[Node]) -> Optional[dict[Node, None]]:
    """The nodes reachable from ``start`` (itself included, in the order met), not going past
    ``stops``; ``None`` beyond :data:`MAX_NODES`."""
    seen = {start: None}
    queue = [start]
    for node in queue:
        if node in stops:
            continue
        for following, _ in node.next_functions:
            if following is not None and following not in seen:
                seen[following] = None
                queue.append(following)
                if len(seen) > MAX_NODES:
                    return None
    return seen


def _first_marks(start: Node, marks: set[Node]) -> frozenset[Node]:
    """The marked nodes met first on the paths from ``start`` (``start`` itself if marked)."""
    found, seen, stack = set(), {start}, [start]
    while stack and len(seen) <= MAX_NODES:
        node = stack.pop()
        if node in marks:
            found.add(node)
            continue
        for following, _ in node.next_functions:
            if following is not None and following not in seen:
                seen.add(following)
                stack.append(following)
    return frozenset(found)


def _grad_tensors(values: Iterable[Any]) -> list[Tensor]:
    """The tensors that require grad among ``values`` and inside tuples/lists of them."""
    found = []
    for value in values:
        items = value if isinstance(value, (tuple, list)) else (value,)
        found += [v for v in items if isinstance(v, Tensor) and v.requires_grad]
    return found


def _is_norm_of_sum(module: nn.Module, first_input: Any) -> bool:
    grad_fn = getattr(first_input, "grad_fn", None)
    return norm_name(module) is not None and type(grad_fn).__name__.startswith("AddBackward")
