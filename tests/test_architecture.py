"""The package keeps its shape as features land: no module over 350 lines, no function over 60, no
class over 300 (the layers themselves are an import-linter contract in ``pyproject.toml``, checked by
``make lint``); the package root holds only the public face."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_gradwatch"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_CLASS_LINES = 350, 60, 300
#: The package root: the public face, the CLI entry point, and what every layer shares (the key
#: vocabulary, argument checks, file I/O through fsspec, torch/Lightning internals).
ROOT_MODULES = {
    "__init__.py",
    "__main__.py",
    "callback.py",
    "monitor.py",
    "keys.py",
    "validation.py",
    "files.py",
    "_compat.py",
}


def _name(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


@pytest.mark.parametrize("path", MODULES, ids=_name)
def test_module_fits_the_size_limits(path: Path) -> None:
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{_name(path)}: split it by idea"
    too_long = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > limit:
                too_long.append(f"{node.name}: {length} lines (limit {limit})")
    assert too_long == [], _name(path)


def test_the_package_root_holds_only_the_public_face() -> None:
    assert {p.name for p in PACKAGE.glob("*.py")} == ROOT_MODULES
    layers = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert layers == {"numerics", "measure", "governance", "diagnosis", "lightning", "report"}
