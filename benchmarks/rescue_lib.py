"""Data, model, faults and one training run of the rescue benchmark (``benchmarks/rescue.py``).

Shared by the benchmark and ``examples/ex07_spike_rescue.py``.

* **Data**: the CPython standard library's own source, read from ``sysconfig.get_paths()["stdlib"]``:
  :data:`TRAIN_FILES` (concatenated in that order) for training, :data:`HELDOUT_FILES` (whole other
  modules, never trained on) for the held-out loss. Byte-level: vocabulary 256. A file missing from
  this Python is skipped (and listed in the results), never replaced by another.
* **Model**: a Post-LN character transformer (:class:`CharTransformer`), AdamW at a constant
  learning rate without warm-up.
* **Faults** (:class:`BadBatch`, :class:`LRJump`): bad batches replace the batch of a fixed step, a
  learning-rate jump multiplies the rate for a few steps. Everything else stays as in the clean run,
  so the clean run of the same seed and variant is the exact counterfactual.
* **Variants** (:data:`VARIANTS`): what guards the run: nothing, Lightning's ``gradient_clip_val``, or
  :class:`~lightning_gradwatch.Rule` lists in a ``GradientFlowCallback``.
"""

from __future__ import annotations

import math
import os
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_gradwatch import GradientFlowCallback, Rule

#: Training text: these modules of the standard library, concatenated in this order. Chosen to be
#: plain module files from CPython 3.9 on (no module that later became a package, like ``re``,
#: ``pathlib`` or ``zipfile``); checked here on 3.11 only, hence the skip of a missing one.
TRAIN_FILES: tuple[str, ...] = (
    "argparse.py",
    "ast.py",
    "base64.py",
    "calendar.py",
    "collections/__init__.py",
    "configparser.py",
    "contextlib.py",
    "csv.py",
    "dataclasses.py",
    "difflib.py",
    "enum.py",
    "functools.py",
    "gettext.py",
    "gzip.py",
    "inspect.py",
    "ipaddress.py",
    "json/__init__.py",
    "logging/__init__.py",
    "optparse.py",
    "pickle.py",
    "pprint.py",
    "random.py",
    "shutil.py",
    "statistics.py",
    "subprocess.py",
    "tempfile.py",
    "threading.py",
    "tokenize.py",
    "traceback.py",
    "typing.py",
)
#: Held-out text: other whole modules, never trained on.
HELDOUT_FILES: tuple[str, ...] = ("fractions.py", "heapq.py", "shlex.py", "textwrap.py")
VOCAB = 256


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """Byte tensors of the training and held-out text, and which files went into them."""

    train: Tensor
    heldout: Tensor
    root: str
    train_files: list[str]
    heldout_files: list[str]
    missing: list[str]


def _read(root: str, names: Sequence[str], missing: list[str]) -> tuple[Tensor, list[str]]:
    chunks, used = [], []
    for name in names:
        path = os.path.join(root, *name.split("/"))
        if not os.path.isfile(path):
            missing.append(name)
            continue
        with open(path, "rb") as handle:
            chunks.append(handle.read())
        used.append(name)
    data = b"".join(chunks)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), used


def load_corpus(root: Optional[str] = None) -> Corpus:
    """Read :data:`TRAIN_FILES` and :data:`HELDOUT_FILES` from the standard library of this Python."""
    root = root or sysconfig.get_paths()["stdlib"]
    missing: list[str] = []
    train, train_used = _read(root, TRAIN_FILES, missing)
    heldout, heldout_used = _read(root, HELDOUT_FILES, missing)
    if not train_used or not heldout_used:
        raise FileNotFoundError(f"no training or held-out file of the list found under {root}")
    return Corpus(train, heldout, root, train_used, heldout_used, missing)


def heldout_windows(corpus: Corpus, count: int, context: int) -> Tensor:
    """``count`` windows of ``context + 1`` bytes, evenly spaced over the held-out text (fixed)."""
    last = len(corpus.heldout) - context - 1
    starts = torch.linspace(0, last, count).long()
    return torch.stack([corpus.heldout[s : s + context + 1] for s in starts.tolist()])


