"""Which modules are blocks, and which tensor of a block's output is measured.

``blocks`` may be ``"auto"``, a dotted attribute path to a container, a list of qualified module names,
or a callable returning ``(name, module)`` pairs. The *primary tensor* of a block output is:

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
from typing import Any, Callable, Optional, Union

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


def resolve_blocks(root: nn.Module, blocks: BlocksSpec) -> BlockList:
    """The ``(qualified name, module)`` pairs ``blocks`` designates inside ``root``.

    Raises:
        ValueError: if a named module does not exist, or ``"auto"`` finds no repeated-block container.
    """
    if callable(blocks) and not isinstance(blocks, str):
        found = [(str(name), module) for name, module in blocks(root)]
        if not found or not all(isinstance(module, nn.Module) for _, module in found):
            raise ValueError(
                "The `blocks` callable must return a non-empty list of (name, nn.Module) pairs."
            )
        return found
    if blocks == "auto":
        return discover_blocks(root)
    modules = dict(root.named_modules())
    if isinstance(blocks, str):
        container = _lookup(modules, blocks)
        children = list(container.named_children())
        if not children:
            raise ValueError(f"`blocks={blocks!r}` names a module with no child modules.")
        return [(_join(blocks, name), module) for name, module in children]
    return [(name, _lookup(modules, name)) for name in blocks]


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
    """
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
        raise ValueError(
            "Could not find the model's blocks automatically: no nn.ModuleList or nn.Sequential "
            f"holds two or more modules of one class. {_HOW_TO_NAME}"
        )
    prefix, container = best
    if tied:
        warnings.warn(
            f"blocks='auto' found {len(tied) + 1} containers of {best_len} same-class blocks: "
            f"{[prefix, *tied]}; watching only {prefix!r}. To watch the others too, name them: "
            f"blocks=[...qualified module names...] or blocks=callable(pl_module).",
            UserWarning,
            stacklevel=2,
        )
    return [(_join(prefix, name), module) for name, module in container.named_children()]


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
