"""Which modules are blocks: ``"auto"`` discovery on GPT-2 / Llama / BERT layouts, attribute paths,
names and callables; the primary tensor of a block output; errors that say how to name blocks."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from lightning.pytorch.loggers import TensorBoardLogger
from models import ModelOutput
from reference import RefNet, assert_metrics_equal, hooks_of, logger_trainer, ref_metrics, trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch.measure.blocks import (
    discover_blocks,
    primary_tensor,
    resolve_blocks,
    validate_blocks_spec,
)

pytestmark = [RULE_TRIPS, WIRING_REPORT]

WIDTH, VOCAB = 8, 11


# -- tiny look-alikes of the HuggingFace layouts ----------------------------------------------------


class GPT2Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # A shorter run of same-class modules inside each block must not win over transformer.h.
        self.norms = nn.ModuleList([nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)])
        self.attn = nn.Linear(WIDTH, WIDTH)
        self.mlp = nn.Sequential(
            nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH)
        )

    def forward(self, h: Tensor) -> tuple[Tensor, None]:
        h = h + self.attn(self.norms[0](h))
        return h + self.mlp(self.norms[1](h)), None  # (hidden_states, present) like HF


class GPT2Model(nn.Module):
    def __init__(self, n_layer: int = 3) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, WIDTH)
        self.h = nn.ModuleList(GPT2Block() for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(WIDTH)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.wte(ids)
        for block in self.h:
            h = block(h)[0]
        return self.ln_f(h)


class GPT2LMHeadModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = GPT2Model()
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm_head(self.transformer(ids))


class LlamaMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.up_proj = nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.down_proj = nn.Linear(2 * WIDTH, WIDTH, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class LlamaDecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(WIDTH)
        self.mlp = LlamaMLP()

    def forward(self, h: Tensor) -> tuple[Tensor]:
        return (h + self.mlp(self.input_layernorm(h)),)


class LlamaModel(nn.Module):
    def __init__(self, n_layer: int = 4) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, WIDTH)
        self.layers = nn.ModuleList(LlamaDecoderLayer() for _ in range(n_layer))
        self.norm = nn.LayerNorm(WIDTH)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed_tokens(ids)
        for layer in self.layers:
            h = layer(h)[0]
        return self.norm(h)


class LlamaForCausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = LlamaModel()
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm_head(self.model(ids))


class BertLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.Linear(WIDTH, WIDTH)
        self.output = nn.LayerNorm(WIDTH)

    def forward(self, h: Tensor) -> ModelOutput:
        return ModelOutput(last_hidden_state=self.output(h + torch.tanh(self.attention(h))))


class BertEncoder(nn.Module):
    def __init__(self, n_layer: int = 2) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer() for _ in range(n_layer))

    def forward(self, h: Tensor) -> Tensor:
        for layer in self.layer:
            h = layer(h).last_hidden_state
        return h


class BertModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(VOCAB, WIDTH)
        self.encoder = BertEncoder()
        self.pooler = nn.Linear(WIDTH, WIDTH)

    def forward(self, ids: Tensor) -> Tensor:
        return self.pooler(self.encoder(self.embeddings(ids))[:, 0])


class Flat(nn.Module):
    """No repeated-block container at all."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.mix = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU())
        self.out = nn.Linear(WIDTH, 1)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(self.mix(self.embed(ids)))


LAYOUTS = {
    "gpt2": (GPT2LMHeadModel, "transformer.h", 3),
    "llama": (LlamaForCausalLM, "model.layers", 4),
    "bert": (BertModel, "encoder.layer", 2),
}


class Wrapper(pl.LightningModule):
    """A LightningModule holding a backbone as ``self.model`` (as HF fine-tuning code does)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.model = backbone

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (ids,) = batch
        return self.model(ids).float().pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        ids = torch.randint(0, VOCAB, (8, 5), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(ids), batch_size=4)


@pytest.fixture
def lightning_records() -> Iterator[list[logging.LogRecord]]:
    """INFO records of the ``lightning.pytorch`` logger (where ``rank_zero_info`` writes)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(level=logging.INFO)
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# -- primary tensor ---------------------------------------------------------------------------------


def test_primary_tensor_of_each_output_kind() -> None:
    a, b, c = torch.ones(1), torch.zeros(2), torch.full((3,), 2.0)
    assert primary_tensor(a) is a
    assert primary_tensor((a, b)) is a
    assert primary_tensor([None, (b, a)]) is b  # first tensor element, searched recursively
    assert primary_tensor({"aux": 0, "hidden": b, "other": c}) is b  # first tensor value
    # last_hidden_state / hidden_states win wherever they are in the mapping.
    assert primary_tensor({"logits": a, "hidden_states": b}) is b
    assert primary_tensor(ModelOutput(logits=a, hidden_states=b, last_hidden_state=c)) is c
    # hidden_states as a tuple is not taken as such: the first tensor value is searched recursively.
    assert primary_tensor({"hidden_states": (a, b), "logits": c}) is a
    assert primary_tensor((None, 3, "x")) is None
    assert primary_tensor(None) is None


