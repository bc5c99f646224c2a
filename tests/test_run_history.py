"""The pieces under the diagnosis, without a Trainer: the bounded run history, the facts file's
round trip, the model facts read from a module tree (activations, norms, init scale), the one-off
Post-LN capture, the clip bounds, and what the rules say (or refuse to say) on edge cases."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diag_models import Residual
from torch import nn

from lightning_gradwatch import Rule
from lightning_gradwatch.diagnosis.checks import diagnose
from lightning_gradwatch.diagnosis.findings import healthy_summary
from lightning_gradwatch.diagnosis.model_facts import collect_model_facts
from lightning_gradwatch.diagnosis.run_history import ClipBound, RunHistory, Settings, Wiring
from lightning_gradwatch.diagnosis.structure import StructureCapture
from lightning_gradwatch.lightning.diagnosis import clip_bounds


def test_figures_keep_the_first_steps_and_a_window_of_the_last() -> None:
    history = RunHistory(["a", "b"], capacity=8)
    for step in range(100):
        history.add(step, [1.0, 1.0], total_norm=float(step))
    assert history.measured == 100
    assert [row.step for row in history.first] == [0, 1, 2]
    assert [row.step for row in history.steps] == list(range(92, 100))
    # The report feeds only the rows it needs and reaches the same rows.
    again = RunHistory(["a", "b"], capacity=8)
    for step in range(100):
        if again.needs(step, 100):
            again.add(step, [1.0, 1.0], total_norm=float(step))
        else:
            again.skip()
    assert again == history
    assert "the last 8 of 100 measured steps (92 .. 99)" in healthy_summary(history)


def test_nan_counts_as_missing_like_in_the_logs() -> None:
    history = RunHistory(["a", "b"])
    history.add(3, [math.nan, 2.0], total_norm=math.nan, zero_fraction=math.nan)
    (row,) = history.steps
    assert row.block_norms == [None, 2.0] and row.total_norm is None and row.zero_fraction is None


def test_facts_file_round_trip() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Embedding(10, 4))
    history = RunHistory(
        ["0"],
        settings=Settings(norm_type="l1", clip_bounds=[ClipBound("gradient_clip_val", 1.0, 1.0)]),
        facts=collect_model_facts(model, [("0", model[0])]),
        wiring=Wiring(0, ["x"], ["y"]),
    )
    data = json.loads(json.dumps(history.facts_dict()))
    back = RunHistory.from_facts_dict(data, ["0"])
    assert back.facts_dict() == history.facts_dict()
    assert back.facts is not None and back.facts.embedding_params == 40


def test_model_facts_from_the_module_tree() -> None:
    class MySigmoid(nn.Sigmoid):
        pass

    class RMSNorm(nn.Module):  # a look-alike, not a torch class
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(400, 400), MySigmoid(), nn.ReLU6(), RMSNorm(), nn.LayerNorm(4))
    wide = nn.Linear(400, 400)
    nn.init.kaiming_normal_(wide.weight, nonlinearity="relu")
    facts = collect_model_facts(nn.ModuleList([block, wide]), [("b", block), ("w", wide)])
    b, w = facts.blocks
    assert b.activations == ["ReLU6", "Sigmoid"]  # torch names; ReLU6 is not Hardtanh here
    assert b.norms == ["LayerNorm", "RMSNorm"]
    assert b.init_layer == "b.0.weight"
    assert b.init_ratio == pytest.approx(1 / math.sqrt(3), rel=0.02)  # PyTorch's default init
    assert w.init_ratio == pytest.approx(math.sqrt(2), rel=0.02)  # He
    assert b.params == 400 * 401 + 8 and facts.trainable == 2 * 400 * 401 + 8


def test_post_ln_capture_decides_once_in_a_training_forward() -> None:
    torch.manual_seed(0)
    blocks = [("post", Residual(4, post=True)), ("pre", Residual(4, post=False))]
    plain = ("plain", nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))  # norm, but of no sum
    blocks.append(plain)
    facts = collect_model_facts(nn.ModuleList(m for _, m in blocks), blocks)
    capture = StructureCapture(blocks, facts)
    x = torch.randn(2, 4)
    with torch.no_grad():  # e.g. Lightning's sanity validation: decides nothing
        for _, block in blocks:
            block(x)
    assert [b.post_norm for b in facts.blocks] == [None, None, None] and not capture.done
    for _, block in blocks:
        block(x.requires_grad_())
    assert [b.post_norm for b in facts.blocks] == [True, False, False]
    assert capture.done
    assert all(not m._forward_hooks for _, block in blocks for m in block.modules())


def test_clip_bounds_from_lightning_and_rules() -> None:
    import lightning.pytorch as pl

    rules = [
        Rule("grad_norm_total", max=5.0, action="clip", clip_to=1.0),
        Rule("grad_norm_total", max=5.0, action="clip", clip_to=0.5, clip_mode="value"),
        Rule("grad_norm_total", zscore=3.0, action="clip", clip_to=1.0),
        Rule("grad_norm_total", max=9.0, action="warn"),
    ]
    trainer = pl.Trainer(gradient_clip_val=2.0, logger=False, enable_progress_bar=False)
    assert clip_bounds(trainer, rules, "l2") == [
        ClipBound("gradient_clip_val", 2.0, 2.0),
        ClipBound("rule 'grad_norm_total'", 5.0, 1.0),
    ]
    # Lightning clips the L2 norm: with another norm_type its bound is not comparable.
    assert clip_bounds(trainer, rules, "l1") == [ClipBound("rule 'grad_norm_total'", 5.0, 1.0)]


def test_rules_need_their_evidence() -> None:
    # High zero fraction without model facts: reported, but with low confidence and saying why.
    history = RunHistory(["a", "b"])
    history.add(0, [1.0, 1.0], total_norm=1.0, zero_fraction=0.9)
    (dead,) = diagnose(history)
    assert dead.name == "dead_units" and dead.confidence == "low"
    assert any("model facts unavailable" in line for line in dead.evidence)
    # One block: no transition, so no flow finding and a summary that says why.
    single = RunHistory(["a"])
    single.add(0, [1e-9])
    assert diagnose(single) == []
    assert healthy_summary(single).startswith("Only one block is watched")
    assert healthy_summary(RunHistory(["a", "b"])) == "No measured step yet: nothing to diagnose."


def test_fast_growing_total_norm_is_exploding_even_with_healthy_gains() -> None:
    history = RunHistory(["a", "b"])
    for step, total in enumerate([1.0, 1.2, 0.9, 30.0, 200.0, 400.0]):
        history.add(step, [1.0, 1.0], total_norm=total)
    (exploding,) = diagnose(history)
    assert exploding.name == "exploding_flow" and exploding.figures["growth"] == 200.0
    assert "grew 200x" in exploding.evidence[0]
