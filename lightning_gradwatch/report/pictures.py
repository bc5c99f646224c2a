"""Pictures of gradient flow, shared by the TensorBoard writer and ``gradwatch report``: the blocks x
steps heatmap (matplotlib, Agg, no pyplot state) and the TensorBoard custom-scalars layout that puts
all blocks into one multi-line chart.

matplotlib is optional (``pip install 'lightning-gradwatch[plots]'``) and imported only when a
picture is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lightning_gradwatch.diagnosis.flow_arrays import log_gains_array
from lightning_gradwatch.keys import (
    DEFAULT_EPS,
    HESSIAN_MAX_EIG_KEY,
    PRECONDITIONED_MAX_EIG_KEY,
    SHARPNESS_RATIO_KEY,
    SHARPNESS_THRESHOLD_KEY,
    TOTAL_NORM_KEY,
    flow_key,
    gain_key,
    log_gain_key,
    norm_key,
    update_ratio_key,
)

PLOTS_EXTRA = "lightning-gradwatch[plots]"
#: Pixels of the heatmap image: fixed width, height growing with the number of blocks.
HEATMAP_DPI = 80
HEATMAP_WIDTH_IN = 10.0
#: A panel is ``_PANEL_BASE_IN + rows * _ROW_IN`` inches high (at most ``_PANEL_MAX_IN``): the image
#: grows by one row per block from 2 blocks up to 100, and stays bounded beyond. Every size is a
#: multiple of 1/8 inch (10 pixels), exact in binary, so the pixel size never depends on rounding.
_ROW_IN = 0.125  # height of one block row
_PANEL_BASE_IN, _PANEL_MAX_IN = 1.0, 13.5
_MARGIN_IN = 1.625  # titles, axis labels, gap between the panels

#: Chart titles of the custom-scalars layout (category ``gradwatch``).
LAYOUT_CATEGORY = "gradwatch"
NORMS_CHART = "block-output gradient norms"
GAINS_CHART = "backward gains"
LOG_GAINS_CHART = "backward log-gains"
TOTAL_CHART = "total gradient norm"
CATEGORIES_CHART = "transition categories"
UPDATES_CHART = "update-to-weight ratios"
#: The curvature charts (category ``gradwatch curvature``, with ``log_curvature=True``).
CURVATURE_CATEGORY = "gradwatch curvature"
SHARPNESS_CHART = "sharpness against its stability threshold"
RATIO_CHART = "sharpness ratio (1 = edge of stability)"


def import_matplotlib() -> tuple[Any, Any]:
    """``(Figure, FigureCanvasAgg)``; an ``ImportError`` naming the extra when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"gradient-flow pictures need matplotlib: pip install '{PLOTS_EXTRA}'"
        ) from error
    return Figure, FigureCanvasAgg