# -- discovery and resolution on plain modules ------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_auto_discovery_finds_the_block_container(layout: str) -> None:
    cls, path, depth = LAYOUTS[layout]
    model = cls()
    found = discover_blocks(model)
    container = model.get_submodule(path)
    assert [name for name, _ in found] == [f"{path}.{i}" for i in range(depth)]
    assert [module for _, module in found] == list(container)
    assert resolve_blocks(model, "auto") == found


def test_auto_discovery_prefers_the_longest_container_and_then_the_first() -> None:
    model = nn.Module()
    model.short = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))
    model.long = nn.Sequential(*(nn.Linear(2, 2) for _ in range(3)))
    model.mixed = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU())
    model.twin = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
    with pytest.warns(UserWarning, match=r"\['long', 'twin'\]; watching only 'long'"):
        assert [name for name, _ in discover_blocks(model)] == ["long.0", "long.1", "long.2"]


def test_auto_discovery_without_a_tie_does_not_warn(recwarn: pytest.WarningsRecorder) -> None:
    model = GPT2LMHeadModel()
    discover_blocks(model)
    assert not [w for w in recwarn if "blocks='auto'" in str(w.message)]


def test_auto_discovery_error_tells_how_to_name_blocks() -> None:
    with pytest.raises(ValueError, match=r"Could not find the model's blocks automatically") as err:
        discover_blocks(Flat())
    assert "blocks='path.to.container'" in str(err.value)
    assert "callable" in str(err.value)


def test_resolve_attribute_path_names_and_callable() -> None:
    model = GPT2LMHeadModel()
    by_path = resolve_blocks(model, "transformer.h")
    assert [n for n, _ in by_path] == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    by_names = resolve_blocks(model, ["transformer.wte", "transformer.h.1", "lm_head"])
    assert [m for _, m in by_names] == [
        model.transformer.wte,
        model.transformer.h[1],
        model.lm_head,
    ]
    picked = resolve_blocks(model, lambda m: [("first", m.transformer.h[0])])
    assert picked == [("first", model.transformer.h[0])]


def test_resolve_errors_name_the_missing_block() -> None:
    model = GPT2LMHeadModel()
    with pytest.raises(ValueError, match=r"Block 'transformer\.h\.7' does not exist"):
        resolve_blocks(model, ["transformer.h.0", "transformer.h.7"])
    with pytest.raises(ValueError, match=r"Block 'encoder\.layer' does not exist"):
        resolve_blocks(model, "encoder.layer")
    with pytest.raises(
        ValueError, match=r"`blocks='lm_head'` names a module with no child modules"
    ):
        resolve_blocks(model, "lm_head")
    with pytest.raises(ValueError, match=r"non-empty list of \(name, nn\.Module\) pairs"):
        resolve_blocks(model, lambda m: [])


@pytest.mark.parametrize(
    ("spec", "error", "pattern"),
    [
        (3, TypeError, r"`blocks` must be 'auto', an attribute path .*got int: 3"),
        (["a", 1], TypeError, r"`blocks` must be .*got list"),
        ([], ValueError, r"`blocks` must name at least one module; got an empty list"),
        ("  ", ValueError, r"`blocks` must be 'auto', an attribute path or names; got '  '"),
    ],
)
def test_invalid_blocks_spec(spec: object, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        validate_blocks_spec(spec)
    with pytest.raises(error, match=pattern):
        GradientFlowCallback(blocks=spec)  # type: ignore[arg-type]


# -- through the callback at fit start --------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_callback_auto_discovery_in_fit(
    layout: str, tmp_path: Any, lightning_records: list[logging.LogRecord]
) -> None:
    cls, path, depth = LAYOUTS[layout]
    torch.manual_seed(0)
    module = Wrapper(cls())
    callback = GradientFlowCallback(log_every_n_steps=1)
    trainer(tmp_path, [callback], max_steps=2).fit(module)
    names = [f"model.{path}.{i}" for i in range(depth)]
    assert callback.block_names == names
    assert callback.last is not None and callback.last.step == 1
    metrics = callback.last.metrics
    assert sorted(k for k in metrics if k.startswith("grad_norm/")) == [
        f"grad_norm/{n}" for n in names
    ]
    assert sorted(k for k in metrics if k.startswith("grad_gain/")) == [
        f"grad_gain/{n}" for n in names[1:]
    ]
    assert all(metrics[f"grad_norm/{n}"] > 0 for n in names)
    assert metrics["grad_flow/num_missing"] == 0
    reports = [r.getMessage() for r in lightning_records if "watching" in r.getMessage()]
    assert len(reports) == 1, reports  # reported once per fit, not per step
    assert f"watching {depth} blocks" in reports[0]
    assert all(name in reports[0] for name in names)
    assert hooks_of(module) == 0


