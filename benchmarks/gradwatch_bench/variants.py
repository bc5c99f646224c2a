"""Variants: the ways of watching gradients that are compared, each attached for one step and
detached afterwards (outside the timed window).

* ``baseline``: no instrumentation.
* ``measured``: ``GradientFlowCallback(log_every_n_steps=1, log_param_norms=True)`` (every figure,
  default rules), TensorBoard + CSV loggers.
* ``measured_no_stats``: the same with ``log_grad_stats=False`` (where the grad-stats pass costs).
* ``unmeasured``: a step the callback does not measure (``rules=[]``): hooks attached, returning at
  once.
* ``governance``: ``rules=[Rule("nonfinite", action="halt")]`` on a step that is not measured: the
  every-step check (one ``_foreach_norm`` pass, one host copy). This is also what an unmeasured step
  costs with the default rules.
* ``builtin``: Lightning's ``grad_norm(self, 2)`` + ``self.log_dict`` in ``on_before_optimizer_step``.
* ``backward_hooks``: ``register_full_backward_hook`` on every ``nn.Linear`` + ``.item()`` per
  module.
* ``floor``: one ``torch._foreach_norm`` over the parameter gradients + one host copy.
* ``floor_blocks``: the floor + the norm of each block output's gradient via tensor hooks.

"Every 50" is derived (see :mod:`~gradwatch_bench.stats`): ``(49 x unmeasured + measured) / 50``
(and with the default rules ``(49 x governance + measured) / 50``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from gradwatch_bench.models import BenchModule
from lightning_gradwatch import GradientFlowCallback, Rule
from lightning_gradwatch._compat import foreach_norm


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
        # As Lightning does after on_fit_start: the measuring grid starts at this step (else the
        # first step after attaching counts as the first of a fit, and is measured).
        self.callback.on_train_start(trainer, module)

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
    return [
        Variant(),
        GradwatchVariant("measured", log_every_n_steps=1, log_param_norms=True),
        GradwatchVariant(
            "measured_no_stats", log_every_n_steps=1, log_param_norms=True, log_grad_stats=False
        ),
        GradwatchVariant("unmeasured", log_every_n_steps=10**9, rules=[]),
        GradwatchVariant(
            "governance", log_every_n_steps=10**9, rules=[Rule("nonfinite", action="halt")]
        ),
        BuiltinVariant(),
        BackwardHooksVariant(),
        FloorVariant(False),
        FloorVariant(True),
    ]
