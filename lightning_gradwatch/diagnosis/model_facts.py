"""Model facts from the module tree, collected once at fit start: per block the activation and
normalisation classes, parameter counts and the init scale of its weight matrices (with the scheme
it matches: Xavier, He or LeCun). Whether each block has a residual connection and is Post-LN
shaped is seen in its first training forward (:mod:`lightning_gradwatch.diagnosis.structure`).

Cost: one walk over the modules and one batched ``std`` of the weight matrices with one host copy,
at fit start. Nothing on later steps.

The checks read these facts to decide which fixes a finding may suggest
(:mod:`lightning_gradwatch.diagnosis.remedies`); the facts file carries them to ``gradwatch report``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from lightning_gradwatch.measure.reduction import local_tensor

__all__ = [
    "ACTIVATIONS",
    "INIT_SCHEMES",
    "BlockFacts",
    "ModelFacts",
    "activation_name",
    "collect_model_facts",
    "init_scheme",
    "norm_name",
]

#: Activation module classes recorded by their torch name (subclasses count as their torch base).
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Sigmoid, nn.Tanh, nn.ReLU6, nn.Hardtanh, nn.Softsign, nn.Hardsigmoid, nn.LogSigmoid,
    nn.ReLU, nn.Threshold, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Softplus, nn.Hardswish, nn.GLU,
)  # fmt: skip
#: Activation functions a module may hold as an attribute instead of a submodule, by the name of
#: their module class: ``nn.TransformerEncoderLayer(activation="relu")`` keeps ``F.relu``.
_ACTIVATION_FUNCTIONS: dict[int, str] = {
    id(function): name
    for function, name in (
        (F.relu, "ReLU"), (torch.relu, "ReLU"), (F.relu6, "ReLU6"), (F.gelu, "GELU"),
        (F.sigmoid, "Sigmoid"), (torch.sigmoid, "Sigmoid"), (F.tanh, "Tanh"), (torch.tanh, "Tanh"),
        (F.silu, "SiLU"), (F.elu, "ELU"), (F.selu, "SELU"), (F.leaky_relu, "LeakyReLU"),
        (F.hardtanh, "Hardtanh"), (F.softsign, "Softsign"), (F.hardsigmoid, "Hardsigmoid"),
        (F.logsigmoid, "LogSigmoid"), (F.mish, "Mish"), (F.softplus, "Softplus"),
        (F.hardswish, "Hardswish"), (F.glu, "GLU"),
    )
}  # fmt: skip
#: Class names that are normalisation layers (torch's and look-alikes such as ``LlamaRMSNorm``).
_NORM_NAME = re.compile(r"(Layer|RMS|Group|Batch|Instance|Local\w*)Norm(\d+d)?$|Norm$")
#: The variance-scaled inits, each with the ``(fan_in, fan_out) -> std`` it draws with.
INIT_SCHEMES = {
    "xavier": lambda fan_in, fan_out: math.sqrt(2.0 / (fan_in + fan_out)),
    "he": lambda fan_in, fan_out: math.sqrt(2.0 / fan_in),
    "lecun": lambda fan_in, fan_out: 1.0 / math.sqrt(fan_in),
}
#: A weight matches a scheme when its std is within this factor of the scheme's std ...
INIT_TOLERANCE = 1.15
#: ... and it has at least this many elements (fewer: its std is too noisy to tell).
INIT_MIN_NUMEL = 64


@dataclass
class BlockFacts:
    """What the module tree says about one block (collected once, at fit start).

    Attributes:
        name: the block's qualified name.
        activations: activation classes inside it (torch names, e.g. ``"Sigmoid"``; functions held
            as attributes, like ``nn.TransformerEncoderLayer``'s ``F.relu``, count by the name
            of their class), sorted.
        norms: normalisation classes inside it (``"LayerNorm"``, ``"BatchNorm1d"``, ...), sorted.
        params: number of parameter elements in it; ``trainable``: those requiring grad.
        init_ratio: the largest ``weight.std() * sqrt(fan_in)`` over its weight matrices (PyTorch's
            default init gives about 0.58, He/Kaiming 1.41, Xavier about 1); ``None`` if none.
        init_layer: the parameter holding that largest ratio.
        post_norm: the block's last executed submodule is a normalisation layer applied to the
            result of an addition (the Post-LN shape ``norm(x + f(x))``), seen in the first
            training forward; ``None``: not seen (no forward yet, torch.compile).
        residual: the block's first training forward added two paths that leave one tensor
            (``x + f(x)``, or a projected shortcut ``g(x) + f(x)``); ``None``: not seen.
        init_schemes: the init scheme each weight matrix matches (:func:`init_scheme`:
            ``"xavier"``, ``"he"``, ``"lecun"``, or ``"other"``), sorted and without repeats;
            ``None``: no weight matrix large enough to tell.
    """

    name: str
    activations: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    params: int = 0
    trainable: int = 0
    init_ratio: Optional[float] = None
    init_layer: Optional[str] = None
    post_norm: Optional[bool] = None
    residual: Optional[bool] = None
    init_schemes: Optional[list[str]] = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockFacts:
        """From :func:`dataclasses.asdict` output; keys a newer version added are ignored, keys
        an older version lacked keep their defaults (unknown)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


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
            for name in getattr(block, attribute) or []:
                if name in names:
                    found.setdefault(name, []).append(block.name)
        return found

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFacts:
        """From :func:`dataclasses.asdict` output (the facts file's ``"model"``)."""
        return cls(
            [BlockFacts.from_dict(block) for block in data.get("blocks", [])],
            int(data.get("trainable", 0)),
            int(data.get("embedding_params", 0)),
        )


