"""``blocks="auto"`` on models without a repeated ``ModuleList``/``Sequential``: the modules that own
parameters (registration order), or no blocks at all (parameter figures only).

Real fits, real loggers read back, figures against references computed here: block-output gradients
by ``torch.autograd.grad`` on the step's batch with the step's weights (plain functional ops, no
module hooks), parameter gradients copied in the LightningModule's own ``on_before_optimizer_step``
(Lightning calls it after the callbacks'). Zero and one block go through every path downstream of
the blocks: the probe, packing, flow summary, diagnosis, TensorBoard layout and pictures, noise
scale, rules, several optimizers and the report.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from reference import csv_metrics, hooks_of, ref_norm, trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientFlowCallback, GradientGainMonitor, Rule
from lightning_gradwatch.keys import HIST_BLOCK_PREFIX, HIST_PARAM_PREFIX
from lightning_gradwatch.lightning.tensorboard import HEATMAP_TAG
from lightning_gradwatch.measure.blocks import choose_blocks, parameter_owners
from lightning_gradwatch.measure.probe import GradientProbe
from lightning_gradwatch.measure.record import MeasurementSpec, measure
from lightning_gradwatch.measure.reduction import ReductionPlan
from lightning_gradwatch.report.cli import main as gradwatch

pytestmark = [RULE_TRIPS, WIRING_REPORT]

#: Prefixes of every key that exists only because of blocks.
BLOCK_PREFIXES = ("grad_norm/", "grad_gain/", "grad_log_gain/", "grad_flow/")
FALLBACK = "no repeated ModuleList/Sequential found"


def f32_rel(numel: int) -> float:
    """Relative error bound of a float32 norm of ``numel`` float32 values against the same norm in
    float64: a sum of ``numel`` rounded terms (``numel * eps``) plus the final rounding."""
    return (numel + 1) * torch.finfo(torch.float32).eps


#: A TensorBoard scalar is stored as float32: one more rounding.
TB_REL = torch.finfo(torch.float32).eps


class Recorder(pl.LightningModule):
    """Keeps each optimizer step's references in ``refs[step]``: ``blocks`` (dL/d(output) of each
    expected block, from :meth:`block_grads`; the micro-batches of the step side by side, as their
    norms combine) and ``params`` (name -> gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, dict[str, Any]] = {}
        self._batches: list[Any] = []

    def block_grads(self, batch: Any) -> list[Tensor]:
        """dL/d(output) of each block on ``batch``, for the loss as Lightning backpropagates it."""
        return []

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batches.append(batch)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        batches, self._batches = self._batches, []
        grads = [self.block_grads(batch) for batch in batches]  # one list per micro-batch
        self.refs[self.trainer.global_step] = {
            "blocks": [torch.cat([g.reshape(-1) for g in parts]) for parts in zip(*grads)],
            "params": {
                n: copy.deepcopy(p.grad) for n, p in self.named_parameters() if p.grad is not None
            },
        }


class SequentialMLP(Recorder):
    """The first model most people write: ``Sequential(Linear, ReLU, Linear, ReLU, Linear)``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1)
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self.model(x), y)

    def block_grads(self, batch: Any) -> list[Tensor]:
        x, y = batch
        first, _, middle, _, last = self.model
        h0 = F.linear(x, first.weight, first.bias)
        h2 = F.linear(F.relu(h0), middle.weight, middle.bias)
        h4 = F.linear(F.relu(h2), last.weight, last.bias)
        loss = F.mse_loss(h4, y) / self.trainer.accumulate_grad_batches  # as Lightning scales it
        return list(torch.autograd.grad(loss, [h0, h2, h4]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 6, generator=g), torch.randn(64, 1, generator=g))
        return DataLoader(data, batch_size=8)


class RecordingBoringModel(BoringModel):
    """Lightning's ``BoringModel`` (one ``Linear``), untouched but for the references."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, dict[str, Any]] = {}
        self._batch: Optional[Tensor] = None

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self._batch = batch
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        assert self._batch is not None
        out = F.linear(self._batch, self.layer.weight, self.layer.bias)
        (grad,) = torch.autograd.grad(self.loss(out), [out])
        self.refs[self.trainer.global_step] = {
            "blocks": [grad],
            "params": {n: copy.deepcopy(p.grad) for n, p in self.named_parameters()},
        }


