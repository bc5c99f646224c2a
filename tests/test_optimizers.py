"""Several optimizers (manual optimization): every ``optimizer.step()`` is measured over what that
optimizer updates, against references recorded inside the training step."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import lightning.pytorch as pl
import pytest
import torch
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from reference import assert_metrics_equal, csv_metrics, ref_metrics, trainer
from torch import Tensor, nn

from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.lightning.optimizers import block_owners, optimizer_names

pytestmark = [RULE_TRIPS, WIRING_REPORT]

GEN_BLOCKS = ["gen.0", "gen.1"]
DISC_BLOCKS = ["disc.0", "disc.1"]


def _net(sizes: list[int]) -> nn.Sequential:
    return nn.Sequential(
        *(nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(sizes[:-1], sizes[1:]))
    )


class RecordingGAN(pl.LightningModule):
    """A GAN stepping the discriminator, then the generator, on every batch. It records, per
    optimizer step, the gradient at every watched block output (``retain_grad``, summed over the
    block's calls in that backward) and the stepping optimizer's parameter gradients."""

    def __init__(self, forget_zero_grad: Optional[str] = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = _net([4, 8, 2])
        self.disc = _net([2, 8, 1])
        self.forget_zero_grad = forget_zero_grad
        self.refs: dict[int, dict[str, Any]] = {}
        self._outputs: dict[str, list[Tensor]] = {}
        for name in GEN_BLOCKS + DISC_BLOCKS:
            self.get_submodule(name).register_forward_hook(self._keep(name))

    def _keep(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if output.requires_grad:
                output.retain_grad()
                self._outputs.setdefault(name, []).append(output)

        return hook

    def _record(self, blocks: list[str], params: nn.Module) -> None:
        grads = [
            torch.stack([o.grad for o in self._outputs.get(b, []) if o.grad is not None])
            if any(o.grad is not None for o in self._outputs.get(b, []))
            else None
            for b in blocks
        ]
        self.refs[self.trainer.global_step] = {
            "blocks": blocks,
            "block_grads": grads,
            "params": {
                n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None
            },
        }

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> None:
        (real,) = batch
        opt_disc, opt_gen = self.optimizers()  # type: ignore[misc]
        self._outputs = {}
        fake = self.gen(torch.randn(real.shape[0], 4))
        gen_outputs = {name: list(self._outputs.get(name, [])) for name in GEN_BLOCKS}

        if self.forget_zero_grad != "disc" or self.trainer.global_step < 2:
            opt_disc.zero_grad()
        self._outputs = {}
        loss = self.disc(real).mean() - self.disc(fake.detach()).mean()
        self.manual_backward(loss)
        self._record(DISC_BLOCKS, self.disc)
        opt_disc.step()

        if self.forget_zero_grad != "gen" or self.trainer.global_step < 3:
            opt_gen.zero_grad()
        self._outputs = dict(gen_outputs)
        self.manual_backward(self.disc(fake).mean())
        self._record(GEN_BLOCKS, self.gen)
        opt_gen.step()

    def train_dataloader(self) -> Any:
        data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=16)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.SGD(self.disc.parameters(), lr=0.05),
            torch.optim.SGD(self.gen.parameters(), lr=0.05),
        ]


class Measured(pl.Callback):
    """Keeps the callback's measurement of every step (it runs after the callback)."""

    def __init__(self, watched: GradientFlowCallback) -> None:
        self.watched = watched
        self.by_step: dict[int, Any] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        last = self.watched.last
        if last is not None and last.step == trainer.global_step:
            self.by_step[last.step] = last


def _fit(tmp_path: Any, model: RecordingGAN, steps: int = 6, **kwargs: Any):
    callback = GradientFlowCallback(blocks=GEN_BLOCKS + DISC_BLOCKS, log_every_n_steps=1, **kwargs)
    spy = Measured(callback)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = trainer(tmp_path, [callback, spy], max_steps=steps)
        fit.fit(model)
    messages = [str(w.message) for w in caught if "GradientFlowCallback" in str(w.message)]
    return callback, spy, fit, messages


def test_gan_every_step_measured_over_its_optimizer(tmp_path: Any) -> None:
    model = RecordingGAN()
    callback, spy, fit, messages = _fit(tmp_path, model, rules=[])
    assert sorted(spy.by_step) == list(range(6))
    names = {0: "SGD", 1: "SGD-1"}
    for step, measurement in spy.by_step.items():
        ref = model.refs[step]
        name = names[step % 2]
        assert measurement.optimizer == name
        expected = ref_metrics(ref["blocks"], ref["block_grads"], ref["params"])
        expected[f"grad_norm_total/{name}"] = expected.pop("grad_norm_total")
        assert_metrics_equal(measurement.metrics, expected)
    logged = csv_metrics(fit.logger.log_dir)  # type: ignore[union-attr]
    assert "grad_norm/gen.0" in logged[1] and "grad_norm/disc.0" not in logged[1]
    assert "grad_norm_total/SGD" in logged[2] and "grad_norm_total" not in logged[2]
    # No false alarm: the generator has not run its backward when the discriminator steps first.
    assert not any("grad is None" in m or "zero_grad()" in m for m in messages), messages
    assert callback.first_step_report is not None and callback.first_step_report.ok


def test_names_follow_learning_rate_monitor() -> None:
    a, b, c = (nn.Linear(2, 2) for _ in range(3))
    adam, adam2, sgd = (
        torch.optim.Adam(a.parameters()),
        torch.optim.Adam(b.parameters()),
        torch.optim.SGD(c.parameters(), lr=0.1),
    )
    assert optimizer_names([adam, adam2, sgd]) == ["Adam", "Adam-1", "SGD"]

    class Config:
        def __init__(self, optimizer: Any, name: Optional[str]) -> None:
            self.scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
            self.name = name

    # A configured scheduler name wins; optimizers with a scheduler are counted first.
    assert optimizer_names([adam, adam2, sgd], [Config(adam2, None), Config(sgd, "critic")]) == [
        "Adam-1",
        "Adam",
        "critic",
    ]


def test_shared_trunk_block_owned_by_majority_and_parameterless_blocks_follow() -> None:
    trunk, actor, critic, pool = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 1), nn.Identity()
    opt_actor = torch.optim.SGD([*trunk.parameters(), *actor.parameters()], lr=0.1)
    opt_critic = torch.optim.SGD(critic.parameters(), lr=0.1)
    blocks = [("trunk", trunk), ("pool", pool), ("actor", actor), ("critic", critic)]
    named = [(f"{b}.{n}", p) for b, m in blocks for n, p in m.named_parameters()]
    ownership = block_owners(blocks, named, [opt_actor, opt_critic])
    assert ownership.block_owner == [0, 0, 0, 1]
    assert ownership.param_owner["critic.weight"] == 1
    assert any("'pool' has no trainable parameters" in note for note in ownership.notes)


