"""The notebooks are committed with their outputs, and those outputs are not stale.

No notebook is executed here (CI executes them through nbmake); this checks, cheaply, that the
outputs stored in every ``notebooks/*.ipynb`` came from a complete top-to-bottom run of the current
sources by ``scripts/execute_notebooks.py``: each code cell ran, in order, the source it ran is the
one committed (its stamped hash), nothing failed, and a cell that draws a plot holds the plot.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
RERUN = "rerun: JAX_PLATFORMS=cpu .venv/bin/python scripts/execute_notebooks.py"


def _source(cell: dict) -> str:
    source = cell["source"]
    return "".join(source) if isinstance(source, list) else source


def _code_cells(path: Path) -> list[dict]:
    notebook = json.loads(path.read_text(encoding="utf-8"))
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def _mime_types(cell: dict) -> set[str]:
    return {mime for out in cell.get("outputs", []) for mime in out.get("data", {})}


def test_every_notebook_is_checked():
    names = {path.name for path in NOTEBOOKS}
    assert {"gemma_scope_2_tutorial.ipynb", "train_an_sae.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_cells_ran_in_order(path):
    counts = [cell.get("execution_count") for cell in _code_cells(path)]
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: execution counts {counts} are not 1..{len(counts)}; {RERUN}"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_come_from_the_current_sources(path):
    for index, cell in enumerate(_code_cells(path)):
        stamp = cell.get("metadata", {}).get("gemma_scope_pz", {}).get("source_sha256")
        digest = hashlib.sha256(_source(cell).encode("utf-8")).hexdigest()
        assert stamp == digest, (
            f"{path.name}: code cell {index} ({_source(cell)[:40]!r}) was edited after its outputs "
            f"were made; {RERUN} {path.relative_to(path.parents[1])}"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_errors(path):
    for index, cell in enumerate(_code_cells(path)):
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", (
                f"{path.name}: code cell {index} holds an error: {out.get('ename')}: "
                f"{out.get('evalue')}"
            )
            text = out.get("text", "")
            text = "".join(text) if isinstance(text, list) else text
            assert "Traceback (most recent call last)" not in text, (
                f"{path.name}: code cell {index} printed a traceback"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_plots_are_inline(path):
    for index, cell in enumerate(_code_cells(path)):
        source = _source(cell)
        svgs = len(re.findall(r"\bSVG\(", source))
        shown = sum("image/svg+xml" in out.get("data", {}) for out in cell.get("outputs", []))
        assert shown >= svgs, (
            f"{path.name}: code cell {index} draws {svgs} SVG plot(s) but holds {shown}"
        )
        online_only = "online-only" in cell.get("metadata", {}).get("tags", [])
        if re.search(r"display\((HTML\(|gs\.display_tokens)", source) and not online_only:
            assert "text/html" in _mime_types(cell), f"{path.name}: code cell {index} lost its HTML"
        if re.search(r"\bplt\.(show|plot|hist|bar|imshow)\(", source):
            assert "image/png" in _mime_types(cell), f"{path.name}: code cell {index} lost its plot"
