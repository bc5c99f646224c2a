"""Diagnoses fit the model (issue 19, item 5): a fix is suggested only where the model facts show
that the blocks lack it, what they have is named, and without facts the advice says it is generic.
Trained with a real Trainer on CPU (torch's own ``nn.TransformerEncoderLayer``, a sigmoid MLP), read
back through ``gradwatch report``; the facts themselves (residual connections, norms, init schemes)
are checked on real modules against what was built into them."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diag_models import Residual, TransformerNet
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from lightning.pytorch.loggers import CSVLogger
from models import BlockNet
from reference import trainer
from torch import Tensor, nn

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch.diagnosis.checks import diagnose
from lightning_gradwatch.diagnosis.findings import Finding
from lightning_gradwatch.diagnosis.model_facts import collect_model_facts, init_scheme
from lightning_gradwatch.diagnosis.remedies import GENERIC
from lightning_gradwatch.diagnosis.run_history import FACTS_FILENAME, RunHistory
from lightning_gradwatch.diagnosis.structure import StructureCapture
from lightning_gradwatch.report.cli import main

pytestmark = [RULE_TRIPS, WIRING_REPORT]

#: A suggestion that adds what a Post-LN transformer with Xavier init already has.
ADDS_WHAT_IT_HAS = re.compile(r"\badd\b[^:]*\b(normalisation|residual)|Xavier|He/Kaiming|He \(")


def _fit(tmp_path: Path, model: Any, steps: int) -> tuple[GradientFlowCallback, Path]:
    logger = CSVLogger(tmp_path, name="run", version="csv")
    callback = GradientFlowCallback(log_every_n_steps=1, rules=[])
    trainer(tmp_path, [callback], max_steps=steps, logger=logger).fit(model)
    return callback, Path(logger.log_dir)


def _report(capsys: pytest.CaptureFixture[str], path: Path) -> dict[str, Any]:
    assert main(["report", str(path), "--format", "json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    return run["diagnosis"]  # type: ignore[no-any-return]


def _by_name(findings: list[Finding]) -> dict[str, Finding]:
    return {finding.name: finding for finding in findings}


def test_post_ln_transformer_is_not_told_to_add_what_it_has(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    callback, logs = _fit(tmp_path, TransformerNet(depth=12), steps=6)
    facts = callback._diagnosis.history.facts
    assert facts is not None and len(facts.blocks) == 12
    # What the facts see in torch's TransformerEncoderLayer: norm1(x + sa(x)), norm2(x + ff(x)),
    # F.relu held as an attribute, and the Xavier init the model applied to every matrix.
    for block in facts.blocks:
        assert block.residual is True and block.post_norm is True
        assert block.norms == ["LayerNorm"] and block.activations == ["ReLU"]
        assert block.init_schemes == ["xavier"]
    found = _by_name(callback.findings)
    assert "vanishing_flow" in found  # the run does collapse: the test is not vacuous
    vanishing = found["vanishing_flow"]
    assert vanishing.figures["end_to_end_gain"] < 0.1
    present = next(line for line in vanishing.evidence if "already have" in line)
    assert "residual connections" in present and "LayerNorm (Post-LN" in present
    assert "Xavier-scaled init" in present
    assert "norm_first=True" in vanishing.suggestions[0] and "warm-up" in vanishing.suggestions[1]
    for finding in found.values():
        assert not [s for s in finding.suggestions if ADDS_WHAT_IT_HAS.search(s)], finding.text()
    # The report, from the logs and the facts file, reaches the same advice.
    diagnosis = _report(capsys, logs)
    assert diagnosis["model_facts"]
    assert {f["name"]: f["suggestions"] for f in diagnosis["findings"]} == {
        name: finding.suggestions for name, finding in found.items()
    }
    # Without the facts file the advice is the generic one, and it says so.
    bare = tmp_path / "bare"
    shutil.copytree(logs, bare)
    (bare / FACTS_FILENAME).unlink()
    generic = {f["name"]: f for f in _report(capsys, bare)["findings"]}["vanishing_flow"]
    assert GENERIC in generic["evidence"]
    assert any("residual connections" in line for line in generic["suggestions"])


def test_sigmoid_mlp_is_told_to_add_normalisation_and_residuals(tmp_path: Path) -> None:
    callback, _ = _fit(tmp_path, BlockNet(depth=6, activation="sigmoid"), steps=3)
    facts = callback._diagnosis.history.facts
    assert facts is not None
    assert all(b.residual is False and b.norms == [] for b in facts.blocks)
    # PyTorch's default Linear init (std 1/sqrt(3 fan_in)) is none of the variance-scaled ones.
    assert all(b.init_schemes == ["other"] for b in facts.blocks)
    vanishing = _by_name(callback.findings)["vanishing_flow"]
    first, structural = vanishing.suggestions
    assert "replace Sigmoid with ReLU or GELU" in first
    blocks = ", ".join(f"blocks.{i}" for i in range(4))
    assert structural.startswith("add normalisation (LayerNorm/BatchNorm) and residual connections")
    assert f"in {blocks}, ... (+2)" in structural
    assert not any("already have" in line for line in vanishing.evidence)
    assert GENERIC not in vanishing.evidence


class TanhGelu(nn.Module):
    """A Linear and the tanh-approximated GELU written out (``h + 0.044715 h^3``): no residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear(x)
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


