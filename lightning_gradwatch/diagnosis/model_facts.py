"""Model facts from the module tree, collected once at fit start: per block the activation and
normalisation classes, parameter counts and the init scale of its weight matrices; plus a one-off
capture, during the first training forward, of whether each block is Post-LN shaped.

Cost: one walk over the modules and one batched ``std`` of the weight matrices with one host copy,
at fit start; then one forward hook per submodule of the blocks until each block has run one
training forward (they remove themselves). Nothing on later steps.

Post-LN test (conservative, documented in the README): a block is Post-LN shaped when the last
submodule to *finish* inside its forward is a normalisation layer whose input was made by an
addition (``grad_fn`` ``AddBackward0``), i.e. ``norm(x + f(x))``. A Pre-LN block
(``x + f(norm(x))``) finishes with its sublayer; a norm called as a function (``F.layer_norm``), a
residual added by ``torch.add`` under another name, or a block under torch.compile (no capture:
hooks added to a compiled module are ignored or break its graph) is left undecided (``None``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_gradwatch.measure.reduction import local_tensor

__all__ = [
    "ACTIVATIONS",
    "BlockFacts",
    "ModelFacts",
    "StructureCapture",
    "activation_name",
    "collect_model_facts",
    "norm_name",
]

#: Activation module classes recorded by their torch name (subclasses count as their torch base).
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Sigmoid, nn.Tanh, nn.ReLU6, nn.Hardtanh, nn.Softsign, nn.Hardsigmoid, nn.LogSigmoid,
    nn.ReLU, nn.Threshold, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Softplus, nn.Hardswish, nn.GLU,
)  # fmt: skip
#: Class names that are normalisation layers (torch's and look-alikes such as ``LlamaRMSNorm``).
_NORM_NAME = re.compile(r"(Layer|RMS|Group|Batch|Instance|Local\w*)Norm(\d+d)?$|Norm$")


@dataclass
class BlockFacts:
    """What the module tree says about one block (collected once, at fit start).

    Attributes:
        name: the block's qualified name.
        activations: activation classes inside it (torch names, e.g. ``"Sigmoid"``), sorted.
        norms: normalisation classes inside it (``"LayerNorm"``, ``"BatchNorm1d"``, ...), sorted.
        params: number of parameter elements in it; ``trainable``: those requiring grad.
        init_ratio: the largest ``weight.std() * sqrt(fan_in)`` over its weight matrices (PyTorch's
            default init gives about 0.58, He/Kaiming 1.41, Xavier about 1); ``None`` if none.
        init_layer: the parameter holding that largest ratio.
        post_norm: the block's last executed submodule is a normalisation layer applied to the
            result of an addition (the Post-LN shape ``norm(x + f(x))``), seen in the first
            training forward; ``None``: not seen (no forward yet, torch.compile).
    """

    name: str
    activations: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    params: int = 0
    trainable: int = 0
    init_ratio: Optional[float] = None
    init_layer: Optional[str] = None
    post_norm: Optional[bool] = None


@dataclass
class ModelFacts:
    """The module tree's facts: per block, plus parameter counts over the whole model.

    Attributes:
        blocks: per watched block, in forward order.
        trainable: parameter elements requiring grad in the whole model.
        embedding_params: of those, elements in ``nn.Embedding`` / ``nn.EmbeddingBag`` weights (rows
            a batch does not touch get exactly zero gradients).
    """

    blocks: list[BlockFacts] = field(default_factory=list)
    trainable: int = 0
    embedding_params: int = 0

    def blocks_with(
        self, names: Sequence[str], attribute: str = "activations"
    ) -> dict[str, list[str]]:
        """``{class name: [blocks]}`` for the classes of ``names`` found in ``attribute``."""
        found: dict[str, list[str]] = {}
        for block in self.blocks:
            for name in getattr(block, attribute):
                if name in names:
                    found.setdefault(name, []).append(block.name)
        return found


def activation_name(module: nn.Module) -> Optional[str]:
    """The torch activation class ``module`` is (``ReLU6`` before its base ``Hardtanh``)."""
    for cls in ACTIVATIONS:
        if isinstance(module, cls):
            return cls.__name__
    return None


def norm_name(module: nn.Module) -> Optional[str]:
    """The class name of ``module`` if it is a normalisation layer, else ``None``."""
    for cls in type(module).__mro__:
        if _NORM_NAME.search(cls.__name__):
            return type(module).__name__
    return None


def collect_model_facts(root: nn.Module, blocks: Sequence[tuple[str, nn.Module]]) -> ModelFacts:
    """The :class:`ModelFacts` of ``root`` and its ``blocks``.

    Example::

        facts = collect_model_facts(model, [("blocks.0", model.blocks[0])])
        facts.blocks[0].activations  # ['Sigmoid']
    """
    found = [_block_facts(name, module) for name, module in blocks]
    _fill_init_ratios(found, blocks)
    trainable = sum(p.numel() for p in root.parameters() if p.requires_grad)
    embedding = sum(
        m.weight.numel()
        for m in root.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.weight.requires_grad
    )
    return ModelFacts(blocks=found, trainable=trainable, embedding_params=embedding)


def _block_facts(name: str, block: nn.Module) -> BlockFacts:
    activations = {a for a in map(activation_name, block.modules()) if a is not None}
    norms = {n for n in map(norm_name, block.modules()) if n is not None}
    return BlockFacts(
        name=name,
        activations=sorted(activations),
        norms=sorted(norms),
        params=sum(p.numel() for p in block.parameters()),
        trainable=sum(p.numel() for p in block.parameters() if p.requires_grad),
    )


def _fill_init_ratios(found: list[BlockFacts], blocks: Sequence[tuple[str, nn.Module]]) -> None:
    """``std * sqrt(fan_in)`` of every weight matrix, one batched pass and one host copy.

    FSDP2 shards use the local shard (an estimate of the whole weight's std); flattened or empty
    weights (FSDP1, DeepSpeed stage 3) and meta tensors are left out.
    """
    owners: list[tuple[int, str]] = []
    weights = []
    for index, (name, block) in enumerate(blocks):
        for module_name, module in block.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
                continue
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or norm_name(module):
                continue
            local = local_tensor(weight.detach())
            if local.numel() < 2 or local.is_meta:
                continue
            weights.append((local, local[0].numel()))
            owners.append((index, ".".join(p for p in (name, module_name, "weight") if p)))
    if not weights:
        return
    stds = torch.stack([w.float().std().to(weights[0][0].device) for w, _ in weights]).tolist()
    for (index, layer), (_, fan_in), std in zip(owners, weights, stds):
        ratio = std * math.sqrt(fan_in)
        facts = found[index]
        if math.isfinite(ratio) and (facts.init_ratio is None or ratio > facts.init_ratio):
            facts.init_ratio, facts.init_layer = ratio, layer


class StructureCapture:
    """One-off forward hooks that decide each block's ``post_norm`` during its first training
    forward (grad enabled, module in training mode), then remove themselves.

    Example::

        capture = StructureCapture(blocks, facts)
        model(x).sum().backward()  # facts.blocks[i].post_norm is now True or False
        capture.remove()
    """

    def __init__(self, blocks: Sequence[tuple[str, nn.Module]], facts: ModelFacts) -> None:
        self._facts = facts
        self._handles: list[list[RemovableHandle]] = []
        self._last: list[Optional[tuple[nn.Module, Any]]] = [None] * len(blocks)
        for index, (_, block) in enumerate(blocks):
            handles = [
                child.register_forward_hook(self._child_hook(index))
                for child in block.modules()
                if child is not block
            ]
            handles.append(block.register_forward_hook(self._block_hook(index)))
            self._handles.append(handles)

    @property
    def done(self) -> bool:
        return not any(self._handles)

    def remove(self) -> None:
        for handles in self._handles:
            for handle in handles:
                handle.remove()
            handles.clear()

    def _child_hook(self, index: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            # Inside torch.compile: a no-op (traced as such), so the capture adds no graph break.
            if not torch.compiler.is_compiling():
                self._last[index] = (module, inputs[0] if inputs else None)

        return hook

    def _block_hook(self, index: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            # Sanity validation runs under no_grad; reentrant checkpointing re-runs the forward.
            if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and module.training):
                return
            last = self._last[index]
            self._facts.blocks[index].post_norm = last is not None and _is_norm_of_sum(*last)
            self._last[index] = None  # no activation kept alive past the decision
            for handle in self._handles[index]:
                handle.remove()
            self._handles[index].clear()

        return hook


def _is_norm_of_sum(module: nn.Module, first_input: Any) -> bool:
    grad_fn = getattr(first_input, "grad_fn", None)
    return norm_name(module) is not None and type(grad_fn).__name__.startswith("AddBackward")