def test_single_optimizer_logs_the_same_keys(tmp_path: Any) -> None:
    from models import BlockNet

    callback = GradientFlowCallback(log_every_n_steps=1)
    fit = trainer(tmp_path, [callback], max_steps=2)
    fit.fit(BlockNet())
    assert callback.last is not None and callback.last.optimizer is None
    assert "grad_norm_total" in callback.last.metrics
    assert not any(key.startswith("grad_norm_total/") for key in callback.last.metrics)


def test_rule_on_one_optimizers_total_clips_only_it(tmp_path: Any) -> None:
    model = RecordingGAN()
    rule = Rule("grad_norm_total/SGD", max=1e-9, action="clip", clip_to=1e-3, name="clip_disc")
    callback, _, fit, _ = _fit(tmp_path, model, rules=[rule])
    clipped = {alert.step for alert in callback.alerts if alert.action == "clip"}
    assert clipped == {0, 2, 4}
    logged = csv_metrics(fit.logger.log_dir)  # type: ignore[union-attr]
    for step in (0, 2, 4):
        assert logged[step]["grad_norm_total_clipped/SGD"] == pytest.approx(1e-3, rel=1e-4)
    assert not any("grad_norm_total_clipped" in key for key in logged[1])


def test_forgotten_zero_grad_for_one_optimizer_still_warns(tmp_path: Any) -> None:
    _, _, _, messages = _fit(tmp_path, RecordingGAN(forget_zero_grad="gen"), steps=8)
    assert any("zero_grad()" in m and "SGD-1" in m for m in messages), messages


