"""Own-time instrumentation: the wall time a variant spends inside its own hooks per step."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor, nn


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
    """While active, every forward hook, tensor hook, full backward hook and optimizer step
    post-hook registered is timed.

    Lightning registers none of these in a plain CPU fit, so what is timed is the variants' own hooks.
    """

    def __enter__(self) -> timed_hook_registration:
        self._forward = nn.Module.register_forward_hook
        self._backward = nn.Module.register_full_backward_hook
        self._tensor = torch.Tensor.register_hook
        self._post = torch.optim.Optimizer.register_step_post_hook
        forward, backward, tensor, post = self._forward, self._backward, self._tensor, self._post

        def register_forward_hook(module: nn.Module, hook: Any, *args: Any, **kwargs: Any) -> Any:
            return forward(module, OWN.wrap(hook), *args, **kwargs)

        def register_full_backward_hook(module: nn.Module, hook: Any, *args: Any, **kw: Any) -> Any:
            return backward(module, OWN.wrap(hook), *args, **kw)

        def register_hook(self_: Tensor, hook: Any) -> Any:
            return tensor(self_, OWN.wrap(hook))

        def register_step_post_hook(optimizer: torch.optim.Optimizer, hook: Any) -> Any:
            return post(optimizer, OWN.wrap(hook))

        nn.Module.register_forward_hook = register_forward_hook  # type: ignore[method-assign]
        nn.Module.register_full_backward_hook = register_full_backward_hook  # type: ignore[method-assign]
        torch.Tensor.register_hook = register_hook  # type: ignore[method-assign]
        torch.optim.Optimizer.register_step_post_hook = register_step_post_hook  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        nn.Module.register_forward_hook = self._forward  # type: ignore[method-assign]
        nn.Module.register_full_backward_hook = self._backward  # type: ignore[method-assign]
        torch.Tensor.register_hook = self._tensor  # type: ignore[method-assign]
        torch.optim.Optimizer.register_step_post_hook = self._post  # type: ignore[method-assign]