def test_callback_auto_without_a_stack_watches_the_parameter_owners(
    tmp_path: Any, recwarn: pytest.WarningsRecorder
) -> None:
    # No repeated container: the modules owning parameters, in registration order (which is the
    # forward order here, so no order warning). tests/test_block_fallback.py checks the figures.
    module = Wrapper(Flat())
    callback = GradientFlowCallback(log_every_n_steps=1)
    trainer(tmp_path, [callback], max_steps=1).fit(module)
    names = ["model.embed", "model.mix.0", "model.out"]
    assert callback.block_names == names
    assert callback.last is not None
    assert {k for k in callback.last.metrics if k.startswith(("grad_norm/", "grad_gain/"))} == {
        *(f"grad_norm/{n}" for n in names),
        *(f"grad_gain/{n}" for n in names[1:]),
    }
    assert not [w for w in recwarn if "registration order" in str(w.message)]
    assert hooks_of(module) == 0


@pytest.mark.parametrize(
    "blocks",
    [
        "blocks",
        ["blocks.0", "blocks.2", "blocks.3"],
        "callable",
    ],
)
def test_callback_block_selection(blocks: Any, tmp_path: Any) -> None:
    chosen = [0, 1, 2, 3] if blocks == "blocks" else [0, 2, 3]
    if blocks == "callable":
        blocks = lambda m: [(f"blocks.{i}", m.blocks[i]) for i in (0, 2, 3)]  # noqa: E731
    torch.manual_seed(0)
    model = RefNet()
    callback = GradientFlowCallback(blocks=blocks, log_every_n_steps=1)
    trainer(tmp_path, [callback], max_steps=1).fit(model)
    names = [f"blocks.{i}" for i in chosen]
    assert callback.block_names == names
    ref = model.refs[0]
    # Gains are between consecutive *chosen* blocks: grad_gain/blocks.2 = norm(blocks.0) / norm(blocks.2).
    expected = ref_metrics(names, [ref["blocks"][i] for i in chosen], ref["params"])
    assert callback.last is not None
    assert_metrics_equal(callback.last.metrics, expected)


@pytest.mark.parametrize(
    ("blocks", "missing"),
    [(["blocks.0", "blocks.9"], "blocks.9"), ("encoder.layer", "encoder.layer")],
)
def test_callback_missing_block_name_raises_at_fit_start(
    blocks: Any, missing: str, tmp_path: Any
) -> None:
    callback = GradientFlowCallback(blocks=blocks)  # the name is only checked against the model
    model = RefNet()
    with pytest.raises(ValueError, match=rf"Block '{missing}' does not exist in the model"):
        trainer(tmp_path, [callback]).fit(model)
    assert model.refs == {}  # raised before any training step
    assert hooks_of(model) == 0


class HeadedBlock(nn.Module):
    """A GPT-2-like block whose attention is a ModuleList of four same-class heads."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(width, width // 4) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.Linear(width, width))

    def forward(self, h: Tensor) -> Tensor:
        h = h + torch.cat([head(h) for head in self.heads], dim=-1)
        return h + torch.tanh(self.mlp(h))


class HeadedGPT(pl.LightningModule):
    """``transformer.h`` holds 3 blocks; each block holds a longer (4) ModuleList of heads."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Linear(4, 8)
        self.transformer.h = nn.ModuleList(HeadedBlock() for _ in range(3))
        self.lm_head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.transformer.wte(x)
        for block in self.transformer.h:
            h = block(h)
        return self.lm_head(h)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.zeros(16, 1)), 8)


def test_auto_picks_the_block_container_not_the_heads_inside_a_block(tmp_path: Path) -> None:
    torch.manual_seed(0)
    logger = TensorBoardLogger(tmp_path, name="tb", version="", default_hp_metric=False)
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[])
    logger_trainer(logger, callback, max_steps=2).fit(HeadedGPT())
    blocks = ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert callback.block_names == blocks
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    assert {f"grad_norm/{b}" for b in blocks} <= scalars
    assert {f"grad_gain/{b}" for b in blocks[1:]} <= scalars
    assert not any("heads" in tag for tag in scalars)