def test_unknown_optimizer_name_in_a_rule_raises_at_fit_start(tmp_path: Any) -> None:
    rule = Rule("grad_norm_total/Adam", max=1.0)
    with pytest.raises(ValueError, match=r"SGD.*SGD-1"):
        _fit(tmp_path, RecordingGAN(), steps=2, rules=[rule])


class ActorCritic(pl.LightningModule):
    """Two losses over a shared trunk: the actor's optimizer owns the trunk and the actor head, the
    critic's owns the critic head. Records each block's output gradient per backward."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.trunk = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
        self.actor = nn.Linear(8, 2)
        self.critic = nn.Linear(8, 1)
        self.refs: dict[int, dict[str, float]] = {}

    def training_step(self, batch: tuple[Tensor], batch_idx: int) -> None:
        (x,) = batch
        opt_actor, opt_critic = self.optimizers()  # type: ignore[misc]
        for opt, head in ((opt_actor, self.actor), (opt_critic, self.critic)):
            opt.zero_grad()
            features = self.trunk(x)
            out = head(features)
            features.retain_grad()
            out.retain_grad()
            self.manual_backward(out.square().mean())
            self.refs[self.trainer.global_step] = {
                "trunk": features.grad.norm().item(),  # type: ignore[union-attr]
                "head": out.grad.norm().item(),  # type: ignore[union-attr]
            }
            opt.step()

    def train_dataloader(self) -> Any:
        data = torch.randn(32, 3, generator=torch.Generator().manual_seed(1))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam([*self.trunk.parameters(), *self.actor.parameters()], lr=1e-2),
            torch.optim.Adam(self.critic.parameters(), lr=1e-2),
        ]


def test_actor_critic_shared_trunk_measured_with_its_owner(tmp_path: Any) -> None:
    model = ActorCritic()
    callback = GradientFlowCallback(blocks=["trunk", "actor", "critic"], log_every_n_steps=1)
    spy = Measured(callback)
    trainer(tmp_path, [callback, spy], max_steps=6).fit(model)
    assert sorted(spy.by_step) == list(range(6))
    for step, measurement in spy.by_step.items():
        ref = model.refs[step]
        if step % 2 == 0:  # the actor's step: the trunk from the actor's backward only
            assert measurement.block_names == ["trunk", "actor"]
            assert measurement.block_norms[0] == pytest.approx(ref["trunk"], rel=1e-5)
            assert measurement.block_norms[1] == pytest.approx(ref["head"], rel=1e-5)
            assert "grad_gain/actor" in measurement.metrics
        else:
            assert measurement.block_names == ["critic"]
            assert measurement.block_norms[0] == pytest.approx(ref["head"], rel=1e-5)
            assert "grad_norm_total/Adam-1" in measurement.metrics


def test_every_optimizer_measured_once_per_interval(tmp_path: Any) -> None:
    """With log_every_n_steps=4 both networks are measured on every interval (a plain
    ``step % 4 == 0`` would only ever measure the discriminator, which steps at even steps)."""
    callback = GradientFlowCallback(blocks=GEN_BLOCKS + DISC_BLOCKS, log_every_n_steps=4)
    spy = Measured(callback)
    trainer(tmp_path, [callback, spy], max_steps=12).fit(RecordingGAN())
    assert {step: m.optimizer for step, m in spy.by_step.items()} == {
        0: "SGD",
        1: "SGD-1",
        4: "SGD",
        5: "SGD-1",
        8: "SGD",
        9: "SGD-1",
    }
