"""Text corpora for harvesting activations: named, re-iterable and fingerprinted.

A ``Corpus`` is an iterable of documents (``str``) that can be iterated any number of times and
always yields the same documents in the same order. It carries a ``name`` and a ``fingerprint``
(a hash of its content, or of its specification for streamed Hub datasets) so that an activation
store records exactly which text it was built from::

    corpus = load_corpus(None)                        # offline: Python's own documentation
    corpus = load_corpus("default+prose")             # ... mixed with English prose (Debian)
    corpus = load_corpus("notes/*.txt", split="paragraph")
    corpus = load_corpus("data/*.jsonl", field="text")
    corpus = load_corpus("hf:roneneldan/TinyStories:train")     # needs `pip install datasets`
    print(corpus.label)                               # "python-stdlib-docs@py3.11.7-3f9c..."

``default_corpus()`` wraps the texts gathered by ``data/offline.py``.
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import importlib
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

from gemma_scope_pz.data import offline
from gemma_scope_pz.data.prose import prose_documents

_FileReader = Callable[[str], Iterator[str]]


class Corpus:
    """A named, re-iterable and reproducible collection of text documents.

    Iterating calls ``documents()`` afresh, so a corpus can be read several times (e.g. once to
    fingerprint it and once to harvest). The fingerprint is computed lazily, once.

    Attributes:
      name: Human-readable name of the source ("python-stdlib-docs", "files:notes/*.txt", ...).
      fingerprint: Hex digest identifying the content (computed on first access).
      label: ``"{name}@{fingerprint}"``, the string to log or store in a header.
    """

    def __init__(
        self,
        name: str,
        documents: Callable[[], Iterable[str]],
        fingerprint: Callable[[], str] | str | None = None,
    ):
        """Wraps a document factory.

        Args:
          name: Name of the corpus.
          documents: Zero-argument callable returning a fresh iterable of ``str`` each time.
          fingerprint: A fixed fingerprint string, a callable computing one, or None to hash every
            document (the right choice for finite local corpora).
        """
        self.name = name
        self._documents = documents
        self._fingerprint = fingerprint

    def __iter__(self) -> Iterator[str]:
        for index, doc in enumerate(self._documents()):
            if not isinstance(doc, str):
                raise TypeError(
                    f"Corpus {self.name!r}: document {index} is {type(doc).__name__}, expected str"
                )
            yield doc

    def __repr__(self) -> str:
        return f"Corpus({self.name!r})"

    @functools.cached_property
    def fingerprint(self) -> str:
        if isinstance(self._fingerprint, str):
            return self._fingerprint
        if self._fingerprint is not None:
            return self._fingerprint()
        return hash_documents(self)

    @property
    def label(self) -> str:
        return f"{self.name}@{self.fingerprint}"

    def head(self, n_docs: int) -> Corpus:
        """The first ``n_docs`` documents, as a corpus of its own."""
        if n_docs < 0:
            raise ValueError(f"Corpus {self.name!r}: head() needs n_docs >= 0, got {n_docs}")
        return Corpus(f"{self.name}[:{n_docs}]", lambda: itertools.islice(self, n_docs))

    def stats(self) -> dict[str, int]:
        """Number of documents and characters (a cheap size estimate: tokens ≈ chars / 4)."""
        n_docs = n_chars = 0
        for doc in self:
            n_docs += 1
            n_chars += len(doc)
        return {"documents": n_docs, "chars": n_chars}

    # ------------------------------------------------------------------ sources
    @classmethod
    def from_texts(cls, texts: Iterable[str], name: str = "texts") -> Corpus:
        """A corpus over an in-memory sequence of strings (copied into a tuple)."""
        docs = tuple(texts)
        return cls(name, lambda: docs)

    @classmethod
    def from_files(
        cls,
        patterns: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        split: str = "file",
        encoding: str = "utf-8",
        name: str | None = None,
    ) -> Corpus:
        """Text files: one document per file, or per blank-line-separated paragraph block.

        Args:
          patterns: File paths, directories (every ``.txt``/``.md``/``.rst`` file below them) or
            glob patterns (``**`` recursive); matched files are read in sorted order.
          split: "file" (one document per file) or "paragraph" (blocks separated by blank lines).
          encoding: Text encoding; undecodable files raise ``ValueError`` naming the file.
          name: Corpus name; defaults to ``"files:" + patterns``.
        """
        if split not in ("file", "paragraph"):
            raise ValueError(f"split must be 'file' or 'paragraph', got {split!r}")
        paths = _expand(patterns, suffixes=(".txt", ".md", ".rst"))

        def read(path: str) -> Iterator[str]:
            text = _read_text(path, encoding)
            if split == "file":
                if text.strip():
                    yield text
                return
            for block in re.split(r"\n[ \t]*\n", text):
                if block.strip():
                    yield block.strip("\n")

        return cls._from_paths(name or f"files:{_pattern_name(patterns)}", paths, read, split)

    @classmethod
    def from_jsonl(
        cls,
        patterns: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        field: str = "text",
        name: str | None = None,
    ) -> Corpus:
        """JSON-lines files (optionally ``.gz``): one document per line, taken from ``field``.

        Blank lines are skipped; a line that is not a JSON object or lacks ``field`` raises
        ``ValueError`` naming the file, the line number and the field.
        """
        paths = _expand(patterns, suffixes=(".jsonl", ".jsonl.gz"))

        def read(path: str) -> Iterator[str]:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{line_no}: invalid JSON ({e})") from None
                    if not isinstance(record, dict) or field not in record:
                        raise ValueError(f"{path}:{line_no}: no field {field!r} in this record")
                    if not isinstance(record[field], str):
                        kind = type(record[field]).__name__
                        raise ValueError(f"{path}:{line_no}: field {field!r} is {kind}, not str")
                    yield record[field]

        return cls._from_paths(name or f"jsonl:{_pattern_name(patterns)}", paths, read, field)

    @classmethod
    def from_hf(
        cls,
        dataset: str,
        split: str = "train",
        *,
        config: str | None = None,
        field: str = "text",
        revision: str | None = None,
    ) -> Corpus:
        """A Hugging Face Hub dataset, streamed (needs the optional ``datasets`` package).

        The fingerprint hashes the specification (dataset, config, split, field, revision), not the
        content, which is never downloaded in full; pin ``revision`` for exact reproducibility.
        """
        spec = f"hf:{dataset}" + (f":{config}" if config else "") + f":{split}"

        def documents() -> Iterator[str]:
            try:
                datasets = importlib.import_module("datasets")
            except ImportError:
                raise ImportError(
                    f"Corpus {spec!r} needs the optional 'datasets' package: pip install datasets"
                ) from None
            stream = datasets.load_dataset(
                dataset, config, split=split, streaming=True, revision=revision
            )
            for index, record in enumerate(stream):
                if field not in record:
                    raise ValueError(f"Corpus {spec!r}: record {index} has no field {field!r}")
                yield record[field]

        key = json.dumps([dataset, config, split, field, revision])
        fingerprint = "spec-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        return cls(spec, documents, fingerprint)

    @classmethod
    def _from_paths(cls, name: str, paths: list[str], read: _FileReader, option: str) -> Corpus:
        def documents() -> Iterator[str]:
            for path in paths:
                yield from read(path)

        def fingerprint() -> str:  # file bytes, not paths: moving the data keeps the fingerprint
            digest = hashlib.sha256(option.encode())
            for path in paths:
                file_digest = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        file_digest.update(chunk)
                digest.update(file_digest.digest())
            return digest.hexdigest()[:16]

        return cls(name, documents, fingerprint)


def hash_documents(documents: Iterable[str]) -> str:
    """A 16-hex-digit SHA-256 of a sequence of documents (length-prefixed, so boundaries count)."""
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()[:16]


def _pattern_name(patterns) -> str:
    if isinstance(patterns, (str, os.PathLike)):
        return os.fspath(patterns)
    return ",".join(os.fspath(p) for p in patterns)


def _expand(patterns, suffixes: tuple[str, ...]) -> list[str]:
    """Sorted, de-duplicated files matched by paths, directories or glob patterns."""
    items = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
    if not items:
        raise ValueError("No file patterns given")
    found: list[str] = []
    for item in map(os.fspath, items):
        if os.path.isdir(item):
            matches = [
                os.path.join(root, f)
                for root, _, files in os.walk(item)
                for f in files
                if f.endswith(suffixes)
            ]
        else:
            matches = [p for p in glob.glob(item, recursive=True) if os.path.isfile(p)]
        if not matches:
            raise FileNotFoundError(f"No files match {item!r}")
        found.extend(sorted(matches))
    return list(dict.fromkeys(found))


def _read_text(path: str, encoding: str) -> str:
    try:
        with open(path, encoding=encoding) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid {encoding} text ({e})") from None


# ---------------------------------------------------------------------------------------------
# The offline default corpus and specs


def default_corpus(
    *,
    min_chars: int = 200,
    comments: bool = True,
    packages: Sequence[str] = (),
    prose: bool = False,
) -> Corpus:
    """The offline default corpus: English text available on any machine with CPython.

    See ``data.offline.offline_documents`` for what it holds. With ``prose``, the English prose of
    ``data.prose`` (Debian packages: a book, a dictionary, quotations) is mixed in evenly, so every
    stretch of the corpus (its start for training, its end for held-out text) is about half prose;
    the name then ends in ``+prose``. The fingerprint starts with the Python (and package)
    versions, e.g. ``py3.11.7-<hash>``, since the text changes between releases. The documents are
    built once per process (a few seconds) and cached.
    """
    packages = tuple(packages)
    docs = offline.offline_documents(min_chars=min_chars, comments=comments, packages=packages)
    name, tag = offline.offline_name(packages), offline.offline_version_tag(packages)
    if prose:
        docs = interleave(docs, prose_documents())
        name, tag = name + "+prose", tag + "+prose"
    return Corpus(name, lambda: docs, tag + "-" + hash_documents(docs))


def interleave(first: Sequence[str], second: Sequence[str]) -> tuple[str, ...]:
    """Both document lists merged evenly by characters: the next document comes from the list
    that has used the smaller share of its characters so far (ties: ``first``). Order within
    each list is kept."""
    lists = (first, second)
    totals = [max(1, sum(map(len, docs))) for docs in lists]
    used, index, out = [0, 0], [0, 0], []
    while index[0] < len(first) or index[1] < len(second):
        shares = [used[k] / totals[k] if index[k] < len(lists[k]) else float("inf") for k in (0, 1)]
        k = 0 if shares[0] <= shares[1] else 1
        out.append(lists[k][index[k]])
        used[k] += len(out[-1])
        index[k] += 1
    return tuple(out)


def load_corpus(
    spec: str | os.PathLike | Corpus | Sequence[str] | None = None, **options
) -> Corpus:
    """A corpus from a specification.

    * ``None`` or ``"default"``: ``default_corpus()`` (options: ``min_chars``, ``comments``);
      ``"default+prose"`` mixes in the Debian prose (``data/prose.py``); ``"default+deps"`` adds
      ``DEPENDENCY_PACKAGES``, ``"default+numpy"`` the named packages (combinable with ``+``).
    * a ``Corpus``: returned as is; a list/tuple of ``str`` that are not all existing paths:
      ``Corpus.from_texts``.
    * ``"hf:<dataset>[:<config>]:<split>"``: ``Corpus.from_hf`` (options: ``field``, ``revision``).
    * paths or globs ending in ``.jsonl`` / ``.jsonl.gz``: ``Corpus.from_jsonl`` (``field``).
    * other paths, directories or globs: ``Corpus.from_files`` (``split``, ``encoding``).
    """
    if spec is None:
        return default_corpus(**options)
    if isinstance(spec, str) and (spec == "default" or spec.startswith("default+")):
        extra = [p for p in spec.split("+")[1:] if p]
        options.setdefault("prose", "prose" in extra)
        deps = offline.DEPENDENCY_PACKAGES
        packages = [q for p in extra if p != "prose" for q in (deps if p == "deps" else [p])]
        return default_corpus(packages=options.pop("packages", packages), **options)
    if isinstance(spec, Corpus):
        return spec
    if isinstance(spec, (list, tuple)):
        if spec and all(isinstance(s, (str, os.PathLike)) and _looks_like_path(s) for s in spec):
            return _load_paths(list(spec), options)
        return Corpus.from_texts(spec, **options)
    spec = os.fspath(spec)
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if len(parts) == 2:
            return Corpus.from_hf(parts[0], parts[1], **options)
        if len(parts) == 3:
            return Corpus.from_hf(parts[0], parts[2], config=parts[1], **options)
        raise ValueError(f"Bad corpus spec {spec!r}: expected 'hf:<dataset>[:<config>]:<split>'")
    return _load_paths([spec], options)


def as_corpus(corpus: Corpus | Iterable[str] | str | os.PathLike | None) -> Corpus:
    """A ``Corpus`` as is; ``None``, a spec string or a path through ``load_corpus``; any other
    iterable of ``str`` as ``Corpus.from_texts``."""
    if isinstance(corpus, Corpus):
        return corpus
    if corpus is None or isinstance(corpus, (str, os.PathLike)):
        return load_corpus(corpus)
    return Corpus.from_texts(corpus)


def _looks_like_path(item) -> bool:
    text = os.fspath(item)
    return os.path.exists(text) or bool(glob.glob(text, recursive=True))


def _load_paths(paths: list, options: dict) -> Corpus:
    names = [os.fspath(p) for p in paths]
    if all(n.endswith((".jsonl", ".jsonl.gz")) for n in names):
        return Corpus.from_jsonl(names if len(names) > 1 else names[0], **options)
    return Corpus.from_files(names if len(names) > 1 else names[0], **options)
