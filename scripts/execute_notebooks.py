"""Executes the notebooks in place and stamps each code cell with the hash of the source it ran.

    JAX_PLATFORMS=cpu nice -n 10 .venv/bin/python scripts/execute_notebooks.py [NOTEBOOK ...]

With no argument every ``notebooks/*.ipynb`` runs. Each notebook runs top to bottom in a fresh
kernel of this interpreter (nbclient), from the ``notebooks/`` folder, and is written back
atomically with its outputs only when every cell succeeded (a failing cell leaves the file as it
was and the script exits 1). Each code cell's metadata then holds
``gemma_scope_pz.source_sha256``, the SHA-256 of the source that produced its outputs, and the
notebook's metadata the seconds it took; ``tests/test_notebooks.py`` compares the hashes with
the current sources, so an edited cell whose outputs were not refreshed fails the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from gemma_scope_pz.io import write_atomically

ROOT = Path(__file__).resolve().parents[1]
STAMP = "gemma_scope_pz"  # the metadata key of the stamps


def source_hash(source: str | list[str]) -> str:
    """SHA-256 (hex) of a cell's source, as nbformat stores it (a string or a list of lines)."""
    text = "".join(source) if isinstance(source, list) else source
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def execute(path: Path, timeout: int) -> float:
    """Runs ``path`` in a fresh kernel, stamps its code cells and writes it back; the seconds."""
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    seconds = time.perf_counter() - start
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.metadata[STAMP] = {"source_sha256": source_hash(cell.source)}
    notebook.metadata[STAMP] = {"execution_seconds": round(seconds, 1)}
    write_atomically(path, nbformat.writes(notebook) + "\n")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    args = parser.parse_args()
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb"))
    failed = []
    for path in paths:
        try:
            seconds = execute(path.resolve(), args.timeout)
        except CellExecutionError as err:
            failed.append(path)
            print(f"{path}: a cell failed, file left unchanged:\n{err}", file=sys.stderr)
            continue
        print(f"{path}: executed in {seconds:.0f} s, outputs written")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
