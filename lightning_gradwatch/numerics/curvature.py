"""Curvature of a loss from Hessian-vector products (pure tensor math, no Lightning).

* :func:`top_eigenpair`: the largest (algebraic) eigenvalue of a symmetric operator by power
  iteration, warm-started from a previous eigenvector; when the dominant eigenvalue is negative a
  second, shifted iteration finds the top one.
* :func:`hutchinson_trace`: the trace by Hutchinson's estimator over Rademacher probes, with its
  standard error.
* :func:`stability_constant`: the edge-of-stability constant ``c`` of an optimizer on a quadratic, so
  that the step is stable while ``lambda_max(S H S) < c``, ``S = diag(sqrt(lr / p))`` with ``p`` the
  optimizer's preconditioner (1 for SGD, ``sqrt(v_hat) + eps`` for Adam).

A vector is a list of tensors shaped like the parameters; an operator maps such a list to another.
Random vectors come from a private ``torch.Generator``: the training run's RNG streams are not used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = [
    "Operator",
    "hutchinson_trace",
    "rademacher",
    "random_unit",
    "stability_constant",
    "top_eigenpair",
]

Operator = Callable[[list[Tensor]], list[Tensor]]

#: Power iteration stops once the Rayleigh quotient moves by less than this (relative) between two
#: iterations: well inside the 1 % the figures are promised to.
RELATIVE_TOLERANCE = 1e-4


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum(
        (torch.sum(x.double() * y.double()) for x, y in zip(a, b)),
        torch.zeros((), dtype=torch.float64, device=a[0].device),
    )


def _norm(a: Sequence[Tensor]) -> Tensor:
    return _dot(a, a).sqrt()


def _scale(a: Sequence[Tensor], s: Tensor) -> list[Tensor]:
    return [x * s.to(x.dtype) for x in a]


def random_unit(like: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """A random unit vector shaped like ``like`` (normal entries from ``generator``, on its device)."""
    v = [torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device) for t in like]
    return _scale(v, 1.0 / _norm(v).clamp_min(1e-300))


def rademacher(like: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """A vector of independent +-1 entries shaped like ``like``."""
    out = []
    for t in like:
        bits = torch.randint(0, 2, t.shape, generator=generator, device=t.device)
        out.append(bits.to(t.dtype) * 2 - 1)
    return out


def _power(op: Operator, v: list[Tensor], iterations: int) -> tuple[float, list[Tensor], int]:
    """Power iteration from unit ``v``: (Rayleigh quotient of the dominant eigenvalue, its vector,
    iterations used). One host copy per iteration (the stopping test)."""
    eig, previous, used = 0.0, math.nan, 0
    for used in range(1, iterations + 1):
        w = op(v)
        eig = float(_dot(v, w))
        size = _norm(w)
        if float(size) == 0.0:  # a zero operator (or v in its kernel): the eigenvalue is 0
            return 0.0, v, used
        v = _scale(w, 1.0 / size)
        if abs(eig - previous) <= RELATIVE_TOLERANCE * abs(eig):
            break
        previous = eig
    return eig, v, used


def top_eigenpair(
    op: Operator, start: list[Tensor], iterations: int, shift: Optional[float] = None
) -> tuple[float, list[Tensor], int, Optional[float]]:
    """The largest eigenvalue of the symmetric operator ``op``, its unit eigenvector, the number
    of operator applications and the shift used (``None``: none), by at most ``iterations`` power
    iterations from ``start`` (a unit vector: the previous eigenvector, or :func:`random_unit`).

    Power iteration finds the eigenvalue largest in magnitude; when that one is negative, the
    operator shifted by it (``op - eig I``, positive semi-definite) is iterated again, whose dominant
    eigenvalue is ``lambda_max - eig``. ``shift``: a previous call's, to iterate on the shifted
    operator at once (twice that shift, a margin for the lowest eigenvalue having moved down)."""
    used = 0
    if shift is None:
        eig, v, used = _power(op, start, iterations)
        if eig >= 0:
            return eig, v, used, None
        shift = eig
    else:
        shift = 2.0 * shift
    sigma = shift

    def shifted(u: list[Tensor]) -> list[Tensor]:
        return [a - sigma * b for a, b in zip(op(u), u)]

    top, w, more = _power(shifted, start, iterations)
    return top + sigma, w, used + more, sigma


def hutchinson_trace(
    op: Operator, like: Sequence[Tensor], probes: int, generator: torch.Generator
) -> tuple[float, float]:
    """Hutchinson's estimate of ``tr(op)`` over ``probes`` Rademacher vectors, and its standard error
    (the probes' sample standard deviation over sqrt(probes); ``nan`` with one probe)."""
    samples = [float(_dot(z, op(z))) for z in (rademacher(like, generator) for _ in range(probes))]
    mean = sum(samples) / probes
    if probes < 2:
        return mean, math.nan
    var = sum((s - mean) ** 2 for s in samples) / (probes - 1)
    return mean, math.sqrt(var / probes)


def stability_constant(
    kind: str,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
) -> Optional[float]:
    """``c`` such that the optimizer is stable on a quadratic while ``lambda_max(S H S) < c``.

    * ``"sgd"``: gradient descent ``2``; heavy-ball momentum ``beta`` (PyTorch's SGD, dampening
      ``d``: the step is ``lr (1 - d)`` per unit of momentum buffer) ``(2 + 2 beta) / (1 - d)``;
      Nesterov (PyTorch's form, ``x -= lr (g + beta b)``) ``(2 + 2 beta) / (1 + 2 beta)``: the
      value of ``lr lambda`` at which a root of its recurrence
      ``z^2 - (1 + beta - lr lambda (1 + beta)) z + beta`` leaves the unit disc at ``z = -1``.
    * ``"adam"`` (Adam, AdamW; Cohen et al. 2022): ``(2 + 2 beta1) / (1 - beta1)`` (38 for 0.9),
      ``S`` built from ``sqrt(v_hat) + eps``.
    * anything else: ``None`` (no threshold is known).
    """
    if kind == "sgd":
        if momentum == 0.0:
            return 2.0
        if nesterov:
            return (2.0 + 2.0 * momentum) / (1.0 + 2.0 * momentum)
        return (2.0 + 2.0 * momentum) / (1.0 - dampening) if dampening < 1.0 else None
    if kind == "adam":
        return (2.0 + 2.0 * momentum) / (1.0 - momentum) if momentum < 1.0 else None
    return None
