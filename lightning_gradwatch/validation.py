"""Argument checks shared by every public constructor: each error names the argument, the allowed
values and what was received."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Optional, TypeVar, Union

__all__ = [
    "check_choice",
    "check_int_at_least",
    "check_open_unit",
    "check_optional_positive_int",
    "check_optional_number",
    "check_path",
    "check_positive",
    "check_positive_int",
    "check_thresholds",
    "check_type",
]

T = TypeVar("T")


def check_type(value: Any, expected: type[T], name: str) -> T:
    """``value`` if it is an instance of ``expected`` (``bool`` is not accepted as ``int``)."""
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        article = "an" if expected.__name__[0] in "aeiou" else "a"
        raise TypeError(
            f"`{name}` must be {article} {expected.__name__}, got {type(value).__name__}: {value!r}."
        )
    return value


def check_positive_int(value: Any, name: str) -> int:
    """``value`` if it is an ``int >= 1``."""
    check_type(value, int, name)
    if value < 1:
        raise ValueError(f"`{name}` must be a positive integer (>= 1), got {value!r}.")
    return int(value)


def check_optional_positive_int(value: Any, name: str) -> Optional[int]:
    """``value`` if it is ``None`` or an ``int >= 1``."""
    return None if value is None else check_positive_int(value, name)


def check_positive(value: Any, name: str) -> float:
    """``value`` as a float if it is a finite real number ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a positive number, got {type(value).__name__}: {value!r}."
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
    return float(value)


def check_thresholds(damping_threshold: Any, amplifying_threshold: Any) -> tuple[float, float]:
    """Gain-category thresholds: both positive and ``damping_threshold <= amplifying_threshold``."""
    low = check_positive(damping_threshold, "damping_threshold")
    high = check_positive(amplifying_threshold, "amplifying_threshold")
    if low > high:
        raise ValueError(
            f"`damping_threshold` ({low}) must not exceed `amplifying_threshold` ({high})."
        )
    return low, high


def check_path(value: Any, name: str) -> str:
    """``value`` as a ``str`` if it is a ``str`` or an ``os.PathLike`` (``pathlib.Path``)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise TypeError(
            f"`{name}` must be a path (str or os.PathLike), got {type(value).__name__}: {value!r}."
        )
    if not value:
        raise ValueError(f"`{name}` must be a non-empty path, got {value!r}.")
    return value


def check_int_at_least(value: Any, low: int, name: str) -> int:
    """``value`` if it is an ``int >= low`` (``bool`` is not accepted as ``int``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int >= {low}, got {type(value).__name__}: {value!r}.")
    if value < low:
        raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}.")
    return value


def check_optional_number(value: Any, name: str) -> Optional[float]:
    """``None``, or ``value`` as a float if it is a real number that is not NaN (infinities pass)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a number or None, got {type(value).__name__}: {value!r}."
        )
    if math.isnan(value):
        raise ValueError(f"`{name}` must not be NaN.")
    return float(value)


def check_open_unit(value: Any, name: str) -> float:
    """``value`` as a float if it is a real number strictly between 0 and 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a number in (0, 1), got {type(value).__name__}: {value!r}."
        )
    if not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must be a number in (0, 1) (both excluded), got {value!r}.")
    return float(value)


def check_choice(value: Any, choices: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return str(value)


def check_param_filter(value: object, name: str = "log_param_norms") -> Union[bool, str, list[str]]:
    """``value`` if it is a bool, a glob pattern or a list of patterns (a tuple becomes a list)."""
    if isinstance(value, (bool, str)):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(
        f"`{name}` must be a bool, a glob pattern (str) or a list of patterns, got "
        f"{type(value).__name__}: {value!r}."
    )
