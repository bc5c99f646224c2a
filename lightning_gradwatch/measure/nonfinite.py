"""Where a NaN/Inf started: the block whose backward produced the first non-finite gradient, from
the block-output norms of a measured step or, without them, from the parameters' owners.

Plain floats and names; no Lightning, no I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class NonFiniteReport:
    """Where a non-finite gradient was seen.

    Attributes:
        block: the block whose backward produced the first NaN/Inf (``None`` if it cannot be told).
        blocks: blocks whose output gradient was non-finite (measured steps), else blocks with a
            non-finite parameter gradient; forward order.
        params: parameters with a non-finite gradient.
        loss_nonfinite: whether the loss itself was NaN/Inf (``None``: unknown).
    """

    block: Optional[str] = None
    blocks: list[str] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    loss_nonfinite: Optional[bool] = None

    def message(self) -> str:
        if self.loss_nonfinite:
            where = "the loss itself is non-finite (look at the forward pass, the data or the loss)"
        elif self.block is not None:
            where = f"first produced in the backward of block {self.block!r}"
        else:
            where = "origin not among the watched blocks"
        params = ", ".join(self.params[:5]) + (" ..." if len(self.params) > 5 else "")
        return f"non-finite gradient: {where}; parameters with NaN/Inf gradients: [{params}]"


def block_of(param_name: str, block_names: Sequence[str]) -> Optional[str]:
    """The block owning parameter ``param_name`` (longest matching qualified-name prefix)."""
    owners = [b for b in block_names if param_name == b or param_name.startswith(b + ".")]
    return max(owners, key=len) if owners else None


def locate_nonfinite(
    block_names: Sequence[str],
    nonfinite_params: Sequence[str],
    block_norms: Optional[Sequence[Optional[float]]] = None,
    loss_nonfinite: Optional[bool] = None,
    *,
    chained: Optional[Sequence[bool]] = None,
) -> NonFiniteReport:
    """Name the block whose backward produced the first non-finite gradient.

    Backward runs from the last block to the first, and a NaN/Inf, once made, flows into everything
    before it. With block-output norms (a measured step) the non-finite block closest to the output,
    ``j``, is the first one backward reached with a bad gradient. That gradient was made by the
    backward of block ``j + 1`` if ``j + 1``'s own parameters already got NaN/Inf (the poison arose
    inside it), or if ``j + 1`` got a gradient and its input was ``j``'s output itself
    (``chained[j + 1]``: nothing but block ``j + 1`` lies between the two outputs); else it arrived
    at ``j``'s output from outside the watched blocks' internals, and ``j`` is named. Without block
    norms (unmeasured steps, no hooks) the block closest to the output that owns a parameter with a
    non-finite gradient is named (a NaN made by the very last operation of block ``k``'s backward,
    at its input before any of its parameters, which leaves ``k``'s parameters finite, is then
    reported as block ``k - 1``).
    """
    params = list(nonfinite_params)
    bad_param_blocks = {block_of(name, block_names) for name in params} - {None}
    report = NonFiniteReport(params=params, loss_nonfinite=loss_nonfinite)
    if block_norms is not None:
        bad = [
            i for i, norm in enumerate(block_norms) if norm is not None and not math.isfinite(norm)
        ]
        report.blocks = [block_names[i] for i in bad]
        if bad:
            j = bad[-1]
            after = j + 1
            inside_next = after < len(block_names) and (
                block_names[after] in bad_param_blocks
                or (
                    chained is not None
                    and after < len(chained)
                    and chained[after]
                    and block_norms[after] is not None
                )
            )
            if inside_next:
                report.block = block_names[after]
            else:
                report.block = block_names[j]
            return report
    report.blocks = [name for name in block_names if name in bad_param_blocks]
    report.block = report.blocks[-1] if report.blocks else None
    return report
