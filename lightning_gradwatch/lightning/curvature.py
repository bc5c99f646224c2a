"""Curvature inside a run (``log_curvature=True``): on every ``curvature_every_n_steps``-th optimizer
step, the step's batch is re-run through ``training_step`` at the weights before the optimizer step,
and Hessian-vector products of that loss (double backward) give the top Hessian eigenvalue, the
Hessian trace and the sharpness ratio (:mod:`lightning_gradwatch.numerics.curvature` does the math).

Do no harm: the batch is held only on curvature steps; the re-run starts from the RNG states of the
batch start (CPU and CUDA, so dropout draws the same masks) and every RNG state, buffer (BatchNorm's
running statistics) and the probe's arming are put back afterwards; ``self.log``/``self.log_dict``
are no-ops during the re-run (else ``on_epoch`` means would count the batch twice); gradients come
from ``torch.autograd.grad`` (``.grad`` is never touched) and the graph is freed before the optimizer
step. Under DDP the module is called unwrapped (DDP's reducer never sees it) and each Hessian-vector
product is averaged over the ranks (one ``all_reduce`` per product): the figures are those of the
global batch's mean loss. Not measured (one warning): manual optimization, sharded layouts (FSDP,
FSDP2/HSDP, tensor parallel, DeepSpeed), other multi-process strategies, and models whose graph cannot
be differentiated twice (the error is named).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Mapping
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_gradwatch.keys import (
    HESSIAN_MAX_EIG_KEY,
    HESSIAN_TRACE_KEY,
    HESSIAN_TRACE_SE_KEY,
    PRECONDITIONED_MAX_EIG_KEY,
    SHARPNESS_RATIO_KEY,
    SHARPNESS_THRESHOLD_KEY,
    for_optimizer,
)
from lightning_gradwatch.numerics.curvature import (
    Operator,
    hutchinson_trace,
    random_unit,
    stability_constant,
    top_eigenpair,
)
from lightning_gradwatch.validation import check_positive_int, check_type

__all__ = ["CurvatureMonitor"]

#: Seed of the private generator of the random start and probes (plus the step): the same on every
#: rank, so the ranks apply the operator to the same vectors.
_SEED = 0x5EED


def _rng_state() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, random.getstate()


def _set_rng_state(state: tuple[Any, ...]) -> None:
    cpu, cuda, python = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)


def _twice_differentiable() -> Any:
    """Scaled-dot-product attention by its math kernel: the fused (flash, memory-efficient) kernels
    have no double backward; the math one computes the same function and has."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch without torch.nn.attention
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _no_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log``/``log_dict`` during the re-run."""


def _loss_of(output: Any) -> Optional[Tensor]:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return output["loss"]
    return None


def _hvp_operator(loss: Tensor, params: list[Tensor], world: int) -> Operator:
    """``v -> H v`` for the Hessian of ``loss`` in ``params`` (one double backward each), averaged
    over ``world`` ranks (one ``all_reduce``) under DDP."""
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def op(v: list[Tensor]) -> list[Tensor]:
        hv: list[Optional[Tensor]] = [None] * len(params)
        if live:
            out = torch.autograd.grad(
                [grads[i] for i in live],  # type: ignore[misc]
                params,
                grad_outputs=[v[i] for i in live],
                retain_graph=True,
                allow_unused=True,
            )
            hv = list(out)
        full = [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, hv)]
        if world > 1:  # the global batch's mean loss: the mean of the ranks' Hessians
            flat = torch.cat([h.reshape(-1) for h in full])
            dist.all_reduce(flat)
            flat /= world
            full = [c.view_as(p) for c, p in zip(flat.split([p.numel() for p in params]), params)]
        return full

    return op


def _scaled(op: Operator, scale: list[Tensor]) -> Operator:
    """``v -> S H S v``: the symmetric form of ``S^2 H`` (same eigenvalues)."""
    return lambda v: [s * h for s, h in zip(scale, op([s * x for s, x in zip(scale, v)]))]


def _preconditioner(
    optimizer: Optimizer, params: list[Tensor]
) -> Optional[tuple[str, float, list[Tensor], Optional[float]]]:
    """``(kind, c, S, lr)`` for a known optimizer: the stability constant, the diagonal ``S`` (its
    entries ``sqrt(1/p)`` with ``p = sqrt(v_hat) + eps`` for Adam, 1 for SGD; ``sqrt(lr_i / p)``
    when the groups' learning rates differ) and the common learning rate (``None``: they differ).
    ``None``: unknown optimizer, or Adam before its first step (no ``v`` yet)."""
    if isinstance(optimizer, torch.optim.SGD):
        kind = "sgd"
    elif isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        kind = "adam"
    else:
        return None
    groups = [g for g in optimizer.param_groups if any(p.requires_grad for p in g["params"])]
    lrs = {float(g["lr"]) for g in groups}
    common = lrs.pop() if len(lrs) == 1 else None
    g0 = groups[0]
    if kind == "sgd":
        c = stability_constant(kind, g0["momentum"], g0["dampening"], g0["nesterov"])
    else:
        c = stability_constant(kind, g0["betas"][0])
    group_of = {p: g for g in groups for p in g["params"]}
    scale = []
    for p in params:
        group = group_of[p]
        lr = 1.0 if common is not None else float(group["lr"])
        if kind == "sgd":
            scale.append(torch.full_like(p, lr**0.5))
            continue
        state = optimizer.state.get(p, {})
        if "exp_avg_sq" not in state:
            return None
        step = float(state["step"])
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        v_hat = v / (1.0 - group["betas"][1] ** step)
        scale.append((lr / (v_hat.sqrt() + group["eps"])).sqrt().to(p.dtype))
    return (kind, c, scale, common) if c is not None else None


class CurvatureMonitor:
    """Validates the curvature arguments and measures curvature on its own cadence.

    Args:
        enabled: ``log_curvature``.
        every: ``curvature_every_n_steps``.
        iterations: ``curvature_iterations``, the most power iterations per eigenvalue.
        probes: ``curvature_probes``, Rademacher vectors for Hutchinson's trace.
    """

    def __init__(self, enabled: bool, every: int, iterations: int, probes: int) -> None:
        self.enabled = check_type(enabled, bool, "log_curvature")
        self.every = check_positive_int(every, "curvature_every_n_steps")
        self.iterations = check_positive_int(iterations, "curvature_iterations")
        self.probes = check_positive_int(probes, "curvature_probes")
        self._batch: Optional[tuple[Any, int, tuple[Any, ...]]] = None
        self._vectors: dict[tuple[Optional[str], str], list[Tensor]] = {}
        self._said: set[str] = set()
        #: Per eigenvalue: the shift of the last negative-dominated iteration (see top_eigenpair).
        self._shifts: dict[tuple[Optional[str], str], float] = {}
        self._off: Optional[str] = None
        self._trainer: Optional[pl.Trainer] = None
        #: Power iterations used at the latest curvature step, by eigenvalue (for benchmarks).
        self.last_iterations: dict[str, int] = {}

    def _say_once(self, message: str, warn: bool = True) -> None:
        if message not in self._said:
            self._said.add(message)
            (rank_zero_warn if warn else rank_zero_info)(message)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Once per fit: whether this run can be measured, and why not."""
        self._trainer, self._vectors, self._shifts, self._off = trainer, {}, {}, None
        strategy = trainer.strategy
        name = type(strategy).__name__
        sharded = any(type(p).__name__ == "DTensor" for p in pl_module.parameters())
        if not pl_module.automatic_optimization:
            self._off = "manual optimization (training_step steps the optimizers itself)"
        elif sharded or name in ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"):
            self._off = f"the sharded layout of {name} (FSDP/FSDP2/HSDP/TP/DeepSpeed)"
        elif (
            not isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)) and trainer.world_size > 1
        ):
            self._off = f"the strategy {name}"
        if self._off is not None:
            self._say_once(f"GradientFlowCallback: curvature is not measured under {self._off}.")

    def on_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Hold the batch and the RNG states on curvature steps only (the last micro-batch's under
        accumulation); drop it on every other step."""
        if not self.enabled:
            return
        if self._trainer is not trainer:
            self._start(trainer, pl_module)
        due = trainer.global_step % self.every == 0 and self._off is None
        self._batch = (batch, batch_idx, _rng_state()) if due else None

    def step(
        self,
        trainer: pl.Trainer,
        optimizer: Optimizer,
        name: Optional[str],
        probe: Any,
        measurement: Any,
    ) -> dict[str, float]:
        """The curvature figures of this optimizer step (``{}`` on other steps), keyed for optimizer
        ``name`` (``None``: one optimizer), also added to the ``measurement``'s metrics when this
        step is measured, so that rules read them. ``probe``: disarmed during the re-run."""
        held, self._batch = self._batch, None
        if held is None or self._off is not None:
            return {}
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        if not params:
            return {}
        try:
            figures = self._measure(
                trainer, trainer.lightning_module, optimizer, name, params, held, probe
            )
        except RuntimeError as error:  # no double backward through this graph
            self._off = "this model, which cannot be differentiated twice"
            self._say_once(f"GradientFlowCallback: curvature is not measured: {error}")
            return {}
        figures = {for_optimizer(key, name): value for key, value in figures.items()}
        if measurement is not None:
            measurement.metrics.update(figures)
        return figures

    def _measure(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        optimizer: Optimizer,
        k: Optional[str],
        params: list[Tensor],
        held: tuple[Any, int, tuple[Any, ...]],
        probe: Any,
    ) -> dict[str, float]:
        batch, batch_idx, rng = held
        buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]
        after = _rng_state()
        armed = probe is not None and probe.armed
        if armed:
            probe.disarm()  # the re-run's forward must not feed the block measurements
        pl_module.log, pl_module.log_dict = _no_log, _no_log  # type: ignore[method-assign]
        try:
            _set_rng_state(rng)
            precision = trainer.strategy.precision_plugin.train_step_context()
            with torch.enable_grad(), precision, _twice_differentiable():
                loss = _loss_of(pl_module.training_step(batch, batch_idx))
                if loss is None:
                    return {}
                op = _hvp_operator(loss, params, trainer.world_size)
                return self._figures(op, optimizer, k, params, trainer.global_step)
        finally:
            del pl_module.log, pl_module.log_dict
            _set_rng_state(after)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
            if armed:
                probe.arm()

    def _figures(
        self, op: Operator, optimizer: Optimizer, k: Optional[str], params: list[Tensor], step: int
    ) -> dict[str, float]:
        device = params[0].device
        generator = torch.Generator(device=device).manual_seed(_SEED + step)
        eig = self._eigenvalue(op, (k, "raw"), params, generator)
        trace, stderr = hutchinson_trace(op, params, self.probes, generator)
        figures = {HESSIAN_MAX_EIG_KEY: eig, HESSIAN_TRACE_KEY: trace}
        if self.probes > 1:
            figures[HESSIAN_TRACE_SE_KEY] = stderr
        known = _preconditioner(optimizer, params)
        if known is None:
            self._say_once(
                f"GradientFlowCallback: no stability threshold is known for "
                f"{type(optimizer).__name__} (or its state is empty): curvature logs the raw "
                "Hessian eigenvalue only.",
                warn=False,
            )
            return figures
        kind, c, scale, lr = known
        if kind == "sgd":  # S = I (one learning rate) or sqrt(lr_i): reuse the raw eigenvalue
            sharp = (
                eig
                if lr is not None
                else self._eigenvalue(_scaled(op, scale), (k, "p"), params, generator)
            )
        else:
            sharp = self._eigenvalue(_scaled(op, scale), (k, "p"), params, generator)
            if lr is not None:
                figures[PRECONDITIONED_MAX_EIG_KEY] = sharp
        if lr is None:  # S carries each group's learning rate: compare with c itself
            figures[SHARPNESS_RATIO_KEY] = sharp / c
        else:
            figures[SHARPNESS_THRESHOLD_KEY] = c / lr
            figures[SHARPNESS_RATIO_KEY] = sharp * lr / c
        return figures

    def _eigenvalue(
        self,
        op: Operator,
        slot: tuple[Optional[str], str],
        params: list[Tensor],
        generator: torch.Generator,
    ) -> float:
        """The top eigenvalue, warm-started from this slot's previous eigenvector."""
        start = self._vectors.get(slot)
        if start is None or any(a.shape != p.shape for a, p in zip(start, params)):
            start = random_unit(params, generator)
        eig, vector, used, shift = top_eigenpair(op, start, self.iterations, self._shifts.get(slot))
        self._vectors[slot] = [v.detach() for v in vector]
        if shift is None:
            self._shifts.pop(slot, None)
        else:
            self._shifts[slot] = shift
        self.last_iterations[slot[1]] = used
        return eig
