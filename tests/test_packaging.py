"""The declared dependencies tell the truth: every runtime dependency is imported by the package,
and the pinned requirement sets install exactly the declared packages plus the test tools."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lightning_gradwatch"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = None

needs_tomllib = pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")

#: Installed for the tests and checks only, never imported by the package.
TEST_TOOLS = {
    "pytest",
    "pytest-timeout",
    "ruff",
    "mypy",
    "import-linter",  # the layers contract (pyproject.toml, make lint)
    "jsonargparse",  # LightningCLI (tests/test_cli_config.py, examples/ex06_lightning_cli.py)
    "setuptools",  # the editable install of this package (--no-build-isolation)
}


def distribution(requirement: str) -> str:
    """``"torch>=2.3"`` -> ``"torch"``; ``"jsonargparse[signatures]==4.5"`` -> ``"jsonargparse"``."""
    match = re.match(r"[A-Za-z0-9_.-]+", requirement.strip())
    assert match, requirement
    return match.group(0).lower()


def declared() -> tuple[set[str], set[str]]:
    """Runtime dependencies and optional ones (extras) from ``pyproject.toml``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {distribution(r) for r in project["dependencies"]}
    extras = {distribution(r) for deps in project["optional-dependencies"].values() for r in deps}
    return runtime, extras


def imported_top_level_names() -> set[str]:
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names


#: Third-party modules the package imports that come with a declared dependency, not on their own.
COME_WITH = {"google": "tensorboard"}  # google.protobuf: only to catch its event files' DecodeError


@needs_tomllib
def test_every_imported_third_party_package_is_declared() -> None:
    """fsspec was imported (the callback's files) but declared nowhere: its floor was whatever
    Lightning happened to pull in, and fsspec 2025.12.0's memory filesystem behaved differently."""
    runtime, extras = declared()
    third_party = imported_top_level_names() - set(sys.stdlib_module_names) - {PACKAGE.name}
    undeclared = sorted(
        name
        for name in third_party
        if name.replace("_", "-") not in runtime | extras and COME_WITH.get(name) not in runtime
    )
    assert not undeclared, (
        f"imported by the package, declared nowhere in pyproject.toml: {undeclared}"
    )


@needs_tomllib
def test_every_declared_dependency_is_imported() -> None:
    runtime, extras = declared()
    unused = sorted(
        d for d in runtime | extras if d.replace("-", "_") not in imported_top_level_names()
    )
    assert not unused, f"declared in pyproject.toml but imported nowhere in the package: {unused}"