class Rotary(nn.Module):
    """``q * cos + roll(q) * sin``: two functions of one tensor added, not a residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        q = self.q(x)
        return q * 0.6 + torch.roll(q, 1, dims=-1) * 0.8


class Shortcut(nn.Module):
    """A projected shortcut ``down(x) + f(x)`` (ResNet's downsampling block): a residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
        self.down = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(x) + self.f(x)


class KeywordBlock(nn.Module):
    """Called with its input as a keyword and returning a tuple, as HuggingFace layers are."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, hidden_states: Tensor) -> tuple[Tensor]:
        return (self.norm(hidden_states + self.f(hidden_states)),)


def _layer(norm_first: bool) -> nn.Module:
    return nn.TransformerEncoderLayer(
        8, 2, 16, dropout=0.1, batch_first=True, norm_first=norm_first
    )


# (block, residual, post_norm), as built.
STRUCTURES = {
    "post_ln": (lambda: Residual(8, post=True), True, True),
    "pre_ln": (lambda: Residual(8, post=False), True, False),
    "torch_post_ln": (lambda: _layer(norm_first=False), True, True),
    "torch_pre_ln": (lambda: _layer(norm_first=True), True, False),
    "plain": (lambda: nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.LayerNorm(8)), False, False),
    "tanh_gelu": (lambda: TanhGelu(8), False, False),
    "rotary": (lambda: Rotary(8), False, False),
    "shortcut": (lambda: Shortcut(8), True, False),
    "keyword": (lambda: KeywordBlock(8), True, True),
}


def test_structure_capture_sees_residuals_and_post_ln() -> None:
    torch.manual_seed(0)
    blocks = [(name, make()) for name, (make, _, _) in STRUCTURES.items()]
    facts = collect_model_facts(nn.ModuleList(m for _, m in blocks), blocks)
    capture = StructureCapture(blocks, facts)
    stem = nn.Linear(8, 8)  # block inputs that carry a gradient, as inside a model
    for name, block in blocks:
        x = stem(torch.randn(2, 3, 8))
        block(hidden_states=x) if name == "keyword" else block(x)
    seen = {b.name: (b.residual, b.post_norm) for b in facts.blocks}
    assert seen == {name: (residual, post) for name, (_, residual, post) in STRUCTURES.items()}
    assert capture.done and all(not m._forward_hooks for _, b in blocks for m in b.modules())


def test_a_residual_on_an_input_without_gradient_is_undecided() -> None:
    torch.manual_seed(0)
    blocks = [("raw", Residual(8, post=True))]
    facts = collect_model_facts(blocks[0][1], blocks)
    StructureCapture(blocks, facts)
    blocks[0][1](torch.randn(2, 8))  # raw data: x + f(x) leaves no trace of x in the graph
    assert facts.blocks[0].residual is None and facts.blocks[0].post_norm is True


@pytest.mark.parametrize(
    ("init", "expected"),
    [
        (nn.init.xavier_uniform_, "xavier"),
        (nn.init.xavier_normal_, "xavier"),
        (lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"), "he"),
        (lambda w: nn.init.normal_(w, std=1 / math.sqrt(w.shape[1])), "lecun"),
        (lambda w: None, "other"),  # PyTorch's default Linear init: std 1/sqrt(3 fan_in)
        (lambda w: nn.init.normal_(w, std=0.02), "other"),
    ],
)
def test_init_schemes_from_the_weights(init: Any, expected: str) -> None:
    torch.manual_seed(0)
    # Fans where the schemes' stds lie apart (with fan_out = 5 fan_in, PyTorch's default std
    # 1/sqrt(3 fan_in) is Xavier's exactly: the facts speak of the scale, not of the call).
    block = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(2, 2))
    for layer in (block[0], block[2]):
        init(layer.weight)
    (facts,) = collect_model_facts(block, [("b", block)]).blocks
    assert facts.init_schemes == [expected]  # the 2x2 matrix is too small to tell
    std = block[0].weight.std().item()
    assert init_scheme(std, 64, 128) == expected


def test_facts_file_from_before_the_new_facts_still_loads_and_hedges() -> None:
    old = {
        "format": "gradwatch-model-facts",
        "version": 1,
        "blocks": ["a", "b", "c"],
        "settings": {"norm_type": "l2", "eps": 1e-30, "damping_threshold": 0.5,
                     "amplifying_threshold": 2.0, "clip_bounds": []},
        "model": {"blocks": [{"name": n, "activations": [], "norms": ["LayerNorm"], "params": 8,
                              "trainable": 8, "init_ratio": 1.0, "init_layer": f"{n}.w",
                              "post_norm": False, "a_later_fact": 1} for n in "abc"],
                  "trainable": 24, "embedding_params": 0},
        "first_step": None,
    }  # fmt: skip
    history = RunHistory.from_facts_dict(old, ["a", "b", "c"])
    assert history.facts is not None
    assert [(b.residual, b.init_schemes) for b in history.facts.blocks] == [(None, None)] * 3
    history.add(0, [1e-4, 1e-2, 1.0])
    (vanishing,) = diagnose(history)
    # LayerNorm is known to be there: not offered; residuals are unknown: offered conditionally;
    # nothing is known to be missing, so the learning rate is what is left.
    assert any("already have LayerNorm" in line for line in vanishing.evidence)
    conditional, left = vanishing.suggestions
    assert conditional.startswith(
        "if the blocks have no residual connection (it could not be seen)"
    )
    assert "warm-up" in left and "lower the learning rate" in left
