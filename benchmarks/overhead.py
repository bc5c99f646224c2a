"""What ``GradientFlowCallback`` costs per training step, against the built-in way and two floors.

Every variant runs inside ONE ``lightning.Trainer`` fit per model, switched per optimizer step: each
round is a shuffled sequence of one step per variant (the baseline included), so the machine's drift
(this kind of shared machine moves by 5-10 % over minutes) hits every variant alike, and each variant
step is paired with the baseline step of the same round. A variant is attached (hooks registered) at
the start of its step and fully detached afterwards, outside the timed window; the baseline step has
no hook at all.

Variants:

* ``baseline``: no instrumentation.
* ``measured``: ``GradientFlowCallback(log_every_n_steps=1, log_param_norms=True)`` (every figure,
  default rules), TensorBoard + CSV loggers.
* ``measured_no_stats``: the same with ``log_grad_stats=False`` (where the grad-stats pass costs).
* ``unmeasured``: a step the callback does not measure (``rules=[]``): hooks attached, returning at once.
* ``governance``: ``rules=[Rule("nonfinite", action="halt")]`` on a step that is not measured: the
  every-step check (one ``_foreach_norm`` pass, one host copy). This is also what an unmeasured step
  costs with the default rules.
* ``builtin``: Lightning's ``grad_norm(self, 2)`` + ``self.log_dict`` in ``on_before_optimizer_step``.
* ``backward_hooks``: ``register_full_backward_hook`` on every ``nn.Linear`` + ``.item()`` per module.
* ``floor``: one ``torch._foreach_norm`` over the parameter gradients + one host copy.
* ``floor_blocks``: the floor + the norm of each block output's gradient via tensor hooks.

"Every 50" is derived: ``(49 x unmeasured + measured) / 50`` (and with the default rules
``(49 x governance + measured) / 50``).

Reported per variant: median step time (wall clock) and its min-max over rounds, the paired
difference to the baseline step of the same round (median, bootstrap 95 % CI), the ratio to the
baseline, the same difference in process CPU time, and the variant's *own* time per step: wall time
spent inside its Lightning hooks, forward hooks, tensor hooks and module backward hooks (measured by
wrapping them; autograd's own machinery for full backward hooks is not in it, so ``backward_hooks`` own
time is a lower bound).

Usage::

    .venv/bin/python benchmarks/overhead.py            # the full run (several minutes)
    .venv/bin/python benchmarks/overhead.py --quick    # tiny models, a few steps (smoke test)

Writes ``overhead.md`` and ``overhead.json`` to ``--out`` (default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset

from lightning_gradwatch import GradientFlowCallback
from lightning_gradwatch._compat import foreach_norm

try:  # governance lands separately; the variant is skipped without it
    from lightning_gradwatch import Rule
except ImportError:  # pragma: no cover
    Rule = None  # type: ignore[assignment,misc]

HOOKS = (
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


# --------------------------------------------------------------------------------------------------
# Own-time instrumentation
# --------------------------------------------------------------------------------------------------


class Stopwatch:
    """Accumulates wall time spent inside wrapped hooks during the current step."""

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start

        return timed


OWN = Stopwatch()


class timed_hook_registration:
    """While active, every forward hook, tensor hook and full backward hook registered is timed.

    Lightning registers none of these in a plain CPU fit, so what is timed is the variants' own hooks.
    """

    def __enter__(self) -> timed_hook_registration:
        self._forward = nn.Module.register_forward_hook
        self._backward = nn.Module.register_full_backward_hook
        self._tensor = torch.Tensor.register_hook
        forward, backward, tensor = self._forward, self._backward, self._tensor

        def register_forward_hook(module: nn.Module, hook: Any, *args: Any, **kwargs: Any) -> Any:
            return forward(module, OWN.wrap(hook), *args, **kwargs)

        def register_full_backward_hook(module: nn.Module, hook: Any, *args: Any, **kw: Any) -> Any:
            return backward(module, OWN.wrap(hook), *args, **kw)

        def register_hook(self_: Tensor, hook: Any) -> Any:
            return tensor(self_, OWN.wrap(hook))

        nn.Module.register_forward_hook = register_forward_hook  # type: ignore[method-assign]
        nn.Module.register_full_backward_hook = register_full_backward_hook  # type: ignore[method-assign]
        torch.Tensor.register_hook = register_hook  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        nn.Module.register_forward_hook = self._forward  # type: ignore[method-assign]
        nn.Module.register_full_backward_hook = self._backward  # type: ignore[method-assign]
        torch.Tensor.register_hook = self._tensor  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class Repeat(IterableDataset):
    """The same batch forever: no epoch boundaries, no data cost."""

    def __init__(self, batch: tuple[Tensor, Tensor]) -> None:
        self.batch = batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self.batch


class GPTBlock(nn.Module):
    """Pre-LN transformer block (causal self-attention + GELU MLP)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, n_blocks: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        self.blocks = nn.ModuleList(GPTBlock(d, heads) for _ in range(n_blocks))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class Stack(nn.Module):
    """``blocks`` (a ModuleList) applied in order."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class BenchModule(pl.LightningModule):
    """Wraps a network; ``builtin`` switches Lightning's documented ``grad_norm`` recipe on."""

    def __init__(self, net: nn.Module, batch: tuple[Tensor, Tensor], loss: str) -> None:
        super().__init__()
        self.net = net
        self.batch = batch
        self.loss = loss
        self.builtin = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        out = self.net(x)
        if self.loss == "ce":
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        return F.mse_loss(out, y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.builtin:
            start = time.perf_counter()
            self.log_dict(grad_norm(self, norm_type=2))
            OWN.total += time.perf_counter() - start

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(Repeat(self.batch), batch_size=None)


@dataclass
class ModelSpec:
    name: str
    label: str
    build: Callable[[], BenchModule]
    rounds: int


def _mlp(width: int, depth: int, batch: int) -> BenchModule:
    net = Stack([nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])
    data = (torch.randn(batch, width), torch.randn(batch, width))
    return BenchModule(net, data, "mse")


def _gpt(d: int, n_blocks: int, seq: int, batch: int, vocab: int = 1024) -> BenchModule:
    net = GPT(vocab, d, n_blocks, heads=max(1, d // 64), seq=seq)
    tokens = torch.randint(0, vocab, (batch, seq))
    return BenchModule(net, (tokens, torch.roll(tokens, -1, dims=1)), "ce")


def _stress(n_blocks: int, width: int, batch: int) -> BenchModule:
    net = Stack([nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(n_blocks)])
    return BenchModule(net, (torch.randn(batch, width), torch.randn(batch, width)), "mse")


def _many_params(n_blocks: int, linears: int, width: int, batch: int) -> BenchModule:
    # Each block: `linears` Linear layers (2 tensors each) -> n_blocks * linears * 2 tensors.
    net = Stack(
        [
            nn.Sequential(
                *[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(linears)]
            )
            for _ in range(n_blocks)
        ]
    )
    return BenchModule(net, (torch.randn(batch, width), torch.randn(batch, width)), "mse")


def model_specs(quick: bool, rounds: Optional[int]) -> list[ModelSpec]:
    if quick:
        specs = [
            ModelSpec("mlp", "MLP 4 x Linear(32)+ReLU, batch 8", lambda: _mlp(32, 4, 8), 2),
            ModelSpec("gpt", "GPT 2 blocks d 32 seq 8 batch 2", lambda: _gpt(32, 2, 8, 2, 64), 2),
            ModelSpec("stress", "20 tiny blocks", lambda: _stress(20, 4, 4), 2),
            ModelSpec(
                "params", "5 blocks x 4 Linear (40 tensors)", lambda: _many_params(5, 4, 4, 4), 2
            ),
        ]
    else:
        specs = [
            ModelSpec(
                "mlp", "24 x Linear(512)+ReLU MLP, batch 256", lambda: _mlp(512, 24, 256), 40
            ),
            ModelSpec(
                "gpt",
                "12-block pre-LN GPT, d 256, seq 128, batch 8",
                lambda: _gpt(256, 12, 128, 8),
                12,
            ),
            ModelSpec(
                "stress",
                "500 tiny blocks (Linear(8)+Tanh), batch 16",
                lambda: _stress(500, 8, 16),
                30,
            ),
            ModelSpec(
                "params",
                "2,000 parameter tensors (100 blocks x 10 Linear(16)), batch 16",
                lambda: _many_params(100, 10, 16, 16),
                20,
            ),
        ]
    if rounds is not None:
        for spec in specs:
            spec.rounds = rounds
    return specs


# --------------------------------------------------------------------------------------------------
# Variants: attached for one step, detached afterwards (outside the timed window)
# --------------------------------------------------------------------------------------------------


class Variant:
    """One way of watching gradients. ``callback`` receives the forwarded Lightning hooks."""

    name = "baseline"
    callback: Optional[Callback] = None

    def attach(self, trainer: pl.Trainer, module: BenchModule) -> None:
        pass

    def detach(self, trainer: pl.Trainer, module: BenchModule) -> None:
        pass


class GradwatchVariant(Variant):
    def __init__(self, name: str, **kwargs: Any) -> None:
        self.name = name
        self.callback = GradientFlowCallback(blocks="net.blocks", **kwargs)

    def attach(self, trainer: pl.Trainer, module: BenchModule) -> None:
        self.callback.on_fit_start(trainer, module)

    def detach(self, trainer: pl.Trainer, module: BenchModule) -> None:
        self.callback.teardown(trainer, module, "fit")


class BuiltinVariant(Variant):
    name = "builtin"

    def attach(self, trainer: pl.Trainer, module: BenchModule) -> None:
        module.builtin = True

    def detach(self, trainer: pl.Trainer, module: BenchModule) -> None:
        module.builtin = False
        # Lightning re-logs a step value on every later step of the epoch until its results are
        # reset: without this, every later step (baseline included) would pay for these keys.
        results = trainer._results
        if results is not None:
            results.reset()


class BackwardHooksVariant(Variant, Callback):
    """The naive way: a full backward hook on every Linear, ``.item()`` on each output gradient."""

    name = "backward_hooks"

    def __init__(self) -> None:
        self.callback = self
        self.norms: dict[str, float] = {}
        self.handles: list[Any] = []

    def attach(self, trainer: pl.Trainer, module: BenchModule) -> None:
        for name, sub in module.named_modules():
            if isinstance(sub, nn.Linear):
                self.handles.append(sub.register_full_backward_hook(self._hook(name)))

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, grad_input: Any, grad_output: Any) -> None:
            self.norms[name] = grad_output[0].norm().item()

        return hook

    def detach(self, trainer: pl.Trainer, module: BenchModule) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.norms = {}


class FloorVariant(Variant, Callback):
    """One ``_foreach_norm`` over the parameter gradients (+ block-output tensor hooks), one copy."""

    def __init__(self, blocks: bool) -> None:
        self.name = "floor_blocks" if blocks else "floor"
        self.callback = self
        self.blocks = blocks
        self.handles: list[Any] = []
        self.buffer = torch.zeros(0)
        self.values: list[float] = []

    def attach(self, trainer: pl.Trainer, module: BenchModule) -> None:
        if not self.blocks:
            return
        blocks = list(module.net.blocks)  # type: ignore[union-attr,arg-type]
        self.buffer = torch.zeros(len(blocks))
        for index, block in enumerate(blocks):
            self.handles.append(block.register_forward_hook(self._forward_hook(index)))

    def _forward_hook(self, index: int) -> Callable[..., None]:
        def tensor_hook(grad: Tensor) -> None:
            self.buffer[index] = torch.linalg.vector_norm(grad)

        def forward_hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if torch.is_grad_enabled() and output.requires_grad:
                output.register_hook(tensor_hook)

        return forward_hook

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norms = torch.stack(list(foreach_norm(grads, 2.0)))
        self.values = (torch.cat([self.buffer, norms]) if self.blocks else norms).tolist()

    def detach(self, trainer: pl.Trainer, module: BenchModule) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def make_variants() -> list[Variant]:
    variants: list[Variant] = [
        Variant(),
        GradwatchVariant("measured", log_every_n_steps=1, log_param_norms=True),
        GradwatchVariant(
            "measured_no_stats", log_every_n_steps=1, log_param_norms=True, log_grad_stats=False
        ),
        GradwatchVariant("unmeasured", log_every_n_steps=10**9, **_no_rules()),
    ]
    if Rule is not None:
        variants.append(
            GradwatchVariant(
                "governance",
                log_every_n_steps=10**9,
                rules=[Rule("nonfinite", action="halt")],
            )
        )
    variants += [BuiltinVariant(), BackwardHooksVariant(), FloorVariant(False), FloorVariant(True)]
    return variants


def _no_rules() -> dict[str, Any]:
    return {"rules": []} if Rule is not None else {}


# --------------------------------------------------------------------------------------------------
# The switchboard: one Lightning callback that times each step and forwards hooks to its variant
# --------------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    variant: str
    round: int
    wall_ms: float
    cpu_ms: float
    own_ms: float


class Switchboard(Callback):
    """Attaches the scheduled variant at the start of each step and times the step: from this
    hook to the same hook of the next step (so Lightning's logging after the step is included)."""

    def __init__(self, variants: Sequence[Variant], schedule: Sequence[tuple[str, int]]) -> None:
        self.variants = {v.name: v for v in variants}
        self.schedule = list(schedule)
        self.records: list[StepRecord] = []
        self.active: Optional[Variant] = None
        self._current: Optional[tuple[str, int]] = None
        self._index = 0
        self._wall = 0.0
        self._cpu = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # TensorBoard serialises and writes queued events in a background thread: drain it here so
        # the writing is charged to the step that logged, not to whichever variant runs next.
        _drain_tensorboard(trainer)
        wall, cpu = time.perf_counter(), time.process_time()
        if self._current is not None and self._current[1] >= 0:
            self.records.append(
                StepRecord(
                    self._current[0],
                    self._current[1],
                    (wall - self._wall) * 1e3,
                    (cpu - self._cpu) * 1e3,
                    OWN.total * 1e3,
                )
            )
        self._switch(trainer, pl_module)
        OWN.total = 0.0
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        self._forward("on_train_batch_start", trainer, pl_module, batch, batch_idx)

    def _switch(self, trainer: pl.Trainer, module: Any) -> None:
        entry = self.schedule[self._index] if self._index < len(self.schedule) else ("baseline", -1)
        self._index += 1
        if self.active is not None:
            self.active.detach(trainer, module)
        self.active = self.variants[entry[0]]
        self.active.attach(trainer, module)
        self._current = entry
        # Attaching creates thousands of objects (hooks, closures); a cyclic collection they trigger
        # inside the timed step would be charged to whichever variant runs then. Collect here,
        # untimed, before every step of every variant alike (timeit disables the collector instead).
        _drain_tensorboard(trainer)  # what attaching wrote (the callback's custom-scalars layout)
        gc.collect()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.active is not None:
            self.active.detach(trainer, pl_module)
            self.active = None

    def _forward(self, hook: str, *args: Any) -> None:
        callback = self.active.callback if self.active is not None else None
        if callback is None:
            return
        start = time.perf_counter()
        getattr(callback, hook)(*args)
        OWN.total += time.perf_counter() - start

    def on_before_backward(self, *args: Any) -> None:
        self._forward("on_before_backward", *args)

    def on_after_backward(self, *args: Any) -> None:
        self._forward("on_after_backward", *args)

    def on_before_optimizer_step(self, *args: Any) -> None:
        self._forward("on_before_optimizer_step", *args)

    def on_before_zero_grad(self, *args: Any) -> None:
        self._forward("on_before_zero_grad", *args)

    def on_train_batch_end(self, *args: Any) -> None:
        self._forward("on_train_batch_end", *args)


def _drain_tensorboard(trainer: pl.Trainer) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.flush()


def make_schedule(
    names: Sequence[str], rounds: int, warmup: int, seed: int
) -> list[tuple[str, int]]:
    """``warmup`` untimed baseline steps, then ``rounds`` shuffled rounds of one step per variant."""
    rng = random.Random(seed)
    schedule = [("baseline", -1)] * warmup
    for r in range(rounds):
        order = list(names)
        rng.shuffle(order)
        schedule += [(name, r) for name in order]
    return schedule


def trainer_for(root: str, steps: int, callbacks: list[Callback], flush: int = 100) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=[
            TensorBoardLogger(root, name="tb"),
            CSVLogger(root, name="csv", flush_logs_every_n_steps=flush),
        ],
        log_every_n_steps=1,  # the built-in variant logs every step it is active
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], seed: int, n: int = 2000) -> tuple[float, float]:
    """95 % bootstrap confidence interval of the median."""
    if len(values) < 2:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(n))
    return medians[int(0.025 * n)], medians[int(0.975 * n) - 1]