class RootParams(Recorder):
    """Parameters on the root module only (``self.w = nn.Parameter(...)``), a parameter-free
    submodule, and with ``layer=True`` one ``Linear`` after them: no block, or one."""

    def __init__(self, layer: bool = False) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4) / 2)
        self.act = nn.Tanh()
        self.layer = nn.Linear(4, 1) if layer else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(x @ self.w)
        return self.layer(h) if self.layer is not None else h.sum(-1, keepdim=True)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def block_grads(self, batch: Any) -> list[Tensor]:
        if self.layer is None:
            return []
        x, y = batch
        out = F.linear(torch.tanh(x @ self.w), self.layer.weight, self.layer.bias)
        loss = F.mse_loss(out, y) / self.trainer.accumulate_grad_batches  # as Lightning scales it
        return list(torch.autograd.grad(loss, [out]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
        return DataLoader(data, batch_size=8)


def info_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if "GradientFlowCallback: watching" in r.getMessage()
    ]


def tb_scalars(log_dir: str) -> tuple[dict[int, dict[str, float]], EventAccumulator]:
    accumulator = EventAccumulator(log_dir, size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    rows: dict[int, dict[str, float]] = {}
    for tag in accumulator.Tags()["scalars"]:
        for event in accumulator.Scalars(tag):
            rows.setdefault(event.step, {})[tag] = event.value
    return rows, accumulator


def layout_charts(accumulator: EventAccumulator) -> dict[str, list[str]]:
    (event,) = accumulator.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    return {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}


def assert_flow(
    logged: dict[str, float],
    names: Sequence[str],
    grads: Sequence[Tensor],
    params: dict[str, Tensor],
    extra_rel: float = 0.0,
) -> None:
    """The logged norms, gains and log-gains of ``names`` and the total, against the references."""
    norms = [ref_norm(g, "l2") for g in grads]
    tols = [f32_rel(g.numel()) + extra_rel for g in grads]
    for name, norm, tol in zip(names, norms, tols):
        assert logged[f"grad_norm/{name}"] == pytest.approx(norm, rel=tol), name
    for i in range(1, len(names)):
        # A gain's relative error is the sum of its two norms'; a log-gain's is absolute.
        gain, tol = norms[i - 1] / norms[i], tols[i - 1] + tols[i] + extra_rel
        assert logged[f"grad_gain/{names[i]}"] == pytest.approx(gain, rel=tol), names[i]
        ratio = logged[f"grad_norm/{names[i - 1]}"] / logged[f"grad_norm/{names[i]}"]
        assert logged[f"grad_gain/{names[i]}"] == pytest.approx(ratio, rel=tol)
        assert logged[f"grad_log_gain/{names[i]}"] == pytest.approx(math.log(gain), abs=tol)
    numel = sum(g.numel() for g in params.values())
    total = ref_norm(list(params.values()), "l2")
    assert logged["grad_norm_total"] == pytest.approx(total, rel=f32_rel(numel) + extra_rel)


# -- which modules --------------------------------------------------------------------------------


class Gated(nn.Module):
    """A user module with a parameter of its own around a Linear: the Linear is the block."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.ones(4))
        self.proj = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) * self.gate


class MyLinear(nn.Linear):
    """A subclass of a torch.nn layer: still a layer of torch.nn."""


def test_parameter_owners_are_the_innermost_in_registration_order() -> None:
    model = nn.Module()
    model.w = nn.Parameter(torch.ones(1))  # the root's own: never a block
    model.embed = nn.Embedding(5, 4)
    model.frozen = nn.Linear(4, 4).requires_grad_(False)
    model.gated = Gated()
    model.attn = nn.MultiheadAttention(4, 2)  # owns in_proj_weight; out_proj is applied inside
    model.mine = MyLinear(4, 4)
    model.act = nn.ReLU()
    owners = parameter_owners(model)
    assert [name for name, _ in owners] == ["embed", "gated.proj", "attn", "mine"]
    assert owners[2][1] is model.attn


def test_choice_says_how_it_was_made() -> None:
    stack = nn.Module()
    stack.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    stack.head = nn.Linear(2, 1)
    choice = choose_blocks(stack, "auto")
    assert [n for n, _ in choice.blocks] == ["layers.0", "layers.1", "layers.2"]
    assert choice.fallback is None and choice.reason == "" and not choice.registration_order

    mlp = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    choice = choose_blocks(mlp, "auto")
    assert [n for n, _ in choice.blocks] == ["0", "2", "4"]
    assert choice.registration_order
    assert choice.describe(["0", "2", "4"]) == "3 blocks (0, 2, 4)"
    assert choice.reason.startswith(f": {FALLBACK}, so these are the 3 modules that own")

    root_only = nn.Module()
    root_only.w = nn.Parameter(torch.ones(2))
    root_only.act = nn.Tanh()
    choice = choose_blocks(root_only, "auto")
    assert choice.blocks == [] and not choice.registration_order
    assert choice.describe([]) == "no blocks"
    assert "only parameter figures are logged" in choice.reason
    # Named blocks are never a fallback: missing ones still raise.
    with pytest.raises(ValueError, match=r"Block 'layers' does not exist"):
        choose_blocks(mlp, ["layers"])
    with pytest.raises(ValueError, match=r"names a module with no child modules"):
        choose_blocks(mlp, "0")


# -- per-layer flow of an MLP, one block of BoringModel ------------------------------------------


def test_sequential_mlp_gets_per_layer_flow(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> None:
    torch.manual_seed(0)
    model = SequentialMLP()
    logger = TensorBoardLogger(tmp_path, name="tb", version="", default_hp_metric=False)
    callback = GradientFlowCallback(log_every_n_steps=1)
    with caplog.at_level(logging.INFO):
        trainer(tmp_path, [callback], max_steps=3, logger=[logger]).fit(model)
    names = ["model.0", "model.2", "model.4"]
    assert callback.block_names == names
    assert info_lines(caplog) == [
        "GradientFlowCallback: watching 3 blocks (model.0, model.2, model.4) every 1 optimizer "
        f"steps: {FALLBACK}, so these are the 3 modules that own trainable parameters, in "
        "registration order (blocks=[...] names others)."
    ]
    rows, _ = tb_scalars(logger.log_dir)
    assert sorted(model.refs) == [0, 1, 2]
    for step, ref in model.refs.items():
        assert_flow(rows[step], names, ref["blocks"], ref["params"], extra_rel=TB_REL)
    # Sequential order is the forward order: no order warning.
    assert not [w for w in recwarn if "registration order" in str(w.message)]
    assert hooks_of(model) == 0


def test_boring_model_gets_one_block(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = RecordingBoringModel()
    callback = GradientFlowCallback(log_every_n_steps=1)
    with caplog.at_level(logging.INFO):
        fit = trainer(tmp_path, [callback], max_steps=3)
        fit.fit(model)
    assert callback.block_names == ["layer"]
    assert info_lines(caplog) == [
        "GradientFlowCallback: watching 1 block (layer) every 1 optimizer steps: "
        f"{FALLBACK}, so this is the one module that owns trainable parameters (blocks=[...] "
        "names others)."
    ]
    rows = csv_metrics(fit.logger.log_dir)  # type: ignore[union-attr]
    for step, ref in model.refs.items():
        assert_flow(rows[step], ["layer"], ref["blocks"], ref["params"])
        assert not [k for k in rows[step] if k.startswith(("grad_gain/", "grad_log_gain/"))]


def test_forward_order_unlike_registration_order_warns_once(tmp_path: Path) -> None:
    class Reversed(SequentialMLP):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(1, 1)  # registered after model.*, but run first

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            return F.mse_loss(self.model(x + self.head(x[:, :1])), y)

    callback = GradientFlowCallback(log_every_n_steps=1)
    with pytest.warns(UserWarning, match=r"reached 'model\.0' after 'head'") as record:
        trainer(tmp_path, [callback], max_steps=3, accumulate_grad_batches=2).fit(Reversed())
    assert callback.block_names == ["model.0", "model.2", "model.4", "head"]
    assert len([w for w in record if "registration order" in str(w.message)]) == 1


# -- no block at all, and one: every downstream path --------------------------------------------


@pytest.mark.parametrize("layer", [False, True], ids=["zero_blocks", "one_block"])
def test_zero_and_one_block_through_every_path(
    layer: bool,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    torch.manual_seed(0)
    model = RootParams(layer=layer)
    tb = TensorBoardLogger(tmp_path, name="tb", version="", default_hp_metric=False)
    csv = CSVLogger(tmp_path, name="csv", version="")
    callback = GradientFlowCallback(
        log_every_n_steps=1,
        log_param_norms=True,
        log_histograms=True,
        figure_every_n_steps=1,
        noise_scale=True,  # from the two micro-batches of each step
        rules=[Rule("nonfinite", action="halt"), Rule("grad_norm_total", max=1e-12, name="tiny")],
    )
    with caplog.at_level(logging.INFO):
        fit = trainer(
            tmp_path, [callback], max_steps=3, logger=[tb, csv], accumulate_grad_batches=2
        )
        fit.fit(model)
    assert fit.global_step == 3 and not callback.halted
    names = ["layer"] if layer else []
    assert callback.block_names == names
    (line,) = info_lines(caplog)
    if not layer:
        assert line == (
            "GradientFlowCallback: watching no blocks every 1 optimizer steps: "
            f"{FALLBACK} and no submodule owns trainable parameters, so only parameter figures "
            "are logged (grad_norm_total, grad_stats/; rules apply)."
        )
    # Figures: the total (and the block) against the references, in both loggers.
    rows = csv_metrics(csv.log_dir)
    tb_rows, accumulator = tb_scalars(tb.log_dir)
    for step, ref in model.refs.items():
        for logged, rel in ((rows[step], 0.0), (tb_rows[step], TB_REL)):
            assert_flow(logged, names, ref["blocks"], ref["params"], extra_rel=rel)
            assert {"grad_stats/mean", "grad_param_norm/w"} <= set(logged)
            assert any(k.startswith("grad_noise/") for k in logged), step
            keys = {k for k in logged if k.startswith(BLOCK_PREFIXES)}
            if not layer:
                assert keys == set()
            else:
                assert {"grad_norm/layer", "grad_flow/num_missing"} <= keys
    # Rules: the total-norm rule trips at every step and is recorded; nothing halts.
    assert [a.step for a in callback.alerts if a.rule == "tiny"] == [0, 1, 2]
    # Diagnosis: findings computed over the run, and what it says when nothing is wrong.
    assert isinstance(callback.findings, list)
    assert callback.first_step_report is not None and callback.first_step_report.ok
    # TensorBoard: the layout has block charts only with blocks; the heatmap needs blocks too.
    charts = layout_charts(accumulator)
    assert charts["total gradient norm"] == ["grad_norm_total"]
    assert ("block-output gradient norms" in charts) is layer
    images = accumulator.Tags()["images"]
    assert (HEATMAP_TAG in images) is layer
    histograms = accumulator.Tags()["histograms"]
    assert any(t.startswith(HIST_PARAM_PREFIX) for t in histograms)
    assert any(t.startswith(HIST_BLOCK_PREFIX) for t in histograms) is layer
    # The report reads the run (text, JSON, pictures).
    capsys.readouterr()
    assert gradwatch(["report", tb.log_dir]) == 0
    text = capsys.readouterr().out
    assert "3 measured steps (0 .. 2)" in text
    if layer:
        assert "Only one block is watched" in text and "Block  0 (layer)" in text
    else:
        assert "No block is watched" in text and "No blocks were watched" in text
    total = tb_rows[2]["grad_norm_total"]  # what the report reads: the float32 in the event file
    assert f"Total gradient norm: last={total:.3e}" in text
    out = tmp_path / "report"
    assert gradwatch(["report", str(tmp_path), "--format", "json", "--out", str(out)]) == 0
    pictures = sorted(p.name for p in out.rglob("*.png"))
    per_run = ["gains.png", "norms.png", "total_norm.png"] if layer else ["total_norm.png"]
    assert pictures == sorted(per_run * 2)  # the csv run and the tb run
    assert hooks_of(model) == 0


class TwoOptimizers(RootParams):
    """Manual optimization with two optimizers: SGD over ``w`` (and the Linear), Adam over ``v``."""

    def __init__(self, layer: bool) -> None:
        super().__init__(layer)
        self.automatic_optimization = False
        self.v = nn.Parameter(torch.ones(1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self._batches.append(batch)
        x, y = batch
        first, second = self.optimizers()  # type: ignore[misc]
        loss = F.mse_loss(self(x) * self.v, y)
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        pass

    def block_grads(self, batch: Any) -> list[Tensor]:
        if self.layer is None:
            return []
        x, y = batch
        out = F.linear(torch.tanh(x @ self.w), self.layer.weight, self.layer.bias)
        return list(torch.autograd.grad(F.mse_loss(out * self.v, y), [out]))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        mine = {id(p) for group in optimizer.param_groups for p in group["params"]}
        batch = self._batches[-1]
        self.refs[self.trainer.global_step] = {
            "blocks": self.block_grads(batch) if id(self.w) in mine else [],
            "params": {
                n: copy.deepcopy(p.grad)
                for n, p in self.named_parameters()
                if id(p) in mine and p.grad is not None
            },
        }

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        rest = [p for n, p in self.named_parameters() if n != "v"]
        return [torch.optim.SGD(rest, lr=0.05), torch.optim.Adam([self.v], lr=0.01)]


@pytest.mark.parametrize("layer", [False, True], ids=["zero_blocks", "one_block"])
def test_several_optimizers_with_zero_and_one_block(
    layer: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = TwoOptimizers(layer)
    callback = GradientFlowCallback(log_every_n_steps=1)
    fit = trainer(tmp_path, [callback], max_steps=4)
    fit.fit(model)
    rows = csv_metrics(fit.logger.log_dir)  # type: ignore[union-attr]
    for step, ref in model.refs.items():
        optimizer = "SGD" if step % 2 == 0 else "Adam"
        logged = rows[step]
        total = ref_norm(list(ref["params"].values()), "l2")
        numel = sum(g.numel() for g in ref["params"].values())
        assert logged[f"grad_norm_total/{optimizer}"] == pytest.approx(total, rel=f32_rel(numel))
        keys = {k for k in logged if k.startswith(BLOCK_PREFIXES)}
        if layer and optimizer == "SGD":  # the optimizer owning the block measures it
            (grad,) = ref["blocks"]
            norm = ref_norm(grad, "l2")
            assert logged["grad_norm/layer"] == pytest.approx(norm, rel=f32_rel(grad.numel()))
        else:  # no block of its own: no block keys at all (no NaN flow summary)
            assert keys == set(), step
    capsys.readouterr()
    assert gradwatch(["report", str(tmp_path)]) == 0
    # The report's measured steps are those of the block norms (the SGD steps) when there are
    # blocks, else those of the totals (every step).
    span = "2 measured steps (0 .. 2)" if layer else "4 measured steps (0 .. 3)"
    assert span in capsys.readouterr().out


# -- the parts, with no block ---------------------------------------------------------------------


def test_probe_and_measurement_with_no_blocks() -> None:
    probe = GradientProbe([], "l2", device=torch.device("meta"))
    assert probe.buffer.shape == (0, 3) and probe.buffer.device.type == "meta"
    probe = GradientProbe([], "l2")
    probe.arm()
    probe.reset()
    grads = [("w", torch.tensor([3.0, 4.0])), ("b", torch.tensor([12.0]))]
    measurement = measure(
        probe.buffer, grads, MeasurementSpec(), ReductionPlan(), step=0, block_names=[]
    )
    assert measurement.block_norms == [] and measurement.gains == []
    assert measurement.summary == {}
    assert measurement.total_norm == pytest.approx(13.0, rel=f32_rel(3))
    assert not [k for k in measurement.metrics if k.startswith(BLOCK_PREFIXES)]
    probe.remove()


def test_gain_monitor_takes_explicit_blocks_as_before() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    with GradientGainMonitor([mlp[0], mlp[2]]) as monitor:
        x = torch.randn(4, 3)
        h0 = mlp[0](x)
        h0.retain_grad()
        out = mlp[2](mlp[1](h0))
        out.retain_grad()
        out.pow(2).sum().backward()
        norms = monitor.norms()
    assert h0.grad is not None and out.grad is not None
    expected = [ref_norm(h0.grad, "l2"), ref_norm(out.grad, "l2")]
    assert norms == pytest.approx(expected, rel=f32_rel(h0.numel()))
    with pytest.raises(ValueError, match="at least one module"):
        GradientGainMonitor([])
