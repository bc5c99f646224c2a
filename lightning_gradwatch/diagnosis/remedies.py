"""Which fixes a finding may suggest: the model facts decide.

A structural fix (residual connections, normalisation, a variance-scaled init) is suggested only for
the blocks whose facts show that they lack it; what every block already has is named instead, and
the finding points to what is left (Pre-LN placement, learning-rate warm-up, a lower rate). Telling
a Post-LN transformer to add the residual connections and LayerNorm it has sends its user after
changes already made. Without facts (``gradwatch report`` on logs without the facts file) the
generic advice stays, and the finding says that it is generic.

Pure: model facts in, sentences out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

from lightning_gradwatch.diagnosis.findings import short_list
from lightning_gradwatch.diagnosis.model_facts import INIT_TOLERANCE, BlockFacts, ModelFacts

__all__ = [
    "GENERIC",
    "PRE_LN",
    "SCALED_INITS",
    "WARMUP_OR_LOWER",
    "Presence",
    "Structure",
]

#: The evidence line of a finding whose suggestions could not be checked against the model.
GENERIC = (
    "model facts unavailable: the suggestions are generic, not checked against this model "
    "(they may name what it already has)"
)
#: Init schemes that keep the variance of activations and gradients through a layer.
SCALED_INITS = ("he", "lecun", "xavier")
_INIT_NAMES = {"he": "He/Kaiming", "lecun": "LeCun", "xavier": "Xavier"}
PRE_LN = (
    "move the normalisation before each sublayer (Pre-LN: x + f(norm(x)); "
    "nn.TransformerEncoderLayer(norm_first=True)): the residual path then carries the gradient "
    "unchanged through every block"
)
#: What is left to try on the learning rate when the blocks have every structural remedy.
WARMUP_OR_LOWER = (
    "add a learning-rate warm-up (e.g. torch.optim.lr_scheduler.LinearLR from a small factor over "
    "the first hundreds of steps) or lower the learning rate: large early updates can collapse the "
    "gradient of a model that has every structural remedy"
)


@dataclass(frozen=True)
class Presence:
    """The blocks whose facts show a feature (``have``) or its absence (``lack``); blocks whose
    facts do not tell are in neither."""

    have: list[str]
    lack: list[str]

    @classmethod
    def of(
        cls, blocks: Sequence[BlockFacts], test: Callable[[BlockFacts], Optional[bool]]
    ) -> Presence:
        tested = [(block.name, test(block)) for block in blocks]
        return cls(
            [name for name, has in tested if has is True],
            [name for name, has in tested if has is False],
        )

    @property
    def everywhere(self) -> bool:
        """Every block that tells has it, and at least one tells."""
        return bool(self.have) and not self.lack

    @property
    def unknown(self) -> bool:
        return not (self.have or self.lack)


@dataclass(frozen=True)
class Structure:
    """What the blocks have that keeps a gradient flowing: residual connections, normalisation
    (and whether it is Post-LN), a variance-scaled init."""

    names: list[str]
    residual: Presence
    norm: Presence
    post_norm: Presence
    init: Presence
    norm_names: list[str]
    init_names: list[str]

    @classmethod
    def of(cls, facts: ModelFacts) -> Structure:
        blocks = facts.blocks

        def scaled(block: BlockFacts) -> Optional[bool]:
            schemes = block.init_schemes
            return None if not schemes else all(s in SCALED_INITS for s in schemes)

        return cls(
            names=[b.name for b in blocks],
            residual=Presence.of(blocks, lambda b: b.residual),
            norm=Presence.of(blocks, lambda b: bool(b.norms)),
            post_norm=Presence.of(blocks, lambda b: b.post_norm),
            init=Presence.of(blocks, scaled),
            norm_names=sorted({n for b in blocks for n in b.norms}),
            init_names=sorted(
                {s for b in blocks for s in b.init_schemes or [] if s in SCALED_INITS}
            ),
        )

    @property
    def post_ln(self) -> bool:
        """Every block with a norm that tells is Post-LN shaped."""
        return self.norm.everywhere and self.post_norm.everywhere

    def present(self, residual: bool = True, norm: bool = True, init: bool = True) -> Optional[str]:
        """``"the blocks already have residual connections, LayerNorm (Post-LN: ...) and
        Xavier-scaled init"``: the features of those asked for that every block has (``None``:
        none)."""
        parts = []
        if residual and self.residual.everywhere:
            parts.append("residual connections (x + f(x))")
        if norm and self.norm.everywhere:
            placement = " (Post-LN: norm(x + f(x)))" if self.post_ln else ""
            parts.append("/".join(self.norm_names) + placement)
        if init and self.init.everywhere:
            names = "/".join(_INIT_NAMES[name] for name in self.init_names)
            within = f"{INIT_TOLERANCE - 1:.0%}"
            parts.append(f"{names}-scaled init (each weight std within {within} of the scheme's)")
        if not parts:
            return None
        listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"the blocks already have {listed}"

    @property
    def lacks(self) -> bool:
        """Some block is shown to lack a residual connection, normalisation or a scaled init."""
        return bool(self.residual.lack or self.norm.lack or self.init.lack)

    def missing(self, residual: bool = True) -> list[str]:
        """Normalisation (and residual connections, with ``residual``) for the blocks that lack
        them, as one suggestion; a residual connection nobody could see is offered if missing."""
        need = []
        if self.norm.lack:
            need.append("normalisation (LayerNorm/BatchNorm)")
        if residual and self.residual.lack:
            need.append("residual connections (x + f(x))")
        lack = set(self.norm.lack) | set(self.residual.lack if residual else [])
        lacking = [name for name in self.names if name in lack]  # in forward order
        found = []
        if need:
            why = (
                "so the gradient keeps an identity path"
                if residual and self.residual.lack
                else "so each block's output keeps a steady scale"
            )
            found.append(f"add {' and '.join(need)} in {short_list(lacking, 4)}, {why}")
        if residual and self.residual.unknown:
            found.append(
                "if the blocks have no residual connection (it could not be seen), add one "
                "(x + f(x)) so the gradient keeps an identity path"
            )
        return found
