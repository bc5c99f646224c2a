"""TensorBoard pictures: the heatmap image and the custom-scalars layout, read back from the event
file with tensorboard's own EventAccumulator; the CSV-only case; the bounded history."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
from expected_warnings import WIRING_REPORT
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from models import BlockNet
from PIL import Image
from reference import logger_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch.diagnosis.run_history import RunHistory
from lightning_gradwatch.lightning.tensorboard import HEATMAP_TAG
from lightning_gradwatch.report.pictures import heatmap_size_px, render_flow_heatmap

pytestmark = WIRING_REPORT


def _fit(tmp_path: Path, depth: int, loggers: list, **kwargs) -> GradientFlowCallback:
    callback = GradientFlowCallback(log_every_n_steps=1, **kwargs)
    trainer = pl.Trainer(
        max_steps=4,
        logger=loggers,
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
        log_every_n_steps=1,
    )
    trainer.fit(BlockNet(depth=depth, n_samples=64, batch_size=16))
    return callback


def _accumulator(log_dir: str) -> EventAccumulator:
    accumulator = EventAccumulator(log_dir, size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("depth", [3, 7])
def test_heatmap_image_and_layout_in_event_file(tmp_path: Path, depth: int) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version="", default_hp_metric=False)
    callback = _fit(tmp_path, depth, [logger], figure_every_n_steps=2)
    blocks = [f"blocks.{i}" for i in range(depth)]
    assert callback.block_names == blocks
    accumulator = _accumulator(logger.log_dir)

    # 4 measured steps (0..3), a picture every 2nd measured one: steps 1 and 3.
    images = accumulator.Images(HEATMAP_TAG)
    assert [image.step for image in images] == [1, 3]
    width, height = heatmap_size_px(depth)
    for image in images:
        assert (image.width, image.height) == (width, height)
        decoded = Image.open(io.BytesIO(image.encoded_image_string))
        assert decoded.size == (width, height)
        # Not a blank canvas: the heatmap has many colours.
        pixels = np.asarray(decoded.convert("RGB")).reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50

    # The custom-scalars layout names every block, in forward order, in one chart per figure kind.
    (event,) = accumulator.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}
    assert charts["block-output gradient norms"] == [f"grad_norm/{b}" for b in blocks]
    assert charts["backward gains"] == [f"grad_gain/{b}" for b in blocks[1:]]
    assert charts["backward log-gains"] == [f"grad_log_gain/{b}" for b in blocks[1:]]
    logged = set(accumulator.Tags()["scalars"])
    for tags in charts.values():
        assert set(tags) <= logged  # every charted tag is a real scalar of the run


def test_heatmap_height_grows_with_blocks() -> None:
    sizes = [heatmap_size_px(n) for n in (2, 8, 16, 40)]
    assert len({w for w, _ in sizes}) == 1
    heights = [h for _, h in sizes]
    assert heights == sorted(heights) and heights[0] < heights[-1]
    # A rendered figure has exactly the advertised size.
    norms = np.geomspace(1e-6, 1.0, 5 * 8).reshape(5, 8)
    figure = render_flow_heatmap(np.arange(5) * 10, [f"b{i}" for i in range(8)], norms)
    figure.canvas.draw()
    assert figure.canvas.get_width_height() == heatmap_size_px(8)


def test_csv_only_logger_skips_pictures_with_one_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logger = CSVLogger(tmp_path, name="csv", version="")
    with caplog.at_level(logging.INFO):
        callback = _fit(tmp_path, 3, [logger], figure_every_n_steps=1)
    messages = [r.getMessage() for r in caplog.records if "no TensorBoardLogger" in r.getMessage()]
    assert len(messages) == 1
    assert callback.last is not None and callback.last.step == 3
    assert not list(tmp_path.rglob("events.out.tfevents.*"))
    assert (Path(logger.log_dir) / "metrics.csv").is_file()


def test_heatmap_history_is_bounded_and_ordered() -> None:
    history = RunHistory(["a", "b"], capacity=3)
    for step in range(5):
        history.add(step * 10, [float(step), None])
    steps, norms = history.norm_matrix()
    assert len(history.steps) == 3 and history.measured == 5
    assert steps.tolist() == [20, 30, 40]
    assert norms[:, 0].tolist() == [2.0, 3.0, 4.0]
    assert np.isnan(norms[:, 1]).all()


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), ("2", TypeError), (1.5, TypeError)])
def test_figure_every_n_steps_is_validated(value: object, error: type) -> None:
    with pytest.raises(error, match="figure_every_n_steps"):
        GradientFlowCallback(figure_every_n_steps=value)  # type: ignore[arg-type]


def test_heatmap_uses_the_callbacks_eps(tmp_path: Path) -> None:
    """Norms at or below ``eps`` are drawn as missing: an ``eps`` above every norm blanks the
    norms panel, so the picture of the same run must differ from the default-``eps`` one."""
    pictures = {}
    for eps in (1e-30, 1e6):
        logger = TensorBoardLogger(tmp_path / str(eps), name="tb", version="")
        pl.seed_everything(0, verbose=False)
        callback = _fit(tmp_path / str(eps), 3, [logger], figure_every_n_steps=1, eps=eps)
        (image,) = _accumulator(logger.log_dir).Images(HEATMAP_TAG)[-1:]
        pictures[eps] = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
        assert callback.last is not None
    assert not np.array_equal(pictures[1e-30], pictures[1e6])


def test_heatmap_in_event_file_grows_with_every_block(tmp_path: Path) -> None:
    heights = {}
    for depth in (2, 3):
        logger = TensorBoardLogger(tmp_path, name=f"d{depth}", version="", default_hp_metric=False)
        callback = GradientFlowCallback(log_every_n_steps=1, figure_every_n_steps=1, rules=[])
        logger_trainer(logger, callback, max_steps=1).fit(BlockNet(depth=depth, n_samples=16))
        accumulator = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
        accumulator.Reload()
        (image,) = accumulator.Images(HEATMAP_TAG)
        assert (image.width, image.height) == heatmap_size_px(depth)
        heights[depth] = image.height
    assert heights[2] < heights[3]
    # One more row per block all the way to 100 blocks, and bounded beyond.
    sizes = [heatmap_size_px(n) for n in range(2, 101)]
    assert all(a[1] < b[1] for a, b in zip(sizes, sizes[1:]))
    assert heatmap_size_px(1000)[1] <= 3000