def pins(name: str) -> dict[str, str]:
    """``{distribution: version}`` of the ``==`` pins in ``requirements/<name>``."""
    lines = (ROOT / "requirements" / name).read_text().splitlines()
    found = (re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==(\S+)", line.strip()) for line in lines)
    return {match.group(1).lower(): match.group(2) for match in found if match}


@needs_tomllib
def test_every_floor_is_the_version_of_the_oldest_tested_set() -> None:
    """A floor in pyproject.toml is a version the suite ran on: the pin in requirements/oldest.txt."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    requirements += [r for deps in project["optional-dependencies"].values() for r in deps]
    oldest = pins("oldest.txt")
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=(\S+)", requirement.replace(" ", ""))
        assert match, f"{requirement!r}: declare a floor (name>=version)"
        name, floor = match.group(1).lower(), match.group(2)
        assert oldest.get(name) == floor, (
            f"pyproject.toml says {requirement} but requirements/oldest.txt pins "
            f"{name}=={oldest.get(name)}: `make test-oldest` must run the floor itself"
        )


@needs_tomllib
@pytest.mark.parametrize("name", ["test.txt", "oldest.txt"])
def test_requirement_sets_install_the_declared_packages_and_test_tools(name: str) -> None:
    path = ROOT / "requirements" / name
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    pinned = {distribution(line) for line in lines if line}
    runtime, extras = declared()
    assert runtime <= pinned, f"requirements/{name} lacks {sorted(runtime - pinned)}"
    extra = sorted(pinned - runtime - extras - TEST_TOOLS)
    assert not extra, f"requirements/{name} installs packages nothing declares or uses: {extra}"


@needs_tomllib
def test_package_layout_and_two_command_setup() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    meta = project["project"]
    assert meta["name"] == "lightning-gradwatch"
    deps = " ".join(meta["dependencies"])
    for requirement in ("torch>=", "lightning>=", "tensorboard>="):
        assert requirement in deps
    assert "matplotlib" not in deps  # an optional extra only
    assert any("matplotlib" in d for d in meta["optional-dependencies"]["plots"])
    assert (PACKAGE / "py.typed").exists()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["lightning_gradwatch"]

    makefile = (ROOT / "Makefile").read_text()
    for step in ("venv", "pip install", "-e .", "ruff check", "ruff format --check", "mypy"):
        assert step in makefile
    assert "pytest" in makefile and "examples/demo.py" in makefile
    assert re.search(r"^torch==", (ROOT / "requirements" / "test.txt").read_text(), re.MULTILINE)
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert not any(line.strip().startswith(("pytest", "python", "pip")) for line in ci)
    first_block = (ROOT / "README.md").read_text().split("```")[1]
    commands = [line.split("#")[0].strip() for line in first_block.splitlines()[1:] if line]
    targets = set(re.findall(r"^([a-z-]+):", makefile, re.MULTILINE))
    assert commands and all(c.split()[0] == "make" and c.split()[1] in targets for c in commands)


def test_no_pytorch_lightning_and_matplotlib_imported_lazily() -> None:
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(n.split(".")[0] == "pytorch_lightning" for n in names), path
        # matplotlib (the `plots` extra) only inside functions, never at import time.
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                assert not any(n.split(".")[0] == "matplotlib" for n in names), path


def package_modules() -> list[str]:
    """Every module of the package by dotted name (``__main__`` left out: importing it runs the CLI)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


@pytest.mark.parametrize("module", package_modules())
def test_every_module_imports(module: str) -> None:
    """Run by CI on the oldest supported versions too (``make test-oldest``), where a module that
    imports a path newer than the floor fails here, naming itself."""
    importlib.import_module(module)


#: Import paths whose contents differ across the supported torch versions (pyproject.toml's floor to
#: today's): only ``lightning_gradwatch/_compat.py`` imports them, with the fallback for older torch.
VERSION_GATED = (
    "torch.distributed.tensor",  # DTensor, placements: torch 2.3.1 has them in ._tensor only
    "torch.distributed.fsdp",  # fully_shard: torch 2.3.1 has it in ._composable.fsdp only
    "torch.distributed.device_mesh",
    "torch.distributed.checkpoint",
)
#: Roots whose private names (a ``_`` component) only ``_compat`` may reach.
THIRD_PARTY = ("torch", "lightning", "tensorboard")


def _outlawed(dotted: str) -> bool:
    """Whether ``dotted`` (a module or attribute path) is version-gated or a private internal."""
    parts = dotted.split(".")
    private = any(p.startswith("_") and not p.startswith("__") for p in parts[1:])
    return parts[0] in THIRD_PARTY and (
        private or any(dotted == g or dotted.startswith(g + ".") for g in VERSION_GATED)
    )


def _reached_paths(tree: ast.AST) -> list[tuple[int, str]]:
    """Every third-party path a module imports or reaches through an imported name (``dist.x.y`` with
    ``import torch.distributed as dist`` -> ``torch.distributed.x.y``), with its line."""
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                aliases[alias.asname or alias.name.split(".")[0]] = alias.asname and alias.name
                found.append((node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
                found.append((node.lineno, f"{node.module}.{alias.name}"))
    for node in ast.walk(tree):
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if chain and isinstance(node, ast.Name) and node.id in aliases:
            root = aliases[node.id] or node.id
            found.append((node.lineno, ".".join([root, *reversed(chain)])))
    return found


def test_version_gated_and_private_paths_only_through_compat() -> None:
    """torch 2.3.1 (the floor) has no ``torch.distributed.tensor.DTensor``: a direct import of it made
    the whole package unimportable there. Such paths and private internals go through ``_compat``,
    which says why and is tested against the installed versions (tests/test_compat.py)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_compat.py":
            continue
        for line, dotted in _reached_paths(ast.parse(path.read_text())):
            if _outlawed(dotted):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {dotted}")
    assert not offenders, "use lightning_gradwatch._compat instead:\n" + "\n".join(offenders)


def test_the_scan_sees_imports_and_attribute_paths() -> None:
    """The scan above finds what it must: a gated import, a private attribute through an alias."""
    source = (
        "import torch\nimport torch.distributed as dist\n"
        "from torch.distributed.tensor import DTensor\n"
        "def f():\n    from torch.distributed import fsdp\n"
        "    return torch._foreach_norm, dist._tensor.DTensor, torch.__version__, dist.all_reduce\n"
    )
    outlawed = [(line, p) for line, p in _reached_paths(ast.parse(source)) if _outlawed(p)]
    assert sorted(outlawed) == [
        (3, "torch.distributed.tensor.DTensor"),
        (5, "torch.distributed.fsdp"),
        (6, "torch._foreach_norm"),
        (6, "torch.distributed._tensor"),
        (6, "torch.distributed._tensor.DTensor"),
    ]


def run_ci(tmp_path: Path, failing: str) -> tuple[int, list[str]]:
    """``.ci/run`` with a ``make`` that only records its target and fails for ``failing``."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    fake = bin_dir / "make"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n[ "$*" != "{failing}" ]\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    process = subprocess.run(["bash", str(ROOT / ".ci" / "run")], env=env, timeout=60)
    return process.returncode, calls.read_text().split("\n")[:-1]


@pytest.mark.parametrize("failing", ["", "test", "test-oldest"])
def test_ci_checks_the_pinned_set_and_the_floor_and_fails_if_either_fails(
    tmp_path: Path, failing: str
) -> None:
    """CI runs lint + the suite (``make test``) and the floor (``make test-oldest``: a fresh venv of
    requirements/oldest.txt, the import, the suite), both whatever the first gives."""
    returncode, targets = run_ci(tmp_path, failing)
    assert targets == ["test", "test-oldest"]
    assert (returncode != 0) == bool(failing), (failing, returncode)
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^test-oldest: (.*)\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert recipe and recipe.group(1) == "$(OLDEST_STAMP)", "the floor's venv is a prerequisite"
    assert "import lightning_gradwatch" in recipe.group(2) and "pytest" in makefile
    assert re.search(r"^\$\(OLDEST_STAMP\): requirements/oldest.txt", makefile, re.MULTILINE)
