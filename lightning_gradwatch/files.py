"""The callback's and the report's own files, through fsspec: local paths and URLs alike
(``s3://``, ``gs://``, ``memory://``, ...), resolved the way Lightning resolves its loggers' and
checkpoints' paths (``lightning.fabric.utilities.cloud_io.get_filesystem`` is
``fsspec.core.url_to_fs``). ``os.path`` and ``open()`` on a URL would instead create a local folder
named ``s3:`` or ``memory:`` under the working directory.

Shared by governance (the alert trail, the halt checkpoint's path), the Lightning adapter (the
model-facts file) and the offline report, so it sits at the root and imports nothing of the package.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any, Union

from fsspec import AbstractFileSystem
from fsspec.core import url_to_fs
from fsspec.utils import get_protocol

__all__ = [
    "APPENDING_PROTOCOLS",
    "append_line",
    "can_append",
    "copy_file",
    "dirname",
    "filesystem",
    "is_local",
    "join",
    "write_text",
]

PathLike = Union[str, "os.PathLike[str]"]

#: fsspec protocols whose files are appended in place (``open(path, "a")``): local disks and
#: fsspec's in-memory filesystem. Object stores (``s3``, ``gs``, ``az``) rewrite whole objects, so a
#: file grown line by line there goes through a local spool (see ``JsonlAlertSink``).
APPENDING_PROTOCOLS = ("file", "local", "memory")


def filesystem(path: PathLike) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem of ``path`` and the path inside it (the protocol stripped; a local
    path made absolute)."""
    return url_to_fs(os.fspath(path))


def is_local(path: PathLike) -> bool:
    """Whether ``path`` is on the local disk (a plain path or a ``file://`` URL)."""
    return get_protocol(os.fspath(path)) in ("file", "local")


def can_append(path: PathLike) -> bool:
    """Whether the filesystem of ``path`` appends to a file in place."""
    return get_protocol(os.fspath(path)) in APPENDING_PROTOCOLS


def join(base: PathLike, *parts: str) -> str:
    """``base / parts``: ``os.path.join`` for local paths, ``"/"`` for URLs (``os.path.join`` on a
    URL would use the OS separator and drop ``base`` before an absolute part)."""
    base = os.fspath(base)
    if is_local(base) and "://" not in base:
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts if part)])


def dirname(path: PathLike) -> str:
    """The folder of ``path``, spelt like ``path`` (``memory://run/a.jsonl`` -> ``memory://run``)."""
    path = os.fspath(path)
    protocol, separator, rest = path.rpartition("://")
    if not separator:
        return os.path.dirname(path)
    return f"{protocol}://{posixpath.dirname(rest)}"


def write_text(path: PathLike, text: str) -> None:
    """Write ``text`` to ``path`` (replacing it), creating its folder."""
    fs, inner = filesystem(path)
    _makedirs(fs, inner)
    with fs.open(inner, "w", encoding="utf-8") as handle:
        handle.write(text)


def append_line(path: PathLike, line: str) -> None:
    """Append ``line`` and a newline to ``path`` (created, with its folder, if missing). On a local
    disk the line is flushed and ``os.fsync``-ed before this returns, so a crash (even ``SIGKILL``)
    loses no line written before it. ``path`` must be on a filesystem that :func:`can_append`."""
    fs, inner = filesystem(path)
    _makedirs(fs, inner)
    if is_local(path):
        with open(inner, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return
    with _open_to_append(fs, inner) as handle:
        handle.write(line + "\n")


def _open_to_append(fs: AbstractFileSystem, inner: str) -> Any:
    """``fs.open(inner, "a")``, which creates a missing file on every supported fsspec (a version
    shim: fsspec's in-memory filesystem raises ``FileNotFoundError`` there up to 2025.12.0 at least;
    2026.9.0 creates the file, as builtin ``open`` does)."""
    try:
        return fs.open(inner, "a", encoding="utf-8")
    except FileNotFoundError:
        return fs.open(inner, "w", encoding="utf-8")


def copy_file(source: PathLike, target: PathLike) -> None:
    """Copy one file whole from ``source`` to ``target`` (either local or a URL; the target's
    folder is created): an upload, a download, or both."""
    source_fs, source_inner = filesystem(source)
    target_fs, target_inner = filesystem(target)
    _makedirs(target_fs, target_inner)
    if is_local(source):
        target_fs.put_file(source_inner, target_inner)
    elif is_local(target):
        source_fs.get_file(source_inner, target_inner)
    else:
        target_fs.pipe_file(target_inner, source_fs.cat_file(source_inner))


def _makedirs(fs: AbstractFileSystem, inner: str) -> None:
    parent = posixpath.dirname(inner)
    if parent:
        fs.makedirs(parent, exist_ok=True)
