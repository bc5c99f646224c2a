"""torch.compile: a compiled model trains with the callback, which adds no graph break and measures
the same numbers as eager.

The hooks are attached in ``on_fit_start``, before the first compiled call (hooks added after it are
ignored by the compiled code). The forward hooks are traced into the graph; the probe's ``armed`` flag
is guarded, so measured and unmeasured steps use two graphs (a recompilation, not a graph break). The
tensor hooks write into a preallocated buffer and append to nothing (with ``log_histograms=True``
the eager hooks keep each block's gradient; compiled code leaves that out rather than fall back to
eager).

The fast test uses the ``aot_eager`` backend (Dynamo + AOTAutograd, no C++ compilation); the
``inductor`` test is marked ``slow``.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from global_batch import logged_rows
from lightning.pytorch.plugins import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from models import BlockNet
from reference import assert_metrics_equal, trainer
from torch import Tensor, nn
from torch._dynamo.utils import counters
from torch_features import needs_compile_without_graph_breaks

from lightning_gradwatch import GradientFlowCallback, _compat
from lightning_gradwatch.lightning.strategies import check_strategy

STEPS = 4


class ConfigureCompiledNet(BlockNet):
    """Compiles its block stack in ``configure_model``: compiled before the callback's hooks are
    attached (``on_fit_start``), first called after."""

    backend: Any = "aot_eager"

    def configure_model(self) -> None:
        self.run_blocks = torch.compile(self.blocks_forward, backend=self.backend)

    def blocks_forward(self, h: Tensor) -> Tensor:
        for block in self.blocks:
            h = block(h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.run_blocks(self.stem(x)))


def breaks() -> dict[str, int]:
    """Graph breaks, and frames Dynamo gave up on (those fall back to eager silently)."""
    found = {**counters["graph_break"], **counters["unimplemented"]}
    return {reason.splitlines()[0]: count for reason, count in found.items()}


def run(
    tmp_path: Path, backend: Any, watch: bool, how: str = "fit", **trainer_kwargs: Any
) -> tuple[dict[int, dict[str, float]], dict]:
    """Train (compiled with ``backend`` unless ``None``; ``how``: ``"fit"`` passes
    ``torch.compile(model)`` to ``fit``, ``"configure_model"`` compiles there, ``"histograms"`` is
    ``"fit"`` with ``log_histograms=True``) and read the CSV."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model: Any
    if backend is not None and how == "configure_model":
        model = ConfigureCompiledNet(depth=3, width=8)
        model.backend = backend
    else:
        model = BlockNet(depth=3, width=8)
        if backend is not None:
            model = torch.compile(model, backend=backend)
    callbacks = [
        GradientFlowCallback(
            log_every_n_steps=2,
            log_param_norms=True,
            rules=[],
            log_histograms=how == "histograms",  # the probe then keeps each block's gradient
        )
    ]
    trainer(tmp_path, callbacks if watch else [], max_steps=STEPS, **trainer_kwargs).fit(model)
    stats = {"breaks": breaks(), "graphs": counters["stats"]["unique_graphs"]}
    if not watch:
        return {}, stats
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("grad_norm/blocks.0")]
    logged = {
        int(row["step"]): {k: float(v) for k, v in row.items() if k.startswith("grad") and v}
        for row in rows
    }
    return logged, stats


def check_compiled_like_eager(
    tmp_path: Path, backend: str, how: str = "fit", **trainer_kwargs: Any
) -> None:
    """Compiled and eager runs log the same figures; the callback adds no graph break."""
    eager, _ = run(tmp_path / "eager", None, True, how, **trainer_kwargs)
    # Block-output gradients cannot be kept for histograms inside a compiled graph: said once.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled, with_callback = run(tmp_path / "compiled", backend, True, how, **trainer_kwargs)
    lost = [w for w in caught if "cannot be kept under torch.compile" in str(w.message)]
    assert len(lost) == (1 if how == "histograms" else 0)
    _, without_callback = run(tmp_path / "bare", backend, False, how, **trainer_kwargs)
    assert with_callback["graphs"] >= 1  # the model really was compiled
    assert with_callback["breaks"] == without_callback["breaks"] == {}
    assert sorted(compiled) == sorted(eager) == [0, 2]
    for step, metrics in eager.items():
        # Compiled kernels fuse and reorder float32 arithmetic: gradients within 1e-4 of eager's,
        # log-gains and the gradient mean compared as assert_metrics_equal derives it per key.
        assert_metrics_equal(compiled[step], metrics, rel=1e-4)