def activation_name(module: nn.Module) -> Optional[str]:
    """The torch activation class ``module`` is (``ReLU6`` before its base ``Hardtanh``)."""
    for cls in ACTIVATIONS:
        if isinstance(module, cls):
            return cls.__name__
    return None


def activation_functions(module: nn.Module) -> list[str]:
    """The activation functions ``module`` holds as attributes, by their module class's name."""
    found = (_ACTIVATION_FUNCTIONS.get(id(value)) for value in vars(module).values())
    return [name for name in found if name is not None]


def norm_name(module: nn.Module) -> Optional[str]:
    """The class name of ``module`` if it is a normalisation layer, else ``None``."""
    for cls in type(module).__mro__:
        if _NORM_NAME.search(cls.__name__):
            return type(module).__name__
    return None


def init_scheme(std: float, fan_in: int, fan_out: int) -> str:
    """The scheme of :data:`INIT_SCHEMES` whose std is nearest ``std`` (within
    :data:`INIT_TOLERANCE`), else ``"other"``; ties go to the first (Xavier before LeCun)."""
    if not (std > 0 and math.isfinite(std)):
        return "other"
    distance = {
        name: abs(math.log(std / scheme(fan_in, fan_out))) for name, scheme in INIT_SCHEMES.items()
    }
    best = min(distance, key=distance.__getitem__)
    return best if distance[best] <= math.log(INIT_TOLERANCE) else "other"


def collect_model_facts(root: nn.Module, blocks: Sequence[tuple[str, nn.Module]]) -> ModelFacts:
    """The :class:`ModelFacts` of ``root`` and its ``blocks``.

    Example::

        facts = collect_model_facts(model, [("blocks.0", model.blocks[0])])
        facts.blocks[0].activations  # ['Sigmoid']
    """
    found = [_block_facts(name, module) for name, module in blocks]
    _fill_init(found, blocks)
    trainable = sum(p.numel() for p in root.parameters() if p.requires_grad)
    embedding = sum(
        m.weight.numel()
        for m in root.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.weight.requires_grad
    )
    return ModelFacts(blocks=found, trainable=trainable, embedding_params=embedding)


def _block_facts(name: str, block: nn.Module) -> BlockFacts:
    activations = {a for a in map(activation_name, block.modules()) if a is not None}
    activations.update(a for m in block.modules() for a in activation_functions(m))
    norms = {n for n in map(norm_name, block.modules()) if n is not None}
    return BlockFacts(
        name=name,
        activations=sorted(activations),
        norms=sorted(norms),
        params=sum(p.numel() for p in block.parameters()),
        trainable=sum(p.numel() for p in block.parameters() if p.requires_grad),
    )


def _weight_matrices(name: str, block: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``(qualified name, parameter)`` of every parameter with 2 or more dimensions in ``block``
    (``nn.MultiheadAttention``'s ``in_proj_weight`` too), embeddings and norms left out."""
    for module_name, module in block.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or norm_name(module):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if param.dim() >= 2:
                yield ".".join(p for p in (name, module_name, param_name) if p), param


def _fill_init(found: list[BlockFacts], blocks: Sequence[tuple[str, nn.Module]]) -> None:
    """The std of every weight matrix, one batched pass and one host copy: each block's largest
    ``std * sqrt(fan_in)`` and the schemes its matrices match.

    Fans come from the full shape (``torch.nn.init``'s: dim 0 out, dim 1 in, the rest the
    receptive field). FSDP2 shards use the local shard's std (an estimate of the whole weight's);
    flattened or empty weights (FSDP1, DeepSpeed stage 3) and meta tensors are left out.
    """
    owners: list[tuple[int, str, int, int]] = []
    weights = []
    for index, (name, block) in enumerate(blocks):
        for layer, weight in _weight_matrices(name, block):
            local = local_tensor(weight.detach())
            if local.numel() < 2 or local.is_meta:
                continue
            receptive = math.prod(weight.shape[2:])
            owners.append((index, layer, weight.shape[1] * receptive, weight.shape[0] * receptive))
            weights.append(local)
    if not weights:
        return
    stds = torch.stack([w.float().std().to(weights[0].device) for w in weights]).tolist()
    schemes: list[set[str]] = [set() for _ in found]
    for (index, layer, fan_in, fan_out), weight, std in zip(owners, weights, stds):
        ratio = std * math.sqrt(fan_in)
        facts = found[index]
        if math.isfinite(ratio) and (facts.init_ratio is None or ratio > facts.init_ratio):
            facts.init_ratio, facts.init_layer = ratio, layer
        if weight.numel() >= INIT_MIN_NUMEL:
            schemes[index].add(init_scheme(std, fan_in, fan_out))
    for facts, names in zip(found, schemes):
        facts.init_schemes = sorted(names) if names else None