@dataclass
class VariantStats:
    name: str
    steps: int
    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    delta_ms: float
    delta_ci: tuple[float, float]
    delta_min: float
    delta_max: float
    ratio: float
    cpu_delta_ms: float
    own_median_ms: float
    own_mean_ms: float
    derived: bool = False


def summarize(records: Sequence[StepRecord], seed: int) -> dict[str, VariantStats]:
    by_variant: dict[str, dict[int, StepRecord]] = {}
    for record in records:
        by_variant.setdefault(record.variant, {})[record.round] = record
    base = by_variant.get("baseline", {})
    base_median = statistics.median(r.wall_ms for r in base.values()) if base else math.nan
    out: dict[str, VariantStats] = {}
    for name, rounds in by_variant.items():
        walls = [r.wall_ms for r in rounds.values()]
        paired = [(r, base[k]) for k, r in rounds.items() if k in base]
        deltas = [r.wall_ms - b.wall_ms for r, b in paired]
        cpu_deltas = [r.cpu_ms - b.cpu_ms for r, b in paired]
        own = [r.own_ms for r in rounds.values()]
        delta = statistics.median(deltas) if deltas else math.nan
        out[name] = VariantStats(
            name=name,
            steps=len(walls),
            median_ms=statistics.median(walls),
            mean_ms=statistics.fmean(walls),
            min_ms=min(walls),
            max_ms=max(walls),
            delta_ms=delta,
            delta_ci=bootstrap_ci(deltas, seed),
            delta_min=min(deltas) if deltas else math.nan,
            delta_max=max(deltas) if deltas else math.nan,
            ratio=1.0 + delta / base_median if base_median else math.nan,
            cpu_delta_ms=statistics.median(cpu_deltas) if cpu_deltas else math.nan,
            own_median_ms=statistics.median(own),
            own_mean_ms=statistics.fmean(own),
        )
    for cheap in ("unmeasured", "governance"):
        if cheap in out and "measured" in out:
            out[f"every50_{cheap}"] = _derived(out[cheap], out["measured"], 50, base_median)
    return out


