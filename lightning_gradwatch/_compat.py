"""Every private Lightning / torch internal that lightning-gradwatch relies on, in one place.

Each entry says what it is for and why no public API serves. ``tests/test_compat.py`` checks every
one of them (existence and the behaviour relied on) against the installed versions, so an upgrade
that moves or changes one fails there, naming it, instead of deep inside a training run.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------------
# Versions: features that need a newer torch than the floor in pyproject.toml
# --------------------------------------------------------------------------------------------------

#: The oldest torch on which the callback's block hooks were verified to compile without graph
#: breaks. torch 2.3.1, 2.4.1, 2.6.0 and 2.9.0 break the graph at each hooked block output
#: ("Compilation of intermediate hooks requires compiled autograd"); the figures are still right.
TORCH_FOR_COMPILE_WITHOUT_GRAPH_BREAKS = "2.13"


def torch_older_than(version: str) -> bool:
    """Whether the installed torch is older than ``version`` (a local suffix such as ``+cpu`` is
    ignored: ``torch.__version__`` compares as a version, not as a string)."""
    return bool(torch.__version__ < version)


def torch_feature_gaps(module: Optional[nn.Module]) -> list[str]:
    """One sentence for each feature ``module`` uses that needs a newer torch than the installed one
    (emitted as warnings at fit start)."""
    gaps = []
    needed = TORCH_FOR_COMPILE_WITHOUT_GRAPH_BREAKS
    if module is not None and torch_older_than(needed) and is_compiled(module):
        gaps.append(
            f"torch.compile with torch {torch.__version__}: the callback's block hooks break the "
            "compiled graph at every block output (the figures are right, the model runs as "
            f"several graphs). Hooks that compile without graph breaks need torch >= {needed}."
        )
    return gaps


# --------------------------------------------------------------------------------------------------
# torch.distributed: DTensor (version shim)
# --------------------------------------------------------------------------------------------------


def _dtensor_api() -> Optional[ModuleType]:
    """The module that holds ``DTensor`` and its placements, ``None`` where torch was built without
    distributed support.

    Why a shim: ``DTensor`` is public as ``torch.distributed.tensor`` from torch 2.5; the floor,
    torch 2.3.1, has it only in the private ``torch.distributed._tensor``, and there
    ``torch.distributed.tensor`` is a package (``.parallel``) without ``DTensor``. The public module is
    tried first: newer torch keeps ``_tensor`` only as an alias of it.
    """
    if not torch.distributed.is_available():
        return None
    import torch.distributed.tensor as public

    if hasattr(public, "DTensor"):
        return public
    import torch.distributed._tensor as private  # torch < 2.5

    return private


_DTENSOR_API = _dtensor_api()

#: ``(DTensor,)``, or ``()`` without distributed support: ``isinstance(x, DTENSOR_TYPES)`` is the
#: test (a class check, which ``torch.compile`` traces without a graph break).
DTENSOR_TYPES: tuple[type, ...] = () if _DTENSOR_API is None else (_DTENSOR_API.DTensor,)


def replicate_placement() -> Any:
    """A ``Replicate()`` DTensor placement (from :func:`_dtensor_api`'s module: see there why).

    Only called on DTensor gradients, so distributed support is there.
    """
    assert _DTENSOR_API is not None, "a DTensor placement without torch.distributed"
    return _DTENSOR_API.Replicate()


# --------------------------------------------------------------------------------------------------
# torch
# --------------------------------------------------------------------------------------------------


def foreach_norm(
    tensors: Sequence[Tensor], ord: float, dtype: Optional[torch.dtype] = None
) -> Sequence[Tensor]:
    """``torch._foreach_norm``: the norm of each tensor in one batched kernel per (device, dtype).

    Why private: ``torch.linalg.vector_norm`` launches one kernel per tensor (hundreds per step for a
    large model); ``clip_grad_norm_`` uses this same batched kernel internally but only returns the
    total, not the per-tensor norms we log.

    ``dtype`` accumulates in that dtype (fp16/bf16 gradients overflow their own dtype when squared
    and summed). Where ``_foreach_norm`` takes no ``dtype=`` (torch < 2.4), the tensors are cast to
    ``dtype`` first: the same result for one temporary copy.
    """
    if dtype is None:
        return torch._foreach_norm(list(tensors), ord)  # type: ignore[arg-type]
    if _foreach_norm_takes_dtype():
        return torch._foreach_norm(list(tensors), ord, dtype=dtype)  # type: ignore[arg-type]
    return torch._foreach_norm([t.to(dtype) for t in tensors], ord)  # type: ignore[arg-type]


@functools.cache
def _foreach_norm_takes_dtype() -> bool:
    """Whether this torch's ``_foreach_norm`` accepts ``dtype=`` (asked once, on a 1-element CPU
    tensor: a ``TypeError`` from real gradients could have other causes, e.g. DTensors)."""
    try:
        torch._foreach_norm([torch.ones(1)], 2.0, dtype=torch.float32)  # type: ignore[call-arg]
    except TypeError:
        return False
    return True


def foreach_mul_(tensors: Sequence[Tensor], scalar: float) -> None:
    """``torch._foreach_mul_``: multiply every tensor in place by ``scalar`` in one batched kernel.

    Why private: no public batched in-place multiply exists; ``clip_grad_norm_`` applies its clip
    coefficient with this same call, and we clip with a coefficient computed from a total norm that is
    already on the host (``clip_grad_norm_`` would compute the norm again).
    """
    torch._foreach_mul_(list(tensors), scalar)


def flatten_dense_tensors(tensors: Sequence[Tensor]) -> Tensor:
    """``torch._utils._flatten_dense_tensors``: one new 1-D tensor holding every element.

    Why private: ``torch.cat([t.reshape(-1) for t in tensors])`` is the public equivalent but builds
    one Python-level view per tensor (1,000 tensors: 2.5 ms against 0.6 ms for this single C++
    call). With one tensor it returns a view of it, not a copy.
    """
    from torch._utils import _flatten_dense_tensors

    return _flatten_dense_tensors(list(tensors))


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` went through ``torch.compile``: a compiled submodule (an
    ``OptimizedModule``, seen by its :data:`COMPILED_MODULE_ATTR` attribute), or a compiled
    LightningModule passed to ``Trainer.fit``, which Lightning unwraps and marks with
    ``_compiler_ctx``.

    Why private: torch offers no public test for a compiled module, and Lightning keeps the mark of
    an unwrapped compiled module in ``_compiler_ctx`` only. A function compiled inside the module
    (``torch.compile(self.method)``) is not seen.
    """
    if getattr(module, "_compiler_ctx", None) is not None:
        return True
    return any(
        isinstance(getattr(m, COMPILED_MODULE_ATTR, None), nn.Module) for m in module.modules()
    )


