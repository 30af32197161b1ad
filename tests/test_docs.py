"""The documentation stays true: generated pages are current, names and links resolve."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import gemma_scope_pz as gs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_FILES = sorted(DOCS.glob("*.md"))
README = ROOT / "README.md"

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
_GS_NAME = re.compile(r"(?<![\w.])gs\.([A-Za-z_]\w*)")
_FENCE = re.compile(r"^(```|~~~)")


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "gen_api_docs", ROOT / "scripts" / "gen_api_docs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prose_lines(text: str) -> list[str]:
    """Lines outside fenced code blocks (links inside code are not links)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(line)
    return lines


def github_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading (lowercase, punctuation dropped, '-' for spaces)."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, counts = set(), {}
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        match = re.match(r"^#{1,6}\s+(.*)$", line)
        if match:
            slug = github_anchor(match.group(1))
            n = counts.get(slug, 0)
            anchors.add(slug if n == 0 else f"{slug}-{n}")
            counts[slug] = n + 1
    return anchors


def relative_links(path: Path) -> list[str]:
    links = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)  # inline code is not a link either
        for match in _LINK.finditer(line):
            target = match.group(1) or match.group(2)
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:, ...
                links.append(target)
    return links


def test_docs_exist():
    names = {p.name for p in DOC_FILES}
    assert {"index.md", "concepts.md", "howto.md", "cli.md", "api.md"} <= names


@pytest.mark.parametrize("name", ["api.md", "cli.md"])
def test_generated_pages_are_current(name):
    generated = {path.name: text for path, text in _load_generator().outputs().items()}
    committed = (DOCS / name).read_text(encoding="utf-8")
    assert committed == generated[name], (
        f"docs/{name} is out of date with its sources; run: python scripts/gen_api_docs.py"
    )


def test_api_reference_covers_every_entry_point():
    api = (DOCS / "api.md").read_text(encoding="utf-8")
    for name in gs.__all__:
        assert f"`gs.{name}`" in api, f"gs.{name} missing from docs/api.md"
    generator = _load_generator()
    for module in generator.public_modules():
        if importlib.import_module(module).__doc__:
            assert f"## `{module}`" in api, f"module {module} missing from docs/api.md"


def test_generator_signature_and_summary_helpers():
    generator = _load_generator()

    def sample(a: int, b: str = "x", *, c=None) -> bool:
        """First line
        continues here.

        Second paragraph is dropped.
        """

    assert generator.first_paragraph(sample.__doc__) == "First line continues here."
    assert generator.signature(sample) == "(a: 'int', b: 'str' = 'x', *, c=None) -> 'bool'"
    # Penzai dataclasses hide __init__ behind (*args, **kwargs); the generator lists the fields.
    assert generator.signature(gs.Site) == "(layer: int, kind: str)"


def test_gs_names_in_readme_and_docs_exist():
    files = [*DOC_FILES] + ([README] if README.exists() else [])
    missing = []
    for path in files:
        for name in sorted(set(_GS_NAME.findall(path.read_text(encoding="utf-8")))):
            if not hasattr(gs, name):
                missing.append(f"{path.relative_to(ROOT)}: gs.{name}")
    assert not missing, "names that gemma_scope_pz does not export: " + ", ".join(missing)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_relative_links_resolve(path):
    broken = []
    for target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(f"{target} (no heading #{fragment} in {resolved.name})")
    assert not broken, f"broken links in docs/{path.name}: " + "; ".join(broken)


def test_link_checker_detects_breakage(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title `x`\n\n[ok](#title-x) [bad](missing.md) [web](https://example.com)\n"
        "```\n[in code](nowhere.md)\n```\n`[inline](nowhere.md)`\n",
        encoding="utf-8",
    )
    assert relative_links(page) == ["#title-x", "missing.md"]
    assert _anchors(page) == {"title-x"}
    assert github_anchor("`gemma-scope-pz tour`") == "gemma-scope-pz-tour"
    assert github_anchor("How to … run on TPU/GPU") == "how-to--run-on-tpugpu"
