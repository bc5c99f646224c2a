"""Which modules are blocks, and which tensor of a block's output is measured.

``blocks`` may be ``"auto"``, a dotted attribute path to a container, a list of qualified module names,
or a callable returning ``(name, module)`` pairs. ``"auto"`` takes the repeated-block container
(:func:`discover_blocks`); a model without one (an MLP in a ``Sequential``, Lightning's
``BoringModel``) gets the modules that own trainable parameters, in registration order
(:func:`parameter_owners`), and a model with none of those (only root parameters) gets no blocks:
parameter figures only. The *primary tensor* of a block output is:

* a tensor: itself;
* a dict or HuggingFace-style ``ModelOutput``: ``last_hidden_state``, else ``hidden_states`` (if a
  tensor), else the first tensor value;
* a tuple or list: its first tensor element (searched recursively);
* any other object (a ``ModelOutput``-like dataclass): its ``last_hidden_state`` or
  ``hidden_states`` attribute, else its first tensor field.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_gradwatch._compat import COMPILED_MODULE_ATTR

BlockList = list[tuple[str, nn.Module]]
BlocksSpec = Union[str, Sequence[str], Callable[[nn.Module], Sequence[tuple[str, nn.Module]]]]

_HOW_TO_NAME = (
    "Name the blocks explicitly: GradientFlowCallback(blocks='path.to.container'), "
    "blocks=['layer1', 'layer2', ...] (qualified module names) or blocks=callable(pl_module) "
    "returning [(name, module), ...]."
)


def validate_blocks_spec(blocks: object) -> BlocksSpec:
    """Check the type of a ``blocks`` argument at construction time."""
    if isinstance(blocks, str):
        if not blocks.strip():
            raise ValueError(
                f"`blocks` must be 'auto', an attribute path or names; got {blocks!r}."
            )
        return blocks
    if callable(blocks):
        return blocks  # type: ignore[return-value]
    if isinstance(blocks, Sequence) and all(isinstance(name, str) for name in blocks):
        if len(blocks) == 0:
            raise ValueError("`blocks` must name at least one module; got an empty list.")
        return list(blocks)
    raise TypeError(
        "`blocks` must be 'auto', an attribute path (str), a list of module names (list[str]) or a "
        f"callable(pl_module) -> list[(name, module)]; got {type(blocks).__name__}: {blocks!r}."
    )


@dataclass(frozen=True)
class BlockChoice:
    """The blocks ``blocks=`` designates, and how ``"auto"`` chose them.

    Attributes:
        blocks: ``(qualified name, module)`` pairs, in the order gains are taken.
        fallback: why and how ``"auto"`` chose without a repeated-block container (a sentence for the
            fit-start message); ``None`` for a container or blocks named by the user.
        registration_order: the blocks are in registration order, a guess at the forward order
            that the probe checks during the first measured forward (:class:`ForwardOrderCheck`).
    """

    blocks: BlockList
    fallback: Optional[str] = None
    registration_order: bool = False

    def describe(self, names: Sequence[str]) -> str:
        """``"3 blocks (a, b, c)"`` or ``"no blocks"`` (``names``: the blocks' names as logged)."""
        if not names:
            return "no blocks"
        return f"{len(names)} block{'' if len(names) == 1 else 's'} ({', '.join(names)})"

    @property
    def reason(self) -> str:
        """``": <fallback>"`` to end the fit-start message with, or ``""``."""
        return f": {self.fallback}" if self.fallback else ""


def resolve_blocks(root: nn.Module, blocks: BlocksSpec) -> BlockList:
    """The ``(qualified name, module)`` pairs ``blocks`` designates inside ``root``
    (:func:`choose_blocks` without the explanation).

    Raises:
        ValueError: if a named module does not exist or a named container has no children.
    """
    return choose_blocks(root, blocks).blocks


def choose_blocks(root: nn.Module, blocks: BlocksSpec) -> BlockChoice:
    """The blocks ``blocks`` designates inside ``root``, and how ``"auto"`` chose them.

    Raises:
        ValueError: if a named module does not exist, a named container has no children, or the
            callable returns nothing.
    """
    if callable(blocks) and not isinstance(blocks, str):
        found = [(str(name), module) for name, module in blocks(root)]
        if not found or not all(isinstance(module, nn.Module) for _, module in found):
            raise ValueError(
                "The `blocks` callable must return a non-empty list of (name, nn.Module) pairs."
            )
        return BlockChoice(found)
    if blocks == "auto":
        return _auto_blocks(root)
    modules = dict(root.named_modules())
    if isinstance(blocks, str):
        container = _lookup(modules, blocks)
        children = list(container.named_children())
        if not children:
            raise ValueError(f"`blocks={blocks!r}` names a module with no child modules.")
        return BlockChoice([(_join(blocks, name), module) for name, module in children])
    return BlockChoice([(name, _lookup(modules, name)) for name in blocks])


def _auto_blocks(root: nn.Module) -> BlockChoice:
    stack = _repeated_stack(root)
    if stack is not None:
        return BlockChoice(stack)
    owners = parameter_owners(root)
    if owners:
        these = (
            "this is the one module that owns trainable parameters"
            if len(owners) == 1
            else f"these are the {len(owners)} modules that own trainable parameters, in "
            "registration order"
        )
        return BlockChoice(
            owners,
            f"no repeated ModuleList/Sequential found, so {these} (blocks=[...] names others)",
            registration_order=len(owners) > 1,
        )
    return BlockChoice(
        [],
        "no repeated ModuleList/Sequential found and no submodule owns trainable parameters, so "
        "only parameter figures are logged (grad_norm_total, grad_stats/; rules apply)",
    )


def _lookup(modules: Mapping[str, nn.Module], name: str) -> nn.Module:
    if name not in modules:
        close = [known for known in modules if known and known.endswith(name.split(".")[-1])][:5]
        hint = f" Similar names: {close}." if close else ""
        raise ValueError(f"Block {name!r} does not exist in the model.{hint} {_HOW_TO_NAME}")
    return modules[name]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def discover_blocks(root: nn.Module) -> BlockList:
    """Find the repeated-block container: the longest ``ModuleList``/``Sequential`` whose children
    (at least two) are all of one class, e.g. ``transformer.h``, ``model.layers``, ``encoder.layer``.

    A container inside another one's blocks (attention heads in a ``ModuleList``, a block that is
    itself a ``Sequential`` of layers) is part of a block, not a candidate. Ties go to the container
    met first (the shallowest in definition order), with a warning naming the others (an
    encoder-decoder model has two stacks: name them with ``blocks=``).

    Raises:
        ValueError: if there is no such container (``blocks="auto"`` then falls back to
            :func:`parameter_owners`).
    """
    found = _repeated_stack(root)
    if found is None:
        raise ValueError(
            "Could not find the model's blocks automatically: no nn.ModuleList or nn.Sequential "
            f"holds two or more modules of one class. {_HOW_TO_NAME}"
        )
    return found


def _repeated_stack(root: nn.Module) -> Optional[BlockList]:
    """:func:`discover_blocks`, ``None`` where there is no repeated-block container."""
    best: Optional[tuple[str, nn.Module]] = None
    best_len = 1
    tied: list[str] = []
    candidates: list[str] = []
    for name, module in root.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(module.children())
        if len(children) < 2 or len({type(child) for child in children}) != 1:
            continue
        if any(name.startswith(f"{outer}.") or not outer for outer in candidates):
            continue  # inside a block of an enclosing candidate
        candidates.append(name)
        if len(children) > best_len:
            best, best_len, tied = (name, module), len(children), []
        elif len(children) == best_len:
            tied.append(name)
    if best is None:
        return None
    prefix, container = best
    if tied:
        warnings.warn(
            f"blocks='auto' found {len(tied) + 1} containers of {best_len} same-class blocks: "
            f"{[prefix, *tied]}; watching only {prefix!r}. To watch the others too, name them: "
            f"blocks=[...qualified module names...] or blocks=callable(pl_module).",
            UserWarning,
            stacklevel=3,
        )
    return [(_join(prefix, name), module) for name, module in container.named_children()]


def parameter_owners(root: nn.Module) -> BlockList:
    """The submodules of ``root`` that own trainable parameters themselves (``recurse=False``), in
    registration order (``named_modules()``): for a ``Sequential`` MLP, its ``Linear`` layers.

    The innermost owners: a module of the user's whose submodules own parameters too is left to
    them (its own parameters still count in the parameter figures). A layer of ``torch.nn`` is
    taken whole (``nn.MultiheadAttention`` applies its ``out_proj`` weight itself, so that
    submodule's forward never runs). ``root`` itself is not a candidate: its output is the model's.
    """
    owners: BlockList = []
    whole: list[str] = []  # torch.nn layers taken whole: their submodules are internals
    for name, module in root.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer in whole):
            continue
        if not _owns_trainable(module):
            continue
        if _is_torch_layer(module):
            whole.append(name)
            owners.append((name, module))
        elif not any(_owns_trainable(sub) for sub in module.modules() if sub is not module):
            owners.append((name, module))
    return owners