# --------------------------------------------------------------------------------------------------
# Faults and scenarios
# --------------------------------------------------------------------------------------------------

#: What a bad batch holds instead of text (inputs and targets are bytes of the same sequence unless
#: said otherwise).
BAD_KINDS: dict[str, str] = {
    "random_bytes": "uniformly random bytes 0-255 (a binary or corrupted file)",
    "repeated_byte": "one byte (NUL) repeated (a zero-filled block of a file)",
    "shuffled_targets": "real text, targets permuted across the batch (misaligned labels)",
}


@dataclass(frozen=True)
class BadBatch:
    """``length`` consecutive out-of-distribution batches from optimizer step ``step`` on."""

    step: int
    kind: str
    length: int = 1

    def __post_init__(self) -> None:
        if self.kind not in BAD_KINDS:
            raise ValueError(f"kind must be one of {list(BAD_KINDS)}, got {self.kind!r}")

    @property
    def steps(self) -> range:
        return range(self.step, self.step + self.length)

    def describe(self) -> str:
        return f"{self.length} x {self.kind} at step {self.step}"


@dataclass(frozen=True)
class LRJump:
    """The learning rate multiplied by ``factor`` for ``length`` steps from step ``step`` on."""

    step: int
    factor: float
    length: int = 1

    @property
    def steps(self) -> range:
        return range(self.step, self.step + self.length)

    def describe(self) -> str:
        return f"lr x{self.factor:g} for {self.length} steps at step {self.step}"


Fault = Union[BadBatch, LRJump]


@dataclass(frozen=True)
class Scenario:
    """A named list of faults (none: the clean run)."""

    name: str
    description: str
    faults: tuple[Fault, ...] = ()


#: Where the faults sit, as fractions of the run (so that a shortened ``--quick`` run keeps them).
BAD_BATCH_AT: tuple[tuple[float, str], ...] = (
    (0.40, "random_bytes"),
    (0.55, "shuffled_targets"),
    (0.70, "repeated_byte"),
)
BAD_BATCH_LENGTH = 4
LR_JUMP_AT, LR_JUMP_FACTOR, LR_JUMP_LENGTH = 0.50, 10.0, 3


def scenarios(steps: int) -> tuple[Scenario, ...]:
    """The benchmark's scenarios for a run of ``steps`` optimizer steps (500: faults at 200, 275,
    350 and a learning-rate jump at 250). The first is the clean run, the others' counterfactual."""
    bad = tuple(BadBatch(round(at * steps), kind, BAD_BATCH_LENGTH) for at, kind in BAD_BATCH_AT)
    jump = LRJump(round(LR_JUMP_AT * steps), LR_JUMP_FACTOR, LR_JUMP_LENGTH)
    return (
        Scenario("natural", "no injected fault: the constant high learning rate, unmodified"),
        Scenario("bad_batches", "; ".join(f.describe() for f in bad), bad),
        Scenario("lr_jump", jump.describe(), (jump,)),
    )


