"""The documentation holds together: every relative link in README.md and docs/*.md resolves (the
file, and the heading when the link names one), the README stays short and starts with the two
commands, its performance table is the committed benchmark results, and the developers' guide
names every module of the package."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "examples" / "README.md"]

FENCE = re.compile(r"^```.*?^```", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """Markdown without code blocks and code spans, where a bracket is not a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(page: Path) -> list[str]:
    return LINK.findall(prose(page.read_text(encoding="utf-8")))


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``page``: lower case, punctuation dropped (code
    marks included), spaces to hyphens, ``-1``, ``-2`` ... for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked here
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif anchor and (resolved.suffix != ".md" or anchor not in anchors(resolved)):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_the_link_check_finds_links_and_catches_a_broken_one(tmp_path: Path) -> None:
    assert sum(len(links(page)) for page in PAGES) >= 40  # it reads real links, not none
    (tmp_path / "there.md").write_text("# A heading: with `code`, and more\n\n## Again\n## Again\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#a-heading-with-code-and-more) [ok](there.md#again-1) [ok](#self)\n"
        "# Self\n[gone](missing.md) [no heading](there.md#nowhere) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n```\n[web](https://example.org/missing.md)\n"
    )
    assert broken_links(page) == [
        f"missing.md (no file {tmp_path / 'missing.md'})",
        "there.md#nowhere (no heading #nowhere in there.md)",
    ]


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 300
    assert lines[0].startswith("# ")
    fence = next(i for i, line in enumerate(lines) if line.startswith("```"))
    assert fence <= 2, "the two commands come first, right under the title"
    commands = [line.split("#")[0].strip() for line in lines[fence + 1 : fence + 3]]
    assert commands == ["make demo", "make test"]
    assert lines[fence + 3] == "```"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README)}
    assert [page.name for page in DOCS if page.resolve() not in linked] == []


def test_readme_performance_table_is_the_committed_results() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gradwatch_bench.writer import readme_table
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    results = ROOT / "benchmarks" / "results" / "overhead.json"
    result = json.loads(results.read_text(encoding="utf-8"))
    readme = README.read_text(encoding="utf-8")
    assert readme_table(result) in readme
    # The command that made them is stated next to the table, and so is the file.
    assert f"`{result['command']}`" in readme
    assert "(benchmarks/results/overhead.json)" in readme


def test_the_developers_guide_names_every_module() -> None:
    guide = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    package = ROOT / "lightning_gradwatch"
    missing = []
    for module in sorted(package.rglob("*.py")):
        name = module.relative_to(package).as_posix()
        if module.name == "__init__.py" and name != "__init__.py":
            continue  # a layer's __init__ is the layer itself
        if f"`{name}`" not in guide:
            missing.append(name)
    assert missing == []


def test_every_source_path_named_in_the_docs_exists() -> None:
    """A module moved or renamed leaves no stale path in the prose: files under
    ``lightning_gradwatch/``, ``benchmarks/`` and ``examples/`` named in code spans (the developers'
    guide's module list is checked above)."""
    named = {
        path
        for page in PAGES
        for path in re.findall(
            r"`((?:lightning_gradwatch|benchmarks|examples)/[\w/.-]+\.\w+)`",
            page.read_text("utf-8"),
        )
    }
    assert len(named) >= 5
    assert sorted(path for path in named if not (ROOT / path).exists()) == []