def _derived(cheap: VariantStats, measured: VariantStats, n: int, base: float) -> VariantStats:
    def mix(a: float, b: float) -> float:
        return ((n - 1) * a + b) / n

    delta = mix(cheap.delta_ms, measured.delta_ms)
    return VariantStats(
        name=f"every{n}_{cheap.name}",
        steps=0,
        median_ms=mix(cheap.median_ms, measured.median_ms),
        mean_ms=mix(cheap.mean_ms, measured.mean_ms),
        min_ms=math.nan,
        max_ms=math.nan,
        delta_ms=delta,
        delta_ci=(
            mix(cheap.delta_ci[0], measured.delta_ci[0]),
            mix(cheap.delta_ci[1], measured.delta_ci[1]),
        ),
        delta_min=math.nan,
        delta_max=math.nan,
        ratio=1.0 + delta / base,
        cpu_delta_ms=mix(cheap.cpu_delta_ms, measured.cpu_delta_ms),
        own_median_ms=mix(cheap.own_median_ms, measured.own_median_ms),
        own_mean_ms=mix(cheap.own_mean_ms, measured.own_mean_ms),
        derived=True,
    )


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def run_model(spec: ModelSpec, warmup: int, seed: int, root: str) -> dict[str, Any]:
    torch.manual_seed(seed)
    module = spec.build()
    variants = make_variants()
    schedule = make_schedule([v.name for v in variants], spec.rounds, warmup, seed)
    board = Switchboard(variants, schedule)
    n_params = sum(1 for _ in module.parameters())
    n_blocks = len(module.net.blocks)  # type: ignore[union-attr,arg-type]
    started = time.perf_counter()
    with timed_hook_registration():
        trainer_for(os.path.join(root, spec.name), len(schedule) + 1, [board]).fit(module)
    stats = summarize(board.records, seed)
    return {
        "name": spec.name,
        "label": spec.label,
        "rounds": spec.rounds,
        "param_tensors": n_params,
        "parameters": sum(p.numel() for p in module.parameters()),
        "blocks": n_blocks,
        "seconds": time.perf_counter() - started,
        "stats": {name: vars(s) for name, s in stats.items()},
        "records": [vars(r) for r in board.records],
    }