def _owns_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def _is_torch_layer(module: nn.Module) -> bool:
    # The MRO, not the class: FSDP2 and user subclasses (class MyLinear(nn.Linear)) wrap the class.
    return any(
        cls is not nn.Module and cls.__module__.startswith("torch.nn.")
        for cls in type(module).__mro__
    )


class ForwardOrderCheck:
    """Warns once when a forward pass first reaches a block after a block listed later: blocks in
    registration order (``blocks="auto"`` without a repeated container) that the forward pass
    does not run in that order give gains between modules that are not consecutive.

    :meth:`reached` is host-side bookkeeping, called by the probe's forward hook outside
    ``torch.compile`` for each block the first time it is reached (later calls return at once).
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.done = not self.names
        self._seen: set[int] = set()
        self._latest = -1

    def reached(self, index: int) -> None:
        if self.done or index in self._seen:
            return
        self._seen.add(index)
        if index < self._latest:
            self.done = True
            later = self.names[self._latest]
            rank_zero_warn(
                f"GradientFlowCallback: blocks='auto' lists the modules that own parameters in "
                f"registration order, but the forward pass reached {self.names[index]!r} after "
                f"{later!r}, which is registered later. grad_gain/<block> compares each block with "
                "the one listed before it, so where the two orders differ a gain is not the "
                "backward gain through one module. Name the blocks in forward order: "
                "blocks=['...', '...', ...] (qualified module names).",
            )
        self._latest = max(self._latest, index)
        self.done = self.done or len(self._seen) == len(self.names)


def primary_tensor(output: Any) -> Optional[Tensor]:
    """The tensor of a block output whose gradient is measured (see the module docstring)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("last_hidden_state", "hidden_states"):
            value = output.get(key)
            if isinstance(value, Tensor):
                return value
        for value in output.values():
            found = primary_tensor(value)
            if found is not None:
                return found
        return None
    if isinstance(output, (tuple, list)):
        for value in output:
            found = primary_tensor(value)
            if found is not None:
                return found
        return None
    # A ModelOutput-like object that is not a mapping (e.g. a dataclass): the same fields, by name.
    for key in ("last_hidden_state", "hidden_states"):
        value = getattr(output, key, None)
        if isinstance(value, Tensor):
            return value
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        for item in dataclasses.fields(output):
            found = primary_tensor(getattr(output, item.name))
            if found is not None:
                return found
    return None


def eager_name(name: str) -> str:
    """``name`` without the ``_orig_mod`` components that ``torch.compile(module)`` wrappers add
    (``blocks.0._orig_mod.linear.weight`` -> ``blocks.0.linear.weight``): keys as in eager mode."""
    return ".".join(part for part in name.split(".") if part != COMPILED_MODULE_ATTR)
