"""Do no harm (issue 19): the Trainer configurations and entry points users combine, each a short
real run on CPU made twice, without and with ``GradientFlowCallback`` (same seed, same data),
asserting

(a) the final weights and buffers are bit-identical (``torch.equal``) with and without the callback;
(b) every ``grad_norm_total`` the callback measured, and every one a logger holds, equals an
    independent reference: the L2 norm of the stepping optimizer's parameter gradients taken in
    float64 by :class:`TotalNormReference`, placed after the callback (Lightning calls callbacks'
    ``on_before_optimizer_step`` in list order, after AMP unscaling and before its own clipping, so
    both read the same gradients), and every step due (``log_every_n_steps``) was measured;
(c) nothing is left attached: every module's and parameter's hooks and torch's global module hooks
    are what they were before the run, and a forward/backward afterwards registers no tensor hook
    and changes nothing the callback holds (its probe buffer, ``last``);
and that the callback causes no warning of torch or Lightning that the run without it does not
have, and of its own only the first step's wiring report (some models here have dead and unused
parameters on purpose) or the one the case names, once; and that it writes nothing outside the
run's folder. The model has a ``Dropout`` (a callback drawing random numbers would change its masks,
hence the weights) and a ``BatchNorm`` (buffers).
"""

from __future__ import annotations

import dataclasses
import re
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Optional
from unittest import mock

import lightning.pytorch as pl
import pytest
import torch
from expected_warnings import RULE_TRIPS, WIRING_REPORT
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
    ModelPruning,
    StochasticWeightAveraging,
)
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.tuner import Tuner
from reference import RefNet, csv_metrics, tensorboard_events, tensorboard_scalars, trainer
from torch import Tensor, nn
from torch.optim import Optimizer
from torch_features import needs_cpu_bf16_mse

from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch.keys import total_norm_key

pytestmark = [WIRING_REPORT, RULE_TRIPS]

#: The callback's first-step wiring report and findings (dead and unused parameters, damping tanh
#: flow): allowed in every case. Rule trips are allowed only where a case sets a rule.
WIRING = r"GradientFlowCallback. (gradient wiring at step|step [0-9]+. )"
RULE_TRIP = r"GradientFlowCallback. rule '.*' tripped at step"


class MatrixNet(RefNet):
    """:class:`~reference.RefNet` with 3 blocks of width 8, 32 samples in batches of 8 (4 steps an
    epoch), a ``Linear -> BatchNorm -> Dropout`` stem, and validation, test and predict loops.

    Args:
        frozen: submodules whose parameters do not train.
        none_at: batch indices at which ``training_step`` returns ``None`` (the batch is skipped).
        raise_at: the optimizer step at which ``training_step`` raises :class:`Boom`.
        backbone: the stem is also ``self.backbone`` (for ``BackboneFinetuning``), and the optimizer
            takes only the parameters that require grad (the callback adds the backbone later).
        manual: manual optimization (``"one"``: one optimizer, clipping inside ``training_step``;
            ``"two"``: the stem and first block on one SGD, the rest on another).
    """

    def __init__(
        self,
        frozen: Sequence[str] = (),
        none_at: Sequence[int] = (),
        manual: Optional[str] = None,
        raise_at: Optional[int] = None,
        backbone: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**{"depth": 3, "n_samples": 32, "batch_size": 8, **kwargs})
        self.stem = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.1))
        for name in frozen:
            self.get_submodule(name).requires_grad_(False)
        self.none_at = set(none_at)
        self.manual = manual
        self.automatic_optimization = manual is None
        self.raise_at = raise_at
        if backbone:
            self.backbone = self.stem
        self.init_kwargs = {
            "frozen": frozen,
            "none_at": none_at,
            "manual": manual,
            "raise_at": raise_at,
            "backbone": backbone,
            **kwargs,
        }

    def loss(self, batch: Any) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y.to(self.head.weight.dtype))

    def training_step(self, batch: Any, batch_idx: int) -> Optional[Tensor]:
        if batch_idx in self.none_at:
            return None
        if self.global_step == self.raise_at:
            raise Boom(f"boom at step {self.global_step}")
        if self.manual is None:
            return self.loss(batch)
        optimizers = self.optimizers()
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            optimizer.zero_grad()
            self.manual_backward(self.loss(batch))
            if self.manual == "one":
                self.clip_gradients(optimizer, gradient_clip_val=0.01)
            optimizer.step()
        return None

    def configure_optimizers(self) -> Any:
        if hasattr(self, "backbone"):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)
        if self.manual != "two":
            return super().configure_optimizers()
        first = [*self.stem.parameters(), *self.blocks[0].parameters()]
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return [torch.optim.SGD(first, lr=self.lr), torch.optim.SGD(rest, lr=self.lr)]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if not self.trainer.barebones:  # self.log is refused there
            self.log("val_loss", self.loss(batch))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", self.loss(batch))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0].to(self.head.weight.dtype))

    def val_dataloader(self) -> Any:
        return self.train_dataloader()

    def test_dataloader(self) -> Any:
        return self.train_dataloader()

    def predict_dataloader(self) -> Any:
        return self.train_dataloader()