def heatmap_size_px(num_blocks: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of :func:`render_flow_heatmap`'s image for ``num_blocks``."""
    width, height = _heatmap_size_in(num_blocks)
    return int(width * HEATMAP_DPI), int(height * HEATMAP_DPI)  # as matplotlib truncates


def _heatmap_size_in(num_blocks: int) -> tuple[float, float]:
    norms = min(_PANEL_BASE_IN + num_blocks * _ROW_IN, _PANEL_MAX_IN)
    gains = min(_PANEL_BASE_IN + max(num_blocks - 1, 1) * _ROW_IN, _PANEL_MAX_IN)
    return HEATMAP_WIDTH_IN, norms + gains + _MARGIN_IN


def render_flow_heatmap(
    steps: Sequence[int] | np.ndarray,
    block_names: Sequence[str],
    norms: np.ndarray,
    title: str = "Gradient flow",
    eps: float = DEFAULT_EPS,
) -> Any:
    """A two-panel matplotlib ``Figure``: log10 of each block's output-gradient norm (blocks x
    measured steps) and the log-gain of every transition on a diverging map centred on 0 (blue:
    the gradient shrinks going backward, red: it grows).

    Args:
        steps: the measured steps (columns).
        block_names: the blocks in forward order (rows).
        norms: ``(len(steps), len(block_names))``; NaN for a missing value.
        title: the figure title.
        eps: norms at or below it count as zero.

    Example::

        figure = render_flow_heatmap([0, 10, 20], ["blocks.0", "blocks.1"], norms)
        figure.savefig("flow.png")
    """
    Figure, FigureCanvasAgg = import_matplotlib()
    norms = np.asarray(norms, dtype=np.float64).reshape(len(steps), len(block_names))
    n = len(block_names)
    width, height = _heatmap_size_in(n)
    figure = Figure(figsize=(width, height), dpi=HEATMAP_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, height_ratios=[max(n, 1), max(n - 1, 1)])
    extent = _extent(np.asarray(steps))
    _draw_norms_panel(figure, top, norms, block_names, extent, title, eps)
    _draw_gains_panel(figure, bottom, norms, block_names, extent, eps)
    return figure


def _draw_norms_panel(
    figure: Any,
    axes: Any,
    norms: np.ndarray,
    block_names: Sequence[str],
    extent: tuple[float, float],
    title: str,
    eps: float,
) -> None:
    """The top panel: log10 of each block's norm, one row per block (grey where zero or missing)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        log_norms = np.log10(np.where(norms > eps, norms, np.nan)).T
    image = axes.imshow(
        log_norms,
        aspect="auto",
        interpolation="nearest",
        cmap=_cmap("viridis"),
        extent=(*extent, len(block_names), 0),
    )
    figure.colorbar(image, ax=axes, label="log10 ||dL/dh||")
    axes.set_title(f"{title}: block-output gradient norm")
    _label_rows(axes, block_names)


def _draw_gains_panel(
    figure: Any,
    axes: Any,
    norms: np.ndarray,
    block_names: Sequence[str],
    extent: tuple[float, float],
    eps: float,
) -> None:
    """The bottom panel: the log-gain of each transition, on a diverging map symmetric about 0 (one
    empty row when there is a single block, so the figure keeps its shape)."""
    from matplotlib.colors import TwoSlopeNorm

    n = len(block_names)
    gains = log_gains_array(norms, eps).T
    finite = gains[np.isfinite(gains)]
    limit = float(np.max(np.abs(finite))) if finite.size else 1.0
    limit = max(limit, 1e-3)
    shown = np.clip(np.where(np.isnan(gains), np.nan, gains), -limit, limit)
    image = axes.imshow(
        shown if n > 1 else np.full((1, norms.shape[0]), np.nan),
        aspect="auto",
        interpolation="nearest",
        cmap=_cmap("RdBu_r"),
        norm=TwoSlopeNorm(vcenter=0.0, vmin=-limit, vmax=limit),
        extent=(*extent, max(n - 1, 1), 0),
    )
    figure.colorbar(image, ax=axes, label="log gain (0 = preserved)")
    axes.set_title("log-gain per transition (red: grows going backward, blue: shrinks)")
    _label_rows(axes, [f"{a} <- {b}" for a, b in zip(block_names[:-1], block_names[1:])])
    axes.set_xlabel("step")


def figure_to_array(figure: Any) -> np.ndarray:
    """The rendered figure as an ``(H, W, 3)`` uint8 RGB array."""
    canvas = figure.canvas
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _cmap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name].with_extremes(bad="lightgrey")


def _extent(steps: np.ndarray) -> tuple[float, float]:
    if len(steps) == 0:
        return 0.0, 1.0
    if len(steps) == 1:
        return float(steps[0]) - 0.5, float(steps[0]) + 0.5
    half = (steps[-1] - steps[0]) / (len(steps) - 1) / 2
    return float(steps[0] - half), float(steps[-1] + half)


def _label_rows(axes: Any, labels: Sequence[str]) -> None:
    # Label at most ~25 rows so that 100 blocks stay legible.
    stride = max(1, len(labels) // 25)
    positions = np.arange(0, len(labels), stride)
    axes.set_yticks(positions + 0.5)
    axes.set_yticklabels([labels[int(i)] for i in positions], fontsize=7)


# --------------------------------------------------------------------------------------------------
# TensorBoard custom scalars
# --------------------------------------------------------------------------------------------------


def custom_scalars_layout(
    block_names: Sequence[str], update_totals: Sequence[str] = (), curvature: bool = False
) -> dict[str, dict[str, list[Any]]]:
    """The layout for ``SummaryWriter.add_custom_scalars``: every block's norm in one multi-line
    chart, every gain in another, log-gains, the total norm and the category counts (the total
    alone when there are no blocks); given ``update_totals`` (``log_updates=True``: the
    ``update_ratio_total`` keys), every block's update ratio and those totals in one more chart;
    with ``curvature``, a second category: the sharpness (the top Hessian eigenvalue, Adam's
    preconditioned one) with its threshold, and their ratio.

    Each tag is listed by its full name (TensorBoard reads them as regular expressions; a ``.`` in a
    name matches itself among others, and every match is one of our tags)."""
    names = list(block_names)
    extra = {CURVATURE_CATEGORY: _curvature_charts()} if curvature else {}
    updates = {
        UPDATES_CHART: ["Multiline", [update_ratio_key(n) for n in names] + list(update_totals)]
    }
    if not names:
        charts = {TOTAL_CHART: ["Multiline", [TOTAL_NORM_KEY]]}
        return {LAYOUT_CATEGORY: {**charts, **(updates if update_totals else {})}, **extra}
    return {
        **extra,
        LAYOUT_CATEGORY: {
            NORMS_CHART: ["Multiline", [norm_key(name) for name in names]],
            GAINS_CHART: ["Multiline", [gain_key(name) for name in names[1:]]],
            LOG_GAINS_CHART: ["Multiline", [log_gain_key(name) for name in names[1:]]],
            TOTAL_CHART: ["Multiline", [TOTAL_NORM_KEY]],
            CATEGORIES_CHART: [
                "Multiline",
                [
                    flow_key(f"num_{c}")
                    for c in ("amplifying", "damping", "healthy", "vanishing", "missing")
                ],
            ],
            **(updates if update_totals else {}),
        },
    }


def _curvature_charts() -> dict[str, list[Any]]:
    # Each tag as a regular expression that also matches its per-optimizer form (`<key>/<name>`).
    sharpness = (HESSIAN_MAX_EIG_KEY, PRECONDITIONED_MAX_EIG_KEY, SHARPNESS_THRESHOLD_KEY)
    return {
        SHARPNESS_CHART: ["Multiline", [f"{key}(/.*)?$" for key in sharpness]],
        RATIO_CHART: ["Multiline", [f"{SHARPNESS_RATIO_KEY}(/.*)?$"]],
    }


def layout_block_names(serialized: bytes) -> list[str]:
    """Block names in forward order from a serialised custom-scalars ``Layout`` proto."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout.FromString(serialized)
    for category in layout.category:
        for chart in category.chart:
            if category.title == LAYOUT_CATEGORY and chart.title == NORMS_CHART:
                return [tag.split("/", 1)[1] for tag in chart.multiline.tag]
    return []
