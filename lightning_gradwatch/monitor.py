"""``GradientGainMonitor``: gradient-flow diagnostics for plain PyTorch loops (no Lightning needed).

Keeps the ``GradientGainMonitor`` API: constructor, methods, summary keys and the report format.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Optional

from torch import nn

from lightning_gradwatch.keys import DEFAULT_EPS
from lightning_gradwatch.measure.probe import CALLS, NUMEL, PARTIAL, GradientProbe
from lightning_gradwatch.numerics.norms import (
    classify_gain,
    compute_gains,
    compute_log_gains,
    finalize_norm,
    summarize_gains,
    validate_norm_type,
)
from lightning_gradwatch.validation import check_positive, check_thresholds, check_type

_REPORT_LABEL = {
    "amplifying": "AMPLIFYING",
    "damping": "DAMPING",
    "healthy": "Healthy",
    "vanishing": "VANISHING",
    "missing": "MISSING",
}


class GradientGainMonitor:
    """Measure ``||dL/dh_i||`` at each block output and the backward gains between blocks.

    ``gamma_i = ||dL/dh_(i-1)|| / ||dL/dh_i||`` (the *backward* gain): ``> 1`` the gradient grows going
    backward, ``< 1`` it shrinks. A block that took no part in the backward (frozen, skipped) has norm
    ``None`` and its transitions count as missing. Norms stay on the device until asked for; each call
    of :meth:`norms` (and of everything built on it) copies them to the host once.

    Args:
        blocks: the blocks to watch, in forward order (``ModuleList``, ``Sequential`` or a list of
            distinct modules).
        norm_type: ``"l2"`` (Euclidean), ``"l1"``, ``"linf"`` (max absolute value) or ``"mean"``
            (mean absolute value; not a true norm).
        strict_single_backward: raise ``RuntimeError`` when a second backward arrives without
            :meth:`reset`; with ``False`` a new backward overwrites the previous measurement.
        eps: norms at or below ``eps`` count as zero (the gain into them is ``inf``: vanishing).
        damping_threshold: gains below it are "damping" (heuristic, default 0.5).
        amplifying_threshold: gains above it are "amplifying" (heuristic, default 2.0).

    Example::

        with GradientGainMonitor(model.blocks) as monitor:
            loss = model(x).pow(2).mean()
            loss.backward()
            print(monitor.report())
    """

    def __init__(
        self,
        blocks: Iterable[nn.Module],
        norm_type: str = "l2",
        strict_single_backward: bool = True,
        eps: float = DEFAULT_EPS,
        damping_threshold: float = 0.5,
        amplifying_threshold: float = 2.0,
    ) -> None:
        if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise TypeError(
                "`blocks` must be a list, nn.ModuleList or nn.Sequential of modules, got a single "
                f"{type(blocks).__name__}; wrap it: [module]."
            )
        modules = list(blocks)
        if not modules:
            raise ValueError("`blocks` must contain at least one module, got none.")
        for index, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"`blocks[{index}]` must be an nn.Module, got {type(module).__name__}."
                )
        if len({id(module) for module in modules}) != len(modules):
            raise ValueError("`blocks` must be separate nn.Module instances; one appears twice.")
        self.norm_type = validate_norm_type(norm_type)
        self.strict_single_backward = check_type(
            strict_single_backward, bool, "strict_single_backward"
        )
        self.eps = check_positive(eps, "eps")
        self.damping_threshold, self.amplifying_threshold = check_thresholds(
            damping_threshold, amplifying_threshold
        )
        self._probe = GradientProbe(
            [(str(i), module) for i, module in enumerate(modules)],
            self.norm_type,
            accumulate=False,
            strict_single_backward=self.strict_single_backward,
        )
        self._probe.arm()

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> GradientGainMonitor:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        self.close()

    def reset(self) -> None:
        """Clear the recorded gradients before the next backward pass."""
        self._probe.reset()

    def close(self) -> None:
        """Remove every hook (done automatically by the context manager)."""
        self._probe.remove()

    # -- results ---------------------------------------------------------------------------------

    def norms(self) -> list[Optional[float]]:
        """The gradient norm at each block output; ``None`` for a block that got no gradient."""
        rows = self._probe.buffer.tolist()  # the one device-to-host copy
        return [
            finalize_norm(row[PARTIAL], row[NUMEL], self.norm_type) if row[CALLS] > 0 else None
            for row in rows
        ]

    def gains(self) -> list[Optional[float]]:
        """``gamma_i = norm[i-1] / norm[i]`` for each transition (length ``num_blocks - 1``)."""
        return compute_gains(self.norms(), self.eps)

    def log_gains(self) -> list[Optional[float]]:
        """``log(norm[i-1]) - log(norm[i])``: numerically stable gains, good for plots."""
        return compute_log_gains(self.norms(), self.eps)

    def summary_stats(self) -> dict[str, float]:
        """The keys ``mean_gain``, ``min_gain``, ``max_gain``, ``mean_log_gain`` (over finite gains;
        NaN when there is none), ``num_amplifying``, ``num_damping``, ``num_healthy``,
        ``num_vanishing`` (gain ``inf``) and ``num_missing`` (gain ``None``)."""
        norms = self.norms()
        return summarize_gains(
            compute_gains(norms, self.eps),
            compute_log_gains(norms, self.eps),
            self.damping_threshold,
            self.amplifying_threshold,
        )

    def report(self) -> str:
        """A human-readable report: norms, gains with their category, summary statistics."""
        norms = self.norms()
        return format_report(
            norms,
            compute_gains(norms, self.eps),
            compute_log_gains(norms, self.eps),
            norm_type=self.norm_type,
            damping_threshold=self.damping_threshold,
            amplifying_threshold=self.amplifying_threshold,
        )


def format_report(
    norms: list[Optional[float]],
    gains: list[Optional[float]],
    log_gains: list[Optional[float]],
    *,
    norm_type: str,
    damping_threshold: float = 0.5,
    amplifying_threshold: float = 2.0,
    names: Optional[list[str]] = None,
    title: str = "Gradient Flow Report",
    block_notes: Optional[Sequence[str]] = None,
    transition_notes: Optional[Sequence[str]] = None,
) -> str:
    """The GradientGainMonitor text report (shared by the monitor and ``gradwatch report``).

    ``block_notes``/``transition_notes`` (one string per block/transition) are appended to the
    norm and gain lines; ``gradwatch report`` puts its over-the-run figures there.
    """
    lo, hi = damping_threshold, amplifying_threshold
    lines = [f"{title} (norm_type={norm_type})", "=" * 60, "Gradient Norms (per block output):"]
    for i, norm in enumerate(norms):
        label = f"  Block {i:2d}" + (f" ({names[i]})" if names else "")
        note = f"  {block_notes[i]}" if block_notes else ""
        lines.append(f"{label}: {'None (no gradient)' if norm is None else f'{norm:.6e}'}{note}")
    lines += ["", "Gradient Gains (ratio of consecutive norms):"]
    for i, (gain, log_gain) in enumerate(zip(gains, log_gains)):
        label = _REPORT_LABEL[classify_gain(gain, lo, hi).value]
        lines.append(
            f"  Transition {i:2d} to {i + 1:2d}: gamma={_fmt(gain)}, "
            f"log_gamma={_fmt(log_gain)} [{label}]"
            + (f"  {transition_notes[i]}" if transition_notes else "")
        )
    stats = summarize_gains(gains, log_gains, lo, hi)
    lines += [
        "",
        "Summary Statistics:",
        f"  Mean gain: {_fmt(stats['mean_gain'])}",
        f"  Min gain: {_fmt(stats['min_gain'])}",
        f"  Max gain: {_fmt(stats['max_gain'])}",
        f"  Mean log gain: {_fmt(stats['mean_log_gain'])}",
        f"  Amplifying (gamma > {hi}): {stats['num_amplifying']}",
        f"  Damping (gamma < {lo}): {stats['num_damping']}",
        f"  Healthy ({lo} <= gamma <= {hi}): {stats['num_healthy']}",
        f"  Vanishing (gamma = inf): {stats['num_vanishing']}",
        f"  Missing (no gradient): {stats['num_missing']}",
        "",
        "Note: category thresholds are heuristics; tune them for your model.",
    ]
    return "\n".join(lines)


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "None"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.4f}"