class Boom(RuntimeError):
    """The failure :class:`MatrixNet` raises at ``raise_at``."""


class ServiceLogger(Logger):
    """A custom logger for a metrics service: no ``save_dir``, no ``log_dir``; keeps what it
    gets."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "service"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        self.metrics.setdefault(-1 if step is None else step, {}).update(metrics)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


@dataclasses.dataclass
class Record:
    """One ``on_before_optimizer_step``: the reference total norm and what the callback measured."""

    fit: int
    step: int
    reference: Optional[float]  # None: no gradient at all (the batch was skipped)
    dtype: Optional[torch.dtype]
    key: str = ""
    measured: Optional[float] = None


class TotalNormReference(Callback):
    """After ``gradwatch`` in the callback list: at every optimizer step, the float64 norm (of the
    callback's ``norm_type``; L2 without it) of the stepping optimizer's parameter gradients and the total ``gradwatch`` measured at that step (its
    ``last`` when it is new), and each fit's probe (to check it is inert after the fit)."""

    def __init__(self, gradwatch: Optional[GradientFlowCallback]) -> None:
        self.gradwatch = gradwatch
        self.records: list[Record] = []
        self.fits = 0
        self.probes: list[Any] = []
        self._seen: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fits += 1
        if self.gradwatch is not None and self.gradwatch._probe is not None:
            self.probes.append(self.gradwatch._probe)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        grads = [
            p.grad.detach().reshape(-1)
            for group in optimizer.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        record = Record(self.fits, trainer.global_step, None, None)
        if grads:
            flat = torch.cat([g.double() for g in grads])
            kind = self.gradwatch.norm_type if self.gradwatch is not None else "l2"
            norm = (
                flat.abs().mean() if kind == "mean" else torch.linalg.vector_norm(flat, ORD[kind])
            )
            record.reference, record.dtype = norm.item(), grads[0].dtype
        last = self.gradwatch.last if self.gradwatch is not None else None
        if last is not None and last is not self._seen:
            self._seen = last
            record.key = total_norm_key(last.optimizer)
            record.measured = last.metrics[record.key]
        self.records.append(record)


#: ``torch.linalg.vector_norm``'s ``ord`` of each norm type (``"mean"``: the mean absolute value).
ORD = {"l2": 2.0, "l1": 1.0, "linf": float("inf")}


def tolerance(dtype: Optional[torch.dtype]) -> float:
    """Relative tolerance of the callback's total norm against the float64 reference.

    The callback must take norms of float64 gradients in float64 and of every narrower type in
    float32 (the elements themselves are exact in both); a sum of n squares (or absolute values)
    accumulated in that precision carries a relative error of about log2(n) units of its epsilon,
    the square root halves it, combining the per-tensor partials adds a few more (a maximum is
    exact): 64 epsilons bounds it for the few hundred elements here. TensorBoard's float32 storage
    (half an epsilon of float32) is below that too."""
    return 64 * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


# -- one run ------------------------------------------------------------------------------------

Model = pl.LightningModule
#: A Trainer of the case (keyword arguments override its options).
Make = Callable[..., pl.Trainer]
#: An entry point: runs Trainers from ``make`` on the model (the run's root is the third argument)
#: and returns the models it trained, the last one being the one compared.
Entry = Callable[[Make, Model, str], list[Model]]


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration.

    Attributes:
        options: Trainer keywords.
        model_class: the LightningModule (:class:`MatrixNet`); ``model``: its keywords.
        logger: ``"csv"``, ``"tensorboard"``, ``"none"``, ``"custom"`` (:class:`ServiceLogger`),
            ``"mock"`` or ``"several"`` (CSV, TensorBoard and custom).
        extras: plugins and callbacks built afresh for each run (:func:`make_extra`).
        entry: a key of :data:`ENTRIES`.
        watch: ``GradientFlowCallback`` keywords (``log_every_n_steps=1`` unless given).
        memory: the run's root is a ``memory://`` URL.
        checkpoint: a checkpoint (under the run's root) that must hold the callback's state.
        warns: a warning of the callback the case expects, exactly once.
    """

    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    model_class: type[Model] = MatrixNet
    logger: str = "csv"
    extras: tuple[str, ...] = ()
    entry: str = "fit"
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    watch: dict[str, Any] = dataclasses.field(default_factory=dict)
    memory: bool = False
    checkpoint: Optional[str] = None
    warns: Optional[str] = None

    @property
    def trains(self) -> bool:
        return (
            self.entry not in ("validate", "test", "predict")
            and self.options.get("max_steps", 4) != 0
        )


def make_logger(kind: str, root: str, version: int) -> Any:
    """The case's logger(s); each Trainer of a run writes its own ``version`` (a run without the
    callback may log nothing in a first fit, so a shared folder would warn in one run only)."""
    builders: dict[str, Callable[[], Any]] = {
        "csv": lambda: CSVLogger(root, name="csv", version=version),
        "tensorboard": lambda: TensorBoardLogger(root, name="tb", version=version),
        "custom": ServiceLogger,
        # A mock (Lightning's own tests use them): its log_dir is a Mock, not a path.
        "mock": lambda: mock.MagicMock(spec=Logger, name="logger"),
        "none": lambda: False,
    }
    if kind == "several":
        return [builders[name]() for name in ("csv", "tensorboard", "custom")]
    return builders[kind]()


def make_extra(name: str, root: str) -> Any:
    if name == "scaler":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        return MixedPrecision("16-mixed", "cpu", scaler=scaler)
    if name == "checkpoint":
        return ModelCheckpoint(dirpath=f"{root}/ckpt", every_n_train_steps=2, save_last=True)
    if name == "early_stopping":
        return EarlyStopping("val_loss", patience=0, min_delta=1.0)  # stops at the 2nd check
    if name == "lr_monitor":
        return LearningRateMonitor(logging_interval="step")
    if name == "swa":
        return StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    if name == "pruning":
        return ModelPruning("l1_unstructured", amount=0.5)  # at every epoch end
    if name == "backbone_finetuning":
        return BackboneFinetuning(unfreeze_backbone_at_epoch=1)
    raise AssertionError(name)


def _fit(make: Make, model: Model, root: str) -> list[Model]:
    make().fit(model)
    return [model]


def _evaluate(stage: str) -> Entry:
    def entry(make: Make, model: Model, root: str) -> list[Model]:
        getattr(make(), stage)(model)
        return [model]

    return entry


def _fit_then_evaluate(make: Make, model: Model, root: str) -> list[Model]:
    fit = make()
    fit.fit(model)
    fit.validate(model)
    fit.test(model)
    fit.predict(model)
    return [model]


def _fit_raises(make: Make, model: Model, root: str) -> list[Model]:
    with pytest.raises(Boom, match="boom at step 2"):
        make().fit(model)
    return [model]


def _lr_find(make: Make, model: Model, root: str) -> list[Model]:
    fit = make()
    finder = Tuner(fit).lr_find(model, min_lr=1e-3, max_lr=0.5, num_training=16)
    assert finder is not None and finder.suggestion() is not None
    assert model.lr == finder.suggestion()  # the tuner's result is what trains
    fit.fit(model)
    return [model]


def _scale_batch_size(make: Make, model: Model, root: str) -> list[Model]:
    fit = make()
    size = Tuner(fit).scale_batch_size(model, steps_per_trial=1, init_val=2, max_trials=2)
    assert size == model.batch_size > 2  # the tuner's result is what trains
    fit.fit(model)
    return [model]


def _reuse(make: Make, model: Model, root: str) -> list[Model]:
    make(max_steps=2).fit(model)  # the same callback instance serves both Trainers
    make(max_steps=3).fit(model)
    return [model]


def _fit_twice(make: Make, model: Model, root: str) -> list[Model]:
    fit = make(max_steps=-1, max_epochs=1)
    fit.fit(model)
    fit.fit_loop.max_epochs = 2  # the same Trainer goes on for one more epoch
    fit.fit(model)
    assert fit.global_step == 8
    return [model]


def _resume(make: Make, model: Model, root: str) -> list[Model]:
    first = make(max_steps=2)
    first.fit(model)
    path = f"{root}/mid.ckpt"
    first.save_checkpoint(path)
    torch.manual_seed(1)  # another initialisation: the checkpoint must decide everything
    resumed = type(model)(**model.init_kwargs)
    make(max_steps=4).fit(resumed, ckpt_path=path)
    return [model, resumed]


ENTRIES: dict[str, Entry] = {
    "fit": _fit,
    "validate": _evaluate("validate"),
    "test": _evaluate("test"),
    "predict": _evaluate("predict"),
    "fit_then_evaluate": _fit_then_evaluate,
    "fit_raises": _fit_raises,
    "lr_find": _lr_find,
    "scale_batch_size": _scale_batch_size,
    "reuse": _reuse,
    "fit_twice": _fit_twice,
    "resume": _resume,
}


@dataclasses.dataclass
class Outcome:
    state: dict[str, Tensor]
    models: list[Model]
    trainers: list[pl.Trainer]
    reference: TotalNormReference
    gradwatch: Optional[GradientFlowCallback]
    warnings: list[str]


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hooks(model: nn.Module) -> dict[str, Any]:
    """The ids of every hook on ``model``'s modules and parameters, and of torch's global module
    hooks."""
    from torch.nn.modules import module as torch_module

    found: dict[str, Any] = {
        f"module {name}": [list(getattr(m, attr)) for attr in HOOK_DICTS]
        for name, m in model.named_modules()
    }
    for name, param in model.named_parameters():
        found[f"param {name}"] = [
            list(getattr(param, attr, None) or {})
            for attr in ("_backward_hooks", "_post_accumulate_grad_hooks")
        ]
    found["global"] = [list(getattr(torch_module, f"_global{attr}")) for attr in HOOK_DICTS]
    return found


def run(case: Case, root: str, watch: bool) -> Outcome:
    torch.manual_seed(0)
    model = case.model_class(**case.model)
    gradwatch = None
    if watch:
        options = {"log_every_n_steps": 1, "require_logger": case.logger != "none", **case.watch}
        gradwatch = GradientFlowCallback(**options)
    reference = TotalNormReference(gradwatch)
    trainers: list[pl.Trainer] = []

    def make(**overrides: Any) -> pl.Trainer:
        extras = [make_extra(name, root) for name in case.extras]
        plugins = [e for e in extras if not isinstance(e, Callback)]
        callbacks = [c for c in (gradwatch, reference) if c is not None]
        options: dict[str, Any] = {
            "max_steps": 4,
            "logger": make_logger(case.logger, root, len(trainers)),
            "limit_val_batches": 2,
            **({"plugins": plugins} if plugins else {}),
            **case.options,
            **overrides,
        }
        # The case's callbacks first (Lightning's tuner and finetuning callbacks act in setup or
        # on_fit_start, before the gradient-flow callback), the reference right after it.
        others = [e for e in extras if isinstance(e, Callback)]
        fit = trainer(root, [*others, *callbacks], **options)
        trainers.append(fit)
        return fit

    before = hooks(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models = ENTRIES[case.entry](make, model, root)
    assert hooks(model) == before, "a hook was left"
    for other in models[1:]:  # built by the entry point: it had none
        assert hooks(other) == hooks(case.model_class(**case.model)), "a hook was left"
    final = models[-1]
    state = {key: value.detach().clone() for key, value in final.state_dict().items()}
    messages = [f"{w.category.__name__}: {w.message}".replace(root, "<root>") for w in caught]
    return Outcome(state, models, trainers, reference, gradwatch, messages)


# -- the checks ---------------------------------------------------------------------------------


def assert_same_state(plain: dict[str, Tensor], watched: dict[str, Tensor]) -> None:
    assert plain.keys() == watched.keys()
    changed = [key for key in plain if not torch.equal(plain[key], watched[key])]
    assert not changed, f"weights or buffers differ with the callback: {changed}"


def assert_totals_match(case: Case, outcome: Outcome) -> None:
    gradwatch, records = outcome.gradwatch, outcome.reference.records
    assert gradwatch is not None
    if case.trains:
        assert records, "no optimizer step was taken"
    for record in records:
        # Every step due is measured, except one without any gradient (nothing to measure).
        on_grid = record.step % gradwatch.log_every_n_steps == 0
        due = on_grid and record.reference is not None
        assert (record.measured is not None) == due, record
        if record.measured is not None:
            rel = tolerance(record.dtype)
            assert record.measured == pytest.approx(record.reference, rel=rel), record
    # What each logger holds: the reference of the latest record at that step (a later fit that
    # starts again at step 0 replaces the earlier one's figures in the logs).
    latest = {(r.step, r.key): r for r in records if r.measured is not None}
    last_fit = {(r.step, r.key) for r in latest.values() if r.fit == outcome.reference.fits}
    for name, logged in logged_totals(outcome.trainers[-1]):
        assert last_fit <= set(logged), f"{name}: steps measured but not logged"
        for where, value in logged.items():
            assert where in latest, f"{name} holds {where} = {value}, but nothing was measured"
            record = latest[where]
            assert value == pytest.approx(record.reference, rel=tolerance(record.dtype)), name


def logged_totals(fit: pl.Trainer) -> list[tuple[str, dict[tuple[int, str], float]]]:
    """Every total-norm key each logger of ``fit`` holds, read back from its files (or memory)."""
    found = []
    for logger in fit.loggers:
        if isinstance(logger, CSVLogger):
            has_file = get_filesystem(logger.log_dir).exists(f"{logger.log_dir}/metrics.csv")
            rows = csv_metrics(logger.log_dir) if has_file else {}  # none when nothing was logged
        elif isinstance(logger, TensorBoardLogger):
            rows = tensorboard_scalars(tensorboard_events(logger.log_dir))
        elif isinstance(logger, ServiceLogger):
            rows = logger.metrics
        elif isinstance(logger, mock.MagicMock):
            rows = {}
            for call in logger.log_metrics.call_args_list:
                metrics = call.args[0] if call.args else call.kwargs["metrics"]
                rows.setdefault(call.kwargs["step"], {}).update(metrics)
        else:  # fast_dev_run's and the tuner's DummyLogger keep nothing
            continue
        totals = {
            (step, key): value
            for step, values in rows.items()
            for key, value in values.items()
            if re.fullmatch(r"grad_norm_total(/.*)?", key)
        }
        found.append((type(logger).__name__, totals))
    return found


def assert_inert_after(outcome: Outcome) -> None:
    """A forward/backward after the run, on a batch of the model's own data, registers no tensor
    hook on any module's output and changes nothing the callback holds."""
    gradwatch, model = outcome.gradwatch, outcome.models[-1]
    assert gradwatch is not None
    last = gradwatch.last
    buffers = [probe.buffer.clone() for probe in outcome.reference.probes]
    batch = next(iter(model.train_dataloader()))
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    outputs: list[Tensor] = []
    # Registered after the run, so they run after any hook the callback might have left.
    spies = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in model.modules()]
    model.train()
    try:
        model(x.to(next(model.parameters()).dtype)).sum().backward()
    finally:
        for spy in spies:
            spy.remove()
    tensors = [o for o in outputs if isinstance(o, Tensor)]
    assert tensors and not any(t._backward_hooks for t in tensors), "a tensor hook was registered"
    assert gradwatch.last is last
    assert all(torch.equal(b, p.buffer) for b, p in zip(buffers, outcome.reference.probes))


def assert_warnings(case: Case, plain: Outcome, watched: Outcome) -> None:
    ours = [m for m in watched.warnings if "GradientFlowCallback" in m]
    others = [m for m in watched.warnings if "GradientFlowCallback" not in m]
    assert set(others) <= set(plain.warnings), "the callback caused a warning"
    allowed = [WIRING] + ([RULE_TRIP] if "rules" in case.watch else [])
    if case.warns is not None:
        assert sum(bool(re.search(case.warns, m)) for m in ours) == 1, ours
        allowed.append(case.warns)
    unexpected = [m for m in ours if not any(re.search(p, m) for p in allowed)]
    assert not unexpected, unexpected


# -- the matrix ---------------------------------------------------------------------------------

#: One process without accumulation has one batch size only: the noise scale cannot be measured.
NOISE_NOT_MEASURED = (
    r"noise_scale=True\): the gradient noise scale is not measured with one process and no "
    "gradient accumulation"
)
TWO_EPOCHS = {"max_steps": -1, "max_epochs": 2, "limit_train_batches": 2}
TRIP_EVERY_STEP = [Rule("grad_norm_total", max=1e-9, action="warn")]

CASES = [
    # every precision Lightning accepts on CPU
    pytest.param(Case({"precision": "32-true"}), id="32-true"),
    pytest.param(Case({"precision": "64-true"}), id="64-true"),
    pytest.param(Case({"precision": "bf16-mixed"}), id="bf16-mixed"),
    pytest.param(Case({"precision": "bf16-true"}), id="bf16-true", marks=needs_cpu_bf16_mse),
    pytest.param(Case({"precision": "16-mixed"}), id="16-mixed-falls-back-to-bf16"),
    pytest.param(Case(extras=("scaler",)), id="16-mixed-with-grad-scaler"),
    pytest.param(
        Case({"accumulate_grad_batches": 2, "gradient_clip_val": 0.01}, extras=("scaler",)),
        id="16-mixed-scaler-accumulation-clipping",
    ),
    # loggers
    pytest.param(
        Case(logger="tensorboard", watch={"log_histograms": True, "figure_every_n_steps": 2}),
        id="tensorboard-histograms-heatmap",
    ),
    pytest.param(Case(logger="csv"), id="csv"),
    pytest.param(Case(logger="none"), id="no-logger"),
    pytest.param(Case(logger="several"), id="several-loggers"),
    pytest.param(Case(logger="custom"), id="custom-logger-without-save-dir"),
    pytest.param(Case(logger="mock"), id="mock-logger-log-dir-not-a-path"),
    pytest.param(Case(memory=True, watch={"rules": TRIP_EVERY_STEP}), id="memory-root-dir"),
    # optimization
    pytest.param(Case({"accumulate_grad_batches": 2}), id="accumulation"),
    pytest.param(Case({"accumulate_grad_batches": 3}), id="accumulation-with-partial-last-step"),
    pytest.param(Case({"gradient_clip_val": 0.01}), id="clip-by-norm"),
    pytest.param(
        Case({"gradient_clip_val": 0.001, "gradient_clip_algorithm": "value"}),
        id="clip-by-value",
    ),
    pytest.param(Case(model={"manual": "one"}), id="manual-optimization-with-clipping"),
    pytest.param(Case(model={"manual": "two"}), id="manual-two-optimizers"),
    pytest.param(Case(model={"none_at": [1]}), id="training-step-returns-none"),
    pytest.param(
        Case({"accumulate_grad_batches": 2}, watch={"noise_scale": True}),
        id="noise-scale-with-accumulation",
    ),
    pytest.param(
        Case(
            {"accumulate_grad_batches": 2}, model={"none_at": [2, 3]}, watch={"noise_scale": True}
        ),
        id="noise-scale-with-a-step-without-gradients",
    ),
    pytest.param(Case(watch={"log_every_n_steps": 3}), id="unmeasured-steps"),
    pytest.param(Case(watch={"rules": []}), id="no-rules"),
    pytest.param(Case(watch={"norm_type": "linf", "log_param_norms": True}), id="linf-norms"),
    pytest.param(Case(watch={"norm_type": "mean", "log_param_norms": "*.bias"}), id="mean-norms"),
    pytest.param(
        Case(watch={"noise_scale": True}, warns=NOISE_NOT_MEASURED),
        id="noise-scale-unmeasurable-warns-once",
    ),
    # the model
    pytest.param(Case(model_class=BoringModel), id="lightning-boring-model"),
    pytest.param(
        Case(model={"frozen": ["blocks.0"], "skip": [1], "dead_param": True}),
        id="frozen-and-unused-parameters",
    ),
    # entry points
    pytest.param(Case(entry="lr_find"), id="tuner-lr-find"),
    pytest.param(Case(entry="scale_batch_size"), id="tuner-scale-batch-size"),
    pytest.param(Case(entry="reuse"), id="one-callback-two-fits"),
    pytest.param(Case(entry="fit_twice"), id="same-trainer-fit-twice-more-epochs"),
    pytest.param(Case(entry="validate"), id="validate-without-fit"),
    pytest.param(Case(entry="test"), id="test-without-fit"),
    pytest.param(Case(entry="predict"), id="predict-without-fit"),
    pytest.param(Case(entry="resume", checkpoint="mid.ckpt"), id="resume-from-checkpoint"),
    pytest.param(Case(entry="fit_then_evaluate"), id="fit-then-validate-test-predict"),
    pytest.param(Case(entry="fit_raises", model={"raise_at": 2}), id="exception-in-training-step"),
    # loop options
    pytest.param(Case({"fast_dev_run": True}), id="fast-dev-run"),
    pytest.param(Case({"max_steps": 0}), id="max-steps-0"),
    pytest.param(Case({"val_check_interval": 2}), id="val-check-interval"),
    pytest.param(Case(TWO_EPOCHS), id="limit-train-batches"),
    pytest.param(Case({"max_time": {"minutes": 5}}), id="max-time"),
    pytest.param(Case({"overfit_batches": 2}), id="overfit-batches"),
    pytest.param(
        Case({"enable_checkpointing": True}, extras=("checkpoint",), checkpoint="ckpt/last.ckpt"),
        id="model-checkpoint",
    ),
    pytest.param(
        Case(
            {"max_steps": -1, "max_epochs": 4, "limit_train_batches": 2},
            extras=("early_stopping",),
        ),
        id="early-stopping",
    ),
    pytest.param(Case(extras=("lr_monitor",)), id="learning-rate-monitor"),
    pytest.param(Case({"detect_anomaly": True}), id="detect-anomaly"),
    pytest.param(Case({"deterministic": True}), id="deterministic"),
    pytest.param(
        Case({"barebones": True, "log_every_n_steps": None}, logger="none"), id="barebones"
    ),
    pytest.param(Case({"inference_mode": False}), id="no-inference-mode"),
    pytest.param(Case({"num_sanity_val_steps": -1}), id="full-sanity-check"),
    pytest.param(Case({"profiler": "simple"}), id="profiler"),
    pytest.param(
        Case({"accumulate_grad_batches": 3, "val_check_interval": 2}),
        id="validation-inside-an-accumulation-window",
    ),
    # callbacks that change the model while it trains
    pytest.param(Case(TWO_EPOCHS, extras=("swa",)), id="stochastic-weight-averaging"),
    pytest.param(Case(TWO_EPOCHS, extras=("pruning",)), id="model-pruning"),
    pytest.param(
        Case(TWO_EPOCHS, extras=("backbone_finetuning",), model={"backbone": True}),
        id="backbone-finetuning",
    ),
]


@pytest.mark.parametrize("case", CASES)
def test_no_harm(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would land here
    if case.memory:
        base = f"memory://gradwatch-matrix-{uuid.uuid4().hex}"
        roots = [f"{base}/plain", f"{base}/watched"]
    else:
        roots = [str(tmp_path / "plain"), str(tmp_path / "watched")]
    plain = run(case, roots[0], watch=False)
    watched = run(case, roots[1], watch=True)

    assert_same_state(plain.state, watched.state)
    assert_totals_match(case, watched)
    assert_inert_after(watched)
    assert_warnings(case, plain, watched)
    # Nothing beside the runs' own folders (a URL or a Mock taken for a local path would be here).
    written = {p.name for p in tmp_path.iterdir()}
    assert written <= (set() if case.memory else {"plain", "watched"}), written
    if case.memory:
        assert_written_through_fsspec(roots[1])
    if case.checkpoint is not None:
        assert_state_in_checkpoint(f"{roots[1]}/{case.checkpoint}", watched)


def assert_written_through_fsspec(root: str) -> None:
    """The callback's files are in the memory filesystem, beside Lightning's."""
    fs = get_filesystem(root)
    files = [path.rsplit("/", 1)[-1] for path in fs.find(root)]
    assert "metrics.csv" in files  # Lightning's own
    assert "gradwatch_model_facts.json" in files and "gradwatch_alerts.jsonl" in files, files


def assert_state_in_checkpoint(path: str, watched: Outcome) -> None:
    """The checkpoint holds the callback's state (under its state key, in its current layout)."""
    gradwatch = watched.gradwatch
    assert gradwatch is not None
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["callbacks"][gradwatch.state_key]
    assert state.keys() == gradwatch.state_dict().keys()
    assert state["version"] == gradwatch.state_dict()["version"]


@pytest.mark.parametrize(
    ("options", "watch", "message"),
    [
        pytest.param(
            {"logger": False},
            {},
            r"needs a logger to write to, but the Trainer has none .*require_logger=False",
            id="no-logger",
        ),
        pytest.param(
            {"barebones": True, "logger": False, "log_every_n_steps": None},
            {},
            r"needs a logger to write to, but the Trainer has none .*require_logger=False",
            id="barebones",
        ),
        pytest.param(
            {}, {"blocks": ["blocks.7"]}, r"Block 'blocks.7' does not exist", id="missing-block"
        ),
    ],
)
def test_misuse_is_a_clear_error_before_any_step(
    options: dict[str, Any], watch: dict[str, Any], message: str, tmp_path: Path
) -> None:
    """The configurations that cannot work (no logger while one is required, as under
    ``barebones=True``; a named block that does not exist) raise at fit start, naming the fix,
    before any step, and leave nothing attached."""
    torch.manual_seed(0)
    model = MatrixNet()
    before = hooks(model)
    reference = TotalNormReference(None)
    fit = trainer(tmp_path, [GradientFlowCallback(**watch), reference], **options)
    with pytest.raises(ValueError, match=message):
        fit.fit(model)
    assert reference.records == [] and hooks(model) == before