class MemoryProbe(Callback):
    """Samples the Python memory allocated by this package and still held, and the process RSS."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self.samples: dict[str, dict[str, float]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step not in (self.first, self.last):
            return
        _drain_tensorboard(trainer)  # what attaching wrote (the callback's custom-scalars layout)
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, "*lightning_gradwatch*")]
        )
        self.samples["first" if step == self.first else "last"] = {
            "step": step,
            "gradwatch_traced_bytes": sum(stat.size for stat in snapshot.statistics("filename")),
            "rss_bytes": _rss_bytes(),
        }


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return float(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        return math.nan


def run_memory(steps: int, root: str) -> dict[str, Any]:
    """``steps`` measured steps (every figure, every step) on a small model under tracemalloc.

    Sampled right after CSV-logger flushes (it holds the logged dicts until it writes them)."""
    torch.manual_seed(0)
    module = _mlp(64, 8, 32)
    callback = GradientFlowCallback(blocks="net.blocks", log_every_n_steps=1, log_param_norms=True)
    flush = max(1, steps // 20)
    probe = MemoryProbe(2 * flush, steps - steps % flush)
    tracemalloc.start()
    try:
        trainer_for(os.path.join(root, "memory"), steps, [callback, probe], flush).fit(module)
    finally:
        tracemalloc.stop()
    first, last = probe.samples.get("first", {}), probe.samples.get("last", {})
    return {
        "steps": steps,
        "first": first,
        "last": last,
        "gradwatch_traced_growth_bytes": last.get("gradwatch_traced_bytes", math.nan)
        - first.get("gradwatch_traced_bytes", math.nan),
        "rss_growth_bytes": last.get("rss_bytes", math.nan) - first.get("rss_bytes", math.nan),
    }


# --------------------------------------------------------------------------------------------------
# Goals and report
# --------------------------------------------------------------------------------------------------

LABELS = {
    "baseline": "baseline (no instrumentation)",
    "measured": "gradwatch, measured step (every figure, TB + CSV)",
    "measured_no_stats": "gradwatch, measured step, `log_grad_stats=False`",
    "unmeasured": "gradwatch, unmeasured step (`rules=[]`)",
    "governance": "gradwatch, governance only (nonfinite halt, unmeasured step)",
    "every50_unmeasured": "gradwatch every 50 (`rules=[]`, derived)",
    "every50_governance": "gradwatch every 50 (default rules, derived)",
    "builtin": "Lightning `grad_norm` + `self.log_dict`",
    "backward_hooks": "per-Linear full backward hook + `.item()`",
    "floor": "floor: one `_foreach_norm` + one copy",
    "floor_blocks": "floor + block-output tensor-hook norms",
}


MEASURES = (
    ("own time", "own_median_ms"),
    ("paired wall Δ", "delta_ms"),
    ("paired CPU Δ", "cpu_delta_ms"),
)


def goals(model: dict[str, Any]) -> list[dict[str, Any]]:
    """The overhead goals, each by own time and by the paired wall-clock and CPU-time differences
    (a ratio whose denominator is not above zero, i.e. lost in the noise, is left out)."""
    s = model["stats"]
    out: list[dict[str, Any]] = []

    def ratio(goal: str, num: str, den: str, limit: float, at_least: bool = False) -> None:
        if num not in s or den not in s:
            return
        for how, key in MEASURES:
            top, bottom = s[num][key], s[den][key]
            if bottom > 0:
                value = top / bottom
                met = value >= limit if at_least else value <= limit
                out.append(
                    {
                        "model": model["name"],
                        "goal": goal,
                        "value": value,
                        "limit": limit,
                        "met": met,
                        "how": how,
                    }
                )

    for measured in ("measured", "measured_no_stats"):
        ratio(f"{measured} / (floor + block norms)", measured, "floor_blocks", 1.5)
        ratio(f"built-in / {measured} (at least)", "builtin", measured, 5.0, at_least=True)
    ratio("governance / floor", "governance", "floor", 1.2)
    if "unmeasured" in s:
        base = s["baseline"]["median_ms"]
        for how, key in MEASURES:
            value = 100 * s["unmeasured"][key] / base
            out.append(
                {
                    "model": model["name"],
                    "goal": "unmeasured step cost, % of the step",
                    "value": value,
                    "limit": 0.5,
                    "met": value <= 0.5,
                    "how": how,
                }
            )
    return out


def _f(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# lightning-gradwatch overhead",
        "",
        f"{m['date']} · {m['cpu']} ({m['cores']} cores, {m['threads']} torch threads) · "
        f"torch {m['torch']} · lightning {m['lightning']} · Python {m['python']}"
        + (" · **quick mode (tiny models, not a measurement)**" if result["quick"] else ""),
        f"Load average at start: {m['loadavg_start']}; at end: {m['loadavg_end']}.",
        "",
        "Step = wall time from one `on_train_batch_start` to the next (forward, backward, optimizer,"
        " logging). Δ = median over rounds of (variant step - baseline step of the same round), with"
        " a bootstrap 95 % CI and the min-max of the paired differences; ratio = 1 + Δ / median"
        " baseline step. Own = wall time inside the variant's own hooks per step (median).",
        "",
    ]
    for model in result["models"]:
        s = model["stats"]
        base = s["baseline"]["median_ms"]
        lines += [
            f"## {model['label']}",
            "",
            f"{model['param_tensors']} parameter tensors, {model['parameters']:,} parameters, "
            f"{model['blocks']} blocks; {model['rounds']} rounds; baseline step median "
            f"{_f(base)} ms (min-max {_f(s['baseline']['min_ms'])}-{_f(s['baseline']['max_ms'])}).",
            "",
            "| variant | step median (min-max) ms | Δ ms [95 % CI] | Δ min-max ms | ratio | Δ CPU ms | own ms |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in LABELS:
            if name not in s:
                continue
            v = s[name]
            span = "" if v["derived"] else f" ({_f(v['min_ms'])}-{_f(v['max_ms'])})"
            lines.append(
                f"| {LABELS[name]} | {_f(v['median_ms'])}{span} | {_f(v['delta_ms'])} "
                f"[{_f(v['delta_ci'][0])}, {_f(v['delta_ci'][1])}] | "
                + ("" if v["derived"] else f"{_f(v['delta_min'])} - {_f(v['delta_max'])}")
                + f" | x{_f(v['ratio'], 3)} | {_f(v['cpu_delta_ms'])} | {_f(v['own_median_ms'], 3)} |"
            )
        lines.append("")
    lines += [
        "## Scale: own time per watched tensor",
        "",
        "Own time per step divided by (blocks + parameter tensors): the cost per tensor the"
        " callback reads, which should not grow with the model.",
        "",
        "| model | blocks | param tensors | measured us/tensor | measured, no stats us/tensor |"
        " unmeasured us/block | floor + blocks us/tensor |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in result["models"]:
        s, n = model["stats"], model["blocks"] + model["param_tensors"]

        def per(name: str, count: int, s: dict[str, Any] = s) -> str:
            return _f(1e3 * s[name]["own_median_ms"] / count, 1) if name in s else "n/a"

        lines.append(
            f"| {model['name']} | {model['blocks']} | {model['param_tensors']} | "
            f"{per('measured', n)} | {per('measured_no_stats', n)} | "
            f"{per('unmeasured', model['blocks'])} | {per('floor_blocks', n)} |"
        )
    lines += [
        "",
        "## Goals",
        "",
        "| model | goal | value | limit | met | measured by |",
        "|---|---|---|---|---|---|",
    ]
    for goal in result["goals"]:
        lines.append(
            f"| {goal['model']} | {goal['goal']} | {_f(goal['value'], 3)} | {goal['limit']} | "
            f"{'yes' if goal['met'] else '**no**'} | {goal['how']} |"
        )
    mem = result.get("memory")
    if mem:
        lines += [
            "",
            "## Memory",
            "",
            f"{mem['steps']} measured steps (every figure, every step, TB + CSV), small MLP: "
            f"Python memory allocated in `lightning_gradwatch` and still held grew by "
            f"{_f(mem['gradwatch_traced_growth_bytes'], 0)} bytes between step "
            f"{mem['first'].get('step')} and step {mem['last'].get('step')} (tracemalloc); RSS grew by "
            f"{_f(mem['rss_growth_bytes'] / 2**20)} MiB (RSS includes Lightning, the loggers and the"
            " allocator).",
        ]
    return "\n".join(lines) + "\n"


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "loadavg_start": _loadavg(),
    }


def _loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.ERROR)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per model (override)")
    parser.add_argument(
        "--models", nargs="+", default=None, help="subset of: mlp gpt stress params"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed baseline steps first")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared machine, threads that other processes "
        "preempt make every parallel op erratic; 0 keeps torch's default)",
    )
    parser.add_argument(
        "--memory-steps", type=int, default=None, help="steps of the memory check (0: skip)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
        help="folder for overhead.md / overhead.json",
    )
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    _quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    memory_steps = (
        args.memory_steps if args.memory_steps is not None else (30 if args.quick else 2000)
    )
    specs = model_specs(args.quick, args.rounds)
    if args.models:
        specs = [s for s in specs if s.name in args.models]
    result: dict[str, Any] = {
        "machine": machine_info(torch.get_num_threads()),
        "quick": args.quick,
        "warmup": warmup,
        "models": [],
        "goals": [],
    }
    with tempfile.TemporaryDirectory() as root:
        for spec in specs:
            print(
                f"[{spec.name}] {spec.label}: {spec.rounds} rounds ...", file=sys.stderr, flush=True
            )
            model = run_model(spec, warmup, args.seed, root)
            result["models"].append(model)
            result["goals"] += goals(model)
            print(f"[{spec.name}] done in {model['seconds']:.0f} s", file=sys.stderr, flush=True)
        if memory_steps > 0:
            print(f"[memory] {memory_steps} steps ...", file=sys.stderr, flush=True)
            result["memory"] = run_memory(memory_steps, root)
    result["machine"]["loadavg_end"] = _loadavg()
    os.makedirs(args.out, exist_ok=True)
    text = markdown(result)
    with open(os.path.join(args.out, "overhead.md"), "w", encoding="utf-8") as handle:
        handle.write(text)
    with open(os.path.join(args.out, "overhead.json"), "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1, default=str)
    print(text)
    return result


if __name__ == "__main__":
    main()
