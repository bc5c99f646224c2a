"""Batch fingerprints: a short, stable hex digest of a batch's content, taken only when it is needed
(a rule tripped, or a skip list is being replayed), never on the way through a normal step.

What is hashed, in order, each with its type, dtype and shape (so ``[1, 2]`` and ``(1, 2)``, or a
float and an int tensor holding the same bytes, differ):

* tensors (their local values for a DTensor; on the host: device tensors are copied there) and
  numpy arrays, by their raw bytes;
* tuples and lists (named tuples too), element by element; dicts and other mappings (a HuggingFace
  ``BatchEncoding`` is one) by key, keys in sorted ``repr`` order; dataclass instances field by field;
* ``None``, numbers, strings and bytes by ``repr``;
* any other object by ``repr`` when that ``repr`` is stable, i.e. holds no memory address; one whose
  ``repr`` is the default ``<... at 0x...>`` is *skipped* (its type is named in the notes, and the
  callback says so once), as are sparse, quantized and meta tensors.

The digest is BLAKE2b with 8 bytes (16 hex characters): the same content gives the same digest in
any process, on any machine, in any run.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_gradwatch.measure.reduction import local_tensor

__all__ = ["DIGEST_BYTES", "digest_from_halves", "digest_halves", "fingerprint"]

#: Bytes of a digest (hex characters: twice as many).
DIGEST_BYTES = 8
#: Nesting deeper than this is not followed (a batch is a shallow structure; cycles end here).
_MAX_DEPTH = 32
_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def fingerprint(batch: Any) -> tuple[str, list[str]]:
    """The hex digest of ``batch``'s content and the notes on what was skipped (type names)."""
    hasher = hashlib.blake2b(digest_size=DIGEST_BYTES)
    skipped: list[str] = []
    _feed(hasher, batch, skipped, 0)
    return hasher.hexdigest(), sorted(set(skipped))


def digest_halves(digest: str) -> tuple[float, float]:
    """A digest as two floats holding 32 bits each (exact in float64, so it can travel in a
    collective with the figures)."""
    number = int(digest, 16)
    return float(number >> 32), float(number & 0xFFFFFFFF)


def digest_from_halves(high: float, low: float) -> str:
    """The inverse of :func:`digest_halves`."""
    return f"{(int(high) << 32) | int(low):0{2 * DIGEST_BYTES}x}"


def _feed(hasher: Any, value: Any, skipped: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        skipped.append(f"nesting deeper than {_MAX_DEPTH}")
        return
    if isinstance(value, Tensor):
        _feed_tensor(hasher, value, skipped)
    elif isinstance(value, np.ndarray):
        _feed_bytes(hasher, f"ndarray:{value.dtype.str}:{value.shape}", value)
    elif isinstance(value, (*_SCALARS, np.generic)):
        _tag(hasher, f"{type(value).__name__}:{value!r}")
    elif isinstance(value, Mapping):
        _tag(hasher, f"{type(value).__name__}:{len(value)}")
        for key in sorted(value, key=repr):
            _tag(hasher, f"key:{key!r}")
            _feed(hasher, value[key], skipped, depth + 1)
    elif isinstance(value, (tuple, list)):
        _tag(hasher, f"{type(value).__name__}:{len(value)}")
        for item in value:
            _feed(hasher, item, skipped, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _tag(hasher, f"dataclass:{type(value).__name__}")
        for item in dataclasses.fields(value):
            _tag(hasher, f"field:{item.name}")
            _feed(hasher, getattr(value, item.name), skipped, depth + 1)
    else:
        text = repr(value)
        if f"{id(value):x}" in text.lower():  # the default repr: a memory address, not content
            skipped.append(type(value).__name__)
            return
        _tag(hasher, f"repr:{type(value).__name__}:{text}")


def _feed_tensor(hasher: Any, tensor: Tensor, skipped: list[str]) -> None:
    tensor = local_tensor(tensor.detach())
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_meta:
        skipped.append(f"Tensor({tensor.layout}, {tensor.dtype}, {tensor.device.type})")
        return
    flat = tensor.resolve_conj().resolve_neg()
    if flat.device.type != "cpu":
        flat = flat.cpu()  # the one device-to-host copy (only when a fingerprint is asked for)
    flat = flat.contiguous().reshape(-1)
    _tag(hasher, f"tensor:{tensor.dtype}:{tuple(tensor.shape)}")
    # The bytes of host memory as they are: no numpy round trip (bfloat16 and float8 have none).
    hasher.update(ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size()))


def _feed_bytes(hasher: Any, tag: str, array: np.ndarray) -> None:
    _tag(hasher, tag)
    hasher.update(np.ascontiguousarray(array).data)  # the buffer itself, no copy


def _tag(hasher: Any, text: str) -> None:
    encoded = text.encode("utf-8", errors="replace")
    hasher.update(len(encoded).to_bytes(8, "little"))  # length-prefixed: no ambiguous joins
    hasher.update(encoded)
