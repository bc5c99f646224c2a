"""On a CUDA device: single GPU, ``16-mixed`` with a real scaler, torch.compile, FSDP1 detection, and
no host synchronization on unmeasured steps (exactly one, the host copy, on measured steps).

Skipped without CUDA. Run with ``pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from models import BlockNet
from parallel import assert_figures_equal
from reference import RefNet, close_to, ref_metrics, trainer
from test_compile import check_compiled_like_eager

from lightning_gradwatch import GradientFlowCallback

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
GPU: dict[str, Any] = {"accelerator": "gpu", "devices": 1}
SYNC_WARNING = "synchronizing CUDA operation"


def fit_ref(tmp_path: Path, **kwargs: Any) -> tuple[RefNet, GradientFlowCallback, pl.Trainer]:
    torch.manual_seed(0)
    model = RefNet()
    callback = GradientFlowCallback(log_every_n_steps=1, log_param_norms=True, rules=[])
    fit = trainer(tmp_path, [callback], max_steps=1, **GPU, **kwargs)
    fit.fit(model)
    return model, callback, fit


def test_single_gpu_matches_reference(tmp_path: Path) -> None:
    model, callback, _ = fit_ref(tmp_path)
    ref = model.refs[0]
    assert ref["blocks"][0].is_cuda
    expected = ref_metrics(
        model.block_names(), ref["blocks"], ref["params"], param_keys=list(ref["params"])
    )
    assert_figures_equal(callback.last.metrics, expected, rel=1e-5)  # type: ignore[union-attr]


def test_16_mixed_with_real_scaler_on_gpu(tmp_path: Path) -> None:
    scale = 2.0**10
    scaler = torch.amp.GradScaler("cuda", init_scale=scale)
    model, callback, fit = fit_ref(tmp_path, plugins=[MixedPrecision("16-mixed", "cuda", scaler)])
    assert fit.precision_plugin.scaler.get_scale() == scale  # no overflow: the step was taken
    ref = model.refs[0]
    assert ref["blocks"][0].dtype == torch.float16
    unscaled = [grad.double() / scale for grad in ref["blocks"]]
    expected = ref_metrics(
        model.block_names(), unscaled, ref["params"], param_keys=list(ref["params"])
    )
    assert_figures_equal(callback.last.metrics, expected, rel=1e-5)  # type: ignore[union-attr]


def test_compiled_on_gpu_measures_like_eager(tmp_path: Path) -> None:
    check_compiled_like_eager(tmp_path, "inductor", **GPU)


def test_fsdp1_reports_parameter_figures_as_not_measured(tmp_path: Path) -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    _, plain, _ = fit_ref(tmp_path / "plain")
    torch.manual_seed(0)
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[])
    fit = trainer(tmp_path / "fsdp", [callback], max_steps=1, **GPU, strategy=FSDPStrategy())
    with pytest.warns(UserWarning, match=r"FSDP1.*not measured"):
        fit.fit(RefNet())
    metrics = callback.last.metrics  # type: ignore[union-attr]
    assert "grad_norm_total" not in metrics and not any(
        k.startswith("grad_stats/") for k in metrics
    )
    for key, value in metrics.items():  # block figures are measured, and right
        assert value == close_to(plain.last.metrics[key], key), key  # type: ignore[union-attr]


class SyncCounter:
    """Counts synchronizing CUDA operations per optimizer step (``set_sync_debug_mode("warn")``),
    from the first callback's ``on_train_batch_start`` to the last one's ``on_train_batch_end``."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self._catcher: Optional[warnings.catch_warnings] = None
        self._caught: list[warnings.WarningMessage] = []
        self._step = -1

    def start(self, step: int) -> None:
        self._step = step
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()  # type: ignore[assignment]
        warnings.simplefilter("always")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        torch.cuda.set_sync_debug_mode(0)
        assert self._catcher is not None
        self._catcher.__exit__(None, None, None)
        found = sum(SYNC_WARNING in str(w.message) for w in self._caught)
        self.counts[self._step] = self.counts.get(self._step, 0) + found


class _Start(pl.Callback):
    def __init__(self, counter: SyncCounter) -> None:
        self.counter = counter

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.counter.start(trainer.global_step)


class _Stop(pl.Callback):
    def __init__(self, counter: SyncCounter) -> None:
        self.counter = counter

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.counter.stop()


def count_syncs(tmp_path: Path, watch: bool) -> dict[int, int]:
    counter = SyncCounter()
    watcher = [GradientFlowCallback(log_every_n_steps=3, log_param_norms=True, rules=[])]
    callbacks = [_Start(counter), *(watcher if watch else []), _Stop(counter)]
    torch.manual_seed(0)
    trainer(tmp_path, callbacks, max_steps=6, **GPU).fit(BlockNet())
    return counter.counts


def test_no_host_sync_on_unmeasured_steps(tmp_path: Path) -> None:
    without = count_syncs(tmp_path / "without", watch=False)
    with_callback = count_syncs(tmp_path / "with", watch=True)
    extra = {step: with_callback[step] - without[step] for step in without}
    # Steps 0 and 3 are measured: one host copy each. The others: nothing at all.
    assert extra == {0: 1, 1: 0, 2: 0, 3: 1, 4: 0, 5: 0}


def test_rerun_on_gpu_is_reproducible_and_changes_nothing(tmp_path: Path) -> None:
    # Not run on the development machine (no CUDA there): the CUDA RNG state is saved at each
    # batch start and put back around the rerun; Dropout and BatchNorm under 16-mixed with a real
    # scaler must come back the same, and the run must end as it does without reruns.
    from faults import fit_csv
    from test_rerun import NoisyNet

    from lightning_gradwatch import Rule

    states = {}
    for rerun in (False, True):
        torch.manual_seed(0)
        model = NoisyNet(n_samples=64, batch_size=8)
        rule = Rule("grad_norm_total", max=0.0, action="warn", rerun=rerun)  # trips every step
        callback = GradientFlowCallback(log_every_n_steps=2, rules=[rule])
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
        plugins = [MixedPrecision("16-mixed", "cuda", scaler)]
        fit_csv(tmp_path / str(rerun), model, [callback], max_steps=4, plugins=plugins, **GPU)
        states[rerun] = {key: value.cpu() for key, value in model.state_dict().items()}
        if rerun:
            assert len(callback.alerts) == 4
            assert all(a.rerun and a.rerun["verdict"] == "reproducible" for a in callback.alerts)
    assert all(torch.equal(states[False][key], states[True][key]) for key in states[False])