@needs_compile_without_graph_breaks
@pytest.mark.parametrize("how", ["fit", "configure_model", "histograms"])
def test_compiled_model_measures_like_eager_without_graph_breaks(tmp_path: Path, how: str) -> None:
    check_compiled_like_eager(tmp_path, "aot_eager", how)


@needs_compile_without_graph_breaks
@pytest.mark.slow
def test_inductor_compiled_model_measures_like_eager(tmp_path: Path) -> None:
    check_compiled_like_eager(tmp_path, "inductor")


def test_compiled_model_on_an_older_torch_is_warned_about_at_fit_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As if graph-break-free hooks needed a newer torch than the installed one.
    monkeypatch.setattr(_compat, "TORCH_FOR_COMPILE_WITHOUT_GRAPH_BREAKS", "999.0")
    fit = SimpleNamespace(
        strategy=SingleDeviceStrategy("cpu"),
        precision="32-true",
        precision_plugin=Precision(),
        optimizers=[],
        lightning_module=torch.compile(BlockNet(depth=2, width=4), backend="aot_eager"),
    )
    with pytest.warns(UserWarning, match=r"torch\.compile with torch .* need torch >= 999\.0"):
        check_strategy(fit)  # type: ignore[arg-type]
    fit.lightning_module = BlockNet(depth=2, width=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_strategy(fit)  # type: ignore[arg-type]


class CompiledBlocksNet(BlockNet):
    """Each block wrapped by ``torch.compile`` (an ``OptimizedModule``) when ``compiled``."""

    def __init__(self, compiled: bool) -> None:
        torch.manual_seed(0)
        super().__init__(depth=3, width=8)
        if compiled:
            self.blocks = nn.ModuleList(torch.compile(b, backend="aot_eager") for b in self.blocks)


def _graph_breaks() -> dict[str, int]:
    return {**counters["graph_break"], **counters["unimplemented"]}


def _fit_csv(tmp_path: Path, model: Any, **kwargs: Any) -> dict[int, dict[str, float]]:
    callback = GradientFlowCallback(log_every_n_steps=2, log_param_norms=True)
    trainer(tmp_path, [callback], max_steps=4, **kwargs).fit(model)
    return dict(logged_rows(tmp_path))


def assert_same_figures(compiled: dict[int, dict[str, float]], eager: dict[int, Any]) -> None:
    assert sorted(compiled) == sorted(eager) == [0, 2]
    for step, metrics in eager.items():
        assert_metrics_equal(compiled[step], metrics, rel=1e-4)  # the same keys, close values


def test_separately_compiled_blocks_log_the_eager_keys_and_values(tmp_path: Path) -> None:
    eager = _fit_csv(tmp_path / "eager", CompiledBlocksNet(compiled=False))
    torch._dynamo.reset()
    counters.clear()
    model = CompiledBlocksNet(compiled=True)
    compiled = _fit_csv(tmp_path / "compiled", model)
    assert counters["stats"]["unique_graphs"] >= 1 and _graph_breaks() == {}
    assert not any("_orig_mod" in key for key in compiled[0])  # e.g. grad_param_norm/blocks.0.*
    assert "grad_param_norm/blocks.0.linear.weight" in compiled[0]
    assert_same_figures(compiled, eager)


@needs_compile_without_graph_breaks
def test_compiled_model_with_accumulation_measures_like_eager(tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = _fit_csv(tmp_path / "eager", BlockNet(depth=3, width=8), accumulate_grad_batches=2)
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.compile(BlockNet(depth=3, width=8), backend="aot_eager")
    compiled = _fit_csv(tmp_path / "compiled", model, accumulate_grad_batches=2)
    assert counters["stats"]["unique_graphs"] >= 1 and _graph_breaks() == {}
    assert_same_figures(compiled, eager)
