"""The documentation stays true: generated pages are current, names and links resolve."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import types
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


# ------------------------------------------------------------------ the code blocks run as written
# A block whose first line is one of these is not run by the tests (the docs say why).
SKIP_MARKERS = ("# online", "# notebook")
_PYTHON_FENCE = re.compile(r"^```python\s*$")


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(first line number, code)`` of every fenced ```python block of a Markdown file."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if current is None and _PYTHON_FENCE.match(line.strip()):
            current, start = [], number + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, "\n".join(current) + "\n"))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def runnable_blocks(path: Path) -> list[tuple[int, str]]:
    """The python blocks without a skip marker on their first line."""
    return [
        (n, code) for n, code in python_blocks(path) if not code.lstrip().startswith(SKIP_MARKERS)
    ]


def test_block_extraction_honours_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\nx = 1\n```\n```bash\nls\n```\n```python\n# online\ny = 2\n```\n"
        "```python\n# notebook\nz\n```\n```python\nprint(x)\n```\n",
        encoding="utf-8",
    )
    assert python_blocks(page) == [
        (3, "x = 1\n"),
        (9, "# online\ny = 2\n"),
        (13, "# notebook\nz\n"),
        (17, "print(x)\n"),
    ]
    assert runnable_blocks(page) == [(3, "x = 1\n"), (17, "print(x)\n")]


def run_blocks(path: Path, blocks: list[tuple[int, str]]) -> dict:
    """Executes ``blocks`` in order in one fresh module, as a reader pasting them into a session
    would; a failure names the file and line."""
    module = types.ModuleType("docs_session")
    sys.modules[module.__name__] = module  # dataclasses defined in a block look their module up
    try:
        for number, code in blocks:
            exec(compile(code, f"{path.name}:{number}", "exec", dont_inherit=True), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module.__dict__


@pytest.fixture(scope="module")
def docs_cache(tmp_path_factory):
    """Where the docs' offline dictionaries are cached: ``$GEMMA_SCOPE_PZ_CACHE`` when set (as a
    reader's own cache would be), else a fresh folder (the first call trains them)."""
    return os.environ.get("GEMMA_SCOPE_PZ_CACHE") or str(tmp_path_factory.mktemp("docs_cache"))


@pytest.fixture
def in_empty_folder(tmp_path, monkeypatch, docs_cache):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GEMMA_SCOPE_PZ_CACHE", str(docs_cache))
    return tmp_path


def test_every_howto_block_is_run_or_marked():
    blocks = python_blocks(DOCS / "howto.md")
    runnable = runnable_blocks(DOCS / "howto.md")
    assert len(runnable) >= 15 and len(blocks) - len(runnable) <= 5


@pytest.mark.slow
def test_howto_blocks_run_offline(in_empty_folder):
    namespace = run_blocks(DOCS / "howto.md", runnable_blocks(DOCS / "howto.md"))
    assert (in_empty_folder / "cards.html").stat().st_size > 10_000
    assert (in_empty_folder / "runs" / "sae" / "saelens" / "cfg.json").is_file()
    assert namespace["reloaded"].meta.d_sae == namespace["my_sae"].meta.d_sae == 1024
    assert namespace["trained"].sae.meta.site_out == "blocks.6.mlp_out"


def readme_first_session() -> list[tuple[int, str]]:
    """The python block(s) under the README's "A first session" heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index("## A first session")
    end = text.index("\n## ", start + 1)
    blocks = []
    offset = text[:start].count("\n")
    lines = text[start:end].splitlines()
    number = 0
    while number < len(lines):
        if _PYTHON_FENCE.match(lines[number].strip()):
            close = lines.index("```", number + 1)
            blocks.append((offset + number + 2, "\n".join(lines[number + 1 : close]) + "\n"))
            number = close
        number += 1
    return blocks


@pytest.mark.slow
def test_readme_first_session_runs_offline(in_empty_folder, capsys):
    blocks = readme_first_session()
    assert blocks and not any(code.lstrip().startswith(SKIP_MARKERS) for _, code in blocks)
    namespace = run_blocks(README, blocks)
    out = capsys.readouterr().out
    assert "capital of" in out.splitlines()[0]  # the greedy continuation
    assert 0 < namespace["report"].fvu < 1 and namespace["report"].l0 > 0, namespace["report"]
    assert f"feature #{namespace['f']} promotes" in out