#: The attribute under which ``torch.compile(module)`` (an ``OptimizedModule``) keeps the original
#: module, and so a component of every parameter name seen through the wrapper. Why private: torch
#: offers no public way to ask for the wrapped module's names; we strip it to keep eager-mode keys.
COMPILED_MODULE_ATTR = "_orig_mod"


def optimizer_unscales_in_step(optimizer: Any) -> bool:
    """Whether ``optimizer`` unscales gradients inside its own ``step()`` under a ``GradScaler``
    (``torch.optim`` fused optimizers set ``_step_supports_amp_scaling``).

    Why private: this attribute is the very flag ``GradScaler.step`` reads to decide whether to
    unscale before the step; there is no public equivalent.
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def grad_scaler_scale(scaler: Any) -> Optional[Tensor]:
    """The ``GradScaler``'s current scale as a device tensor (``scaler._scale``), ``None`` before its
    first ``scale()``.

    Why private: the public ``GradScaler.get_scale()`` returns a Python float, i.e. a device-to-host
    sync on every step; we divide block norms by the scale on the device and copy once.
    """
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else None


# --------------------------------------------------------------------------------------------------
# Lightning
# --------------------------------------------------------------------------------------------------


def tensorboard_prefixed(logger: Any, metrics: Mapping[str, float]) -> Mapping[str, Any]:
    """``metrics`` with a ``TensorBoardLogger``'s ``prefix`` applied exactly as its ``log_metrics``
    does (``lightning.fabric.utilities.logger._add_prefix`` with ``logger._prefix``).

    Why private: we write every scalar as one TensorBoard event instead of calling ``log_metrics``
    (one event per key); the keys must stay those ``log_metrics`` would write, and Lightning exposes
    neither the prefix nor its helper publicly.
    """
    from lightning.fabric.utilities.logger import _add_prefix

    return _add_prefix(dict(metrics), logger._prefix, logger.LOGGER_JOIN_CHAR)


def summary_file_writer(writer: Any) -> Any:
    """The ``FileWriter`` behind a ``torch.utils.tensorboard.SummaryWriter``
    (``writer._get_file_writer()``), which accepts a whole ``Summary`` protobuf.

    Why private: the public ``add_scalar`` writes one event per key (about 0.1 ms each);
    ``_get_file_writer()`` is also what reopens the file after ``close()``, which the public
    ``file_writer`` attribute does not.
    """
    return writer._get_file_writer()


def user_ddp_comm_hook(strategy: Any) -> Optional[Callable[..., Any]]:
    """The communication hook a user passed as ``DDPStrategy(ddp_comm_hook=...)``
    (``strategy._ddp_comm_hook``), ``None`` for none or another strategy.

    Why private: Lightning keeps it only there until strategy setup registers it on the DDP model
    (on CUDA); the noise-scale monitor replaces it before then with a hook that runs it and measures
    too (:func:`set_user_ddp_comm_hook`), and Lightning has no public way to do either.
    """
    return getattr(strategy, "_ddp_comm_hook", None)


def set_user_ddp_comm_hook(strategy: Any, hook: Callable[..., Any]) -> None:
    """Make ``hook`` the one ``strategy`` registers at setup (see :func:`user_ddp_comm_hook`)."""
    strategy._ddp_comm_hook = hook


def loss_scale(trainer: Any) -> Optional[Tensor]:
    """The AMP GradScaler's current scale as a device tensor (no sync), if a scaler is active.

    Tensor hooks see gradients multiplied by it; parameter gradients are already unscaled when
    ``on_before_optimizer_step`` runs (the scale used for this step's backward is still current:
    ``scaler.update()`` runs after the optimizer step).
    """
    if not scaler_enabled(trainer):
        return None
    return grad_scaler_scale(trainer.precision_plugin.scaler)  # type: ignore[attr-defined]


def scaler_enabled(trainer: Any) -> bool:
    """Whether an enabled AMP GradScaler scales the loss (and handles non-finite steps) in this run."""
    scaler: Any = getattr(trainer.precision_plugin, "scaler", None)
    return scaler is not None and bool(getattr(scaler, "is_enabled", lambda: False)())