class StepBatches(Dataset):
    """Item ``i`` is the whole batch of optimizer step ``i``: ``(inputs, targets)``.

    Windows start at random offsets of the training text drawn from ``seed``; a bad batch replaces the
    batch of its step and leaves every other step's batch as in the clean run.
    """

    def __init__(
        self,
        corpus: Corpus,
        steps: int,
        batch: int,
        context: int,
        seed: int,
        faults: Sequence[Fault] = (),
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.offsets = torch.randint(
            0, len(corpus.train) - context - 1, (steps, batch), generator=gen
        )
        self.text = corpus.train
        self.batch, self.context, self.seed = batch, context, seed
        self.bad = {s: f.kind for f in faults if isinstance(f, BadBatch) for s in f.steps}

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, step: int) -> tuple[Tensor, Tensor]:
        span = torch.arange(self.context + 1)
        seq = self.text[self.offsets[step].unsqueeze(1) + span]
        kind = self.bad.get(step)
        if kind is None:
            return seq[:, :-1], seq[:, 1:]
        gen = torch.Generator().manual_seed(self.seed * 100_003 + step)
        if kind == "shuffled_targets":
            targets = seq[:, 1:].flatten()
            targets = targets[torch.randperm(len(targets), generator=gen)].view(self.batch, -1)
            return seq[:, :-1], targets
        if kind == "random_bytes":
            seq = torch.randint(0, VOCAB, seq.shape, generator=gen)
        else:  # repeated_byte
            seq = torch.zeros_like(seq)
        return seq[:, :-1], seq[:, 1:]


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Size and schedule of one run (the defaults are the benchmark's)."""

    steps: int = 500
    batch: int = 16
    context: int = 64
    d_model: int = 64
    n_blocks: int = 4
    heads: int = 4
    lr: float = 5e-3
    weight_decay: float = 0.01
    eval_every: int = 10
    eval_windows: int = 64
    log_every_n_steps: int = 25


class PostLNBlock(nn.Module):
    """``x = LN(x + attn(x)); x = LN(x + mlp(x))``: LayerNorm on the residual path (Post-LN), the
    arrangement whose gradients are least tame without warm-up."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln_attn = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )
        self.ln_mlp = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = self.ln_attn(x + self.proj(attn.transpose(1, 2).reshape(b, t, d)))
        return self.ln_mlp(x + self.mlp(x))


class CharTransformer(pl.LightningModule):
    """Byte-level causal transformer trained on :class:`StepBatches` with AdamW.

    The learning rate is constant; an :class:`LRJump` multiplies it for its steps (a ``LambdaLR``
    stepped every optimizer step).
    """

    def __init__(
        self, config: RunConfig, corpus: Corpus, seed: int, faults: Sequence[Fault] = ()
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.config = config
        self.embed = nn.Embedding(VOCAB, config.d_model)
        self.pos = nn.Parameter(torch.randn(config.context, config.d_model) * 0.02)
        self.blocks = nn.ModuleList(
            PostLNBlock(config.d_model, config.heads) for _ in range(config.n_blocks)
        )
        self.head = nn.Linear(config.d_model, VOCAB)
        self.data = StepBatches(corpus, config.steps, config.batch, config.context, seed, faults)
        self.lr_factors = {s: f.factor for f in faults if isinstance(f, LRJump) for s in f.steps}
        self.register_buffer(
            "heldout",
            heldout_windows(corpus, config.eval_windows, config.context),
            persistent=False,
        )

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def loss(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(self(inputs).flatten(0, 1), targets.flatten())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self.loss(*batch)

    @torch.no_grad()
    def heldout_loss(self) -> float:
        """Mean loss (nats per byte) on the fixed held-out windows, in eval mode."""
        was_training = self.training
        self.eval()
        value = self.loss(self.heldout[:, :-1], self.heldout[:, 1:]).item()
        self.train(was_training)
        return value

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        factors = self.lr_factors
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: factors.get(s, 1.0))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def train_dataloader(self) -> DataLoader:
        # batch_size=None: item i is already the batch of step i, in order.
        return DataLoader(self.data, batch_size=None, shuffle=False)


# --------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """What guards a run: the callback's rules and Lightning's own clipping."""

    name: str
    description: str
    rules: Callable[[], list[Rule]]
    gradient_clip_val: Optional[float] = None


def _adaptive_clip() -> list[Rule]:
    # ZClip's defaults: clip to the EMA mean + 2.5 EMA std of the total norm (EMA factor 0.97).
    return [Rule("grad_norm_total", zscore=2.5, ema=0.97, warmup=25, action="clip")]


def _spike_skip() -> list[Rule]:
    # OLMo-core's SkipStepOptimizer policy: skip when the loss or the total gradient norm is more
    # than 6 std above the mean of the last 128 steps (after 64).
    return [
        Rule("loss", zscore=6.0, window=128, warmup=64, action="skip"),
        Rule("grad_norm_total", zscore=6.0, window=128, warmup=64, action="skip"),
    ]


VARIANTS: tuple[Variant, ...] = (
    Variant("none", "no rules (`GradientFlowCallback(rules=[])`, measurement only)", list),
    Variant(
        "lightning_clip",
        "Lightning `gradient_clip_val=1.0` (no rules)",
        list,
        gradient_clip_val=1.0,
    ),
    Variant(
        "static_clip",
        '`Rule("grad_norm_total", max=1.0, action="clip", clip_to=1.0)`',
        lambda: [Rule("grad_norm_total", max=1.0, action="clip", clip_to=1.0)],
    ),
    Variant(
        "adaptive_clip",
        '`Rule("grad_norm_total", zscore=2.5, ema=0.97, warmup=25, action="clip")`',
        _adaptive_clip,
    ),
    Variant(
        "spike_skip",
        '`Rule("loss", zscore=6.0, window=128, warmup=64, action="skip")` + the same on '
        "`grad_norm_total`",
        _spike_skip,
    ),
)


def variant_rules(variant: Variant) -> Optional[list[Rule]]:
    """The variant's rules, or ``None`` when this version of the package cannot express them."""
    try:
        return variant.rules()
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------


class Recorder(pl.Callback):
    """Train loss of every step and the held-out loss after every ``every``-th step (and at 0)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.train_loss: list[float] = []
        self.heldout: dict[int, float] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.heldout[0] = pl_module.heldout_loss()  # type: ignore[operator]

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        self.train_loss.append(float(outputs["loss"]))
        step = trainer.global_step  # optimizer steps done, this one included
        if step % self.every == 0 or step == trainer.max_steps:
            self.heldout[step] = pl_module.heldout_loss()  # type: ignore[operator]


@dataclass
class RunResult:
    """What one run measured (plain data: it crosses process boundaries and goes to JSON)."""

    scenario: str
    variant: str
    seed: int
    train_loss: list[float]
    heldout: dict[int, float]
    actions: dict[str, list[int]] = field(default_factory=dict)  # action -> steps it acted at
    alerts: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    available: bool = True

    @property
    def final_heldout(self) -> float:
        return self.heldout[max(self.heldout)] if self.heldout else math.nan


def run(
    config: RunConfig,
    corpus: Corpus,
    scenario: Scenario,
    variant: Variant,
    seed: int,
    root: Optional[str] = None,
) -> RunResult:
    """Train one run with a real ``lightning.Trainer`` and ``GradientFlowCallback(rules=...)``.

    Every variant has the callback (``rules=[]`` for "none" and Lightning's clipping), so the
    measurement cost is the same everywhere. ``root``: where the alerts file goes (a temporary
    folder by default).
    """
    rules = variant_rules(variant)
    if rules is None:
        return RunResult(scenario.name, variant.name, seed, [], {}, available=False)
    with tempfile.TemporaryDirectory() as tmp:
        model = CharTransformer(config, corpus, seed, scenario.faults)
        callback = GradientFlowCallback(
            log_every_n_steps=config.log_every_n_steps, require_logger=False, rules=rules
        )
        recorder = Recorder(config.eval_every)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=config.steps,
            logger=False,
            callbacks=[callback, recorder],
            gradient_clip_val=variant.gradient_clip_val,
            default_root_dir=root or tmp,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
        )
        start = time.perf_counter()
        trainer.fit(model)
        seconds = time.perf_counter() - start
    actions: dict[str, list[int]] = {}
    for alert in callback.alerts:
        steps = actions.setdefault(alert.action, [])
        if not steps or steps[-1] != alert.step:
            steps.append(alert.step)
    alerts = [
        {"step": a.step, "rule": a.rule, "action": a.action, "value": a.value}
        for a in callback.alerts
    ]
    return RunResult(
        scenario.name,
        variant.name,
        seed,
        recorder.train_loss,
        recorder.heldout,
        actions,
        alerts,
        seconds,
    )
