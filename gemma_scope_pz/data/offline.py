"""The texts of the offline default corpus: English documentation every CPython installation ships.

Documents (fixed order, de-duplicated): the language-reference topics behind ``help()``
(``pydoc_data.topics``), the docstrings and prose comment blocks of the standard library's sources
(read with ``ast``; nothing is imported), and the docstrings of a fixed list of built-in C modules.
``offline_documents(packages=DEPENDENCY_PACKAGES)`` adds the documentation of installed
dependencies. This module only gathers text; ``data.corpus.default_corpus`` wraps it as a ``Corpus``.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import os
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator, Sequence

DEFAULT_CORPUS_NAME = "python-stdlib-docs"

# Standard-library directories that are left out: tests, GUI code and pieces that some Linux
# distributions package separately (so the corpus is the same wherever this Python version runs).
_SKIPPED_STDLIB_DIRS = frozenset({
    "__pycache__", "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib",
    "tkinter", "turtledemo", "ensurepip", "lib2to3", "venv", "pydoc_data",
})  # fmt: skip
_SKIPPED_STDLIB_FILES = frozenset({"antigravity.py", "this.py", "turtle.py", "__phello__.foo.py"})
# C modules (no Python source) whose documentation is read by importing them; all are side-effect
# free. Missing ones are skipped.
_C_MODULES = (
    "array", "binascii", "builtins", "cmath", "errno", "gc", "itertools", "marshal", "math",
    "mmap", "select", "sys", "time", "unicodedata", "zlib",
)  # fmt: skip
_COMMENT_RUN = re.compile(r"(?:^[ \t]*#(?![!]| -\*-).*(?:\n|\Z))+", re.MULTILINE)
_NOT_PROSE = re.compile(r"[^\w\s]|[\d_]")

# Installed dependencies of this project whose documentation the offline corpus can add.
DEPENDENCY_PACKAGES = ("numpy", "jax", "penzai", "optax")


def offline_name(packages: Sequence[str] = ()) -> str:
    """The corpus name: ``"python-stdlib-docs"``, plus ``"+numpy"`` etc. for added packages."""
    return "+".join([DEFAULT_CORPUS_NAME, *packages])


def offline_version_tag(packages: Sequence[str] = ()) -> str:
    """The versions the texts come from, e.g. ``"py3.11.7+numpy2.1.0"`` (the fingerprint's prefix,
    since the text changes between releases)."""
    versions = ["py" + ".".join(map(str, sys.version_info[:3]))]
    versions += [f"{name}{_package_version(name)}" for name in packages]
    return "+".join(versions)


@functools.lru_cache(maxsize=4)
def offline_documents(
    *, min_chars: int = 200, comments: bool = True, packages: tuple[str, ...] = ()
) -> tuple[str, ...]:
    """The documents of the offline default corpus, built once per process (a few seconds).

    In this fixed order, de-duplicated and at least ``min_chars`` long:

    1. The language-reference topics behind ``help("...")`` (``pydoc_data.topics``).
    2. For each standard-library source file (sorted paths; tests, GUI and venv/ensurepip code
       skipped): the module, class and function docstrings, read with ``ast`` without importing
       anything, then (with ``comments``) its comment blocks that are mostly prose.
    3. Docstrings of a fixed list of built-in C modules and their members (``inspect.getdoc``).
    4. The same as 2. for each installed package in ``packages`` (e.g. ``DEPENDENCY_PACKAGES``,
       which this project always has installed), to get more text.
    """
    return build_default_documents(min_chars=min_chars, comments=comments, packages=packages)


def build_default_documents(
    *, min_chars: int = 200, comments: bool = True, packages: Sequence[str] = ()
) -> tuple[str, ...]:
    """Builds (uncached) the documents of ``offline_documents``; see there."""
    seen: set[str] = set()
    docs: list[str] = []

    def add(text: str | None) -> None:
        if text and len(text) >= min_chars and text not in seen:
            seen.add(text)
            docs.append(text)

    def add_sources(root: str) -> None:
        for path in _python_sources(root):
            try:
                with open(path, "rb") as f:
                    source = f.read()
                tree = ast.parse(source)
            except (SyntaxError, ValueError, OSError):
                continue  # files written for another grammar or encoding
            for text in _docstrings(tree):
                add(text)
            if comments:
                for text in _comment_blocks(source.decode("utf-8", "replace")):
                    add(text)

    stdlib = sysconfig.get_paths()["stdlib"]
    for text in _pydoc_topics():
        add(text)
    add_sources(stdlib)
    for module_name in _C_MODULES:
        for text in _module_docs(module_name):
            add(text)
    for package in packages:
        add_sources(_package_dir(package))
    if not docs:
        raise RuntimeError(f"The default corpus is empty: no documentation found under {stdlib!r}")
    return tuple(docs)


def _package_dir(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"offline corpus: package {name!r} is not installed ({e})") from None
    paths = list(getattr(module, "__path__", []))
    if not paths:
        raise ValueError(f"offline corpus: {name!r} is a module, not a package directory")
    return paths[0]


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return str(getattr(importlib.import_module(name), "__version__", "unknown"))


def _python_sources(root: str) -> list[str]:
    """``.py`` files below ``root`` in sorted order, without tests, GUI code or installed extras."""
    paths = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [
            d for d in subdirs if d not in _SKIPPED_STDLIB_DIRS and not d.startswith("config-")
        ]
        paths += [
            os.path.join(directory, f)
            for f in files
            if f.endswith(".py") and f not in _SKIPPED_STDLIB_FILES
        ]
    return sorted(paths, key=lambda p: os.path.relpath(p, root).split(os.sep))


def _pydoc_topics() -> list[str]:
    try:
        topics = importlib.import_module("pydoc_data.topics").topics
    except (ImportError, AttributeError):
        return []
    return [topics[key].strip() for key in sorted(topics)]


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of a module and of the classes and functions nested in its statements."""
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc.strip()
    for field in ("body", "orelse", "finalbody", "handlers"):  # statements only, no expressions
        for child in getattr(node, field, ()):
            if isinstance(child, (ast.stmt, ast.excepthandler)):
                yield from _docstrings(child)


def _comment_blocks(source: str) -> Iterator[str]:
    """Runs of consecutive ``#`` comment lines that read as prose (mostly letters and spaces)."""
    for match in _COMMENT_RUN.finditer(source):
        lines = [line.strip().lstrip("#").strip() for line in match.group(0).splitlines()]
        text = "\n".join(lines).strip()
        if text and len(_NOT_PROSE.findall(text)) <= 0.15 * len(text):
            yield text


def _module_docs(name: str) -> Iterator[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except ImportError:
        return
    yield inspect.getdoc(module) or ""
    for attr in sorted(vars(module)):
        obj = getattr(module, attr)
        if attr.startswith("_") or not (inspect.isclass(obj) or callable(obj)):
            continue
        # Only objects the module defines itself: environments such as IPython replace some
        # (builtins.input, sys.excepthook), and their docstrings would change the corpus.
        if getattr(obj, "__module__", name) != name:
            continue
        yield inspect.getdoc(obj) or ""
        if inspect.isclass(obj) and getattr(obj, "__module__", None) == name:
            for member in sorted(vars(obj)):
                if not member.startswith("_"):
                    yield inspect.getdoc(getattr(obj, member, None)) or ""
