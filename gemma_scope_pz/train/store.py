"""The on-disk activation cache: shards of harvested rows, served to the trainer by step.

``ActivationCache.batches(batch_size, seed)`` is a ``BatchSource`` (see ``train/sources.py``): batch
``step`` is the same rows whenever it is asked for, so a resumed run replays an uninterrupted one.

Layout::

    cache_dir/manifest.json            header + complete shards + pending files (atomically rewritten)
    cache_dir/.lock                    the writer's lock (``io.FileLock``: holds the writer's pid)
    cache_dir/shard_000000.s0.npy      rows of site 0 (written as ``….tmp``, then renamed)
    cache_dir/shard_000000.s1.npy      rows of site 1 (transcoder targets), if any

One writer at a time: a second one is refused with the holder's pid. A shard is complete once it
is listed in the manifest; its file names are recorded as pending before it is written, so after a
crash the next writer removes exactly those files (never any other file in the folder) and
appending continues at row ``n_rows`` (a harvester that restarts from ``cache.n_rows`` leaves no
duplicates or gaps). The header says what the rows are: the model's weights fingerprint, sites,
corpus and harvest settings (``IDENTITY_KEYS``); a cache holding other data is refused.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_scope_pz.io import FileLock, write_atomically
from gemma_scope_pz.train.sources import batch_indices

MANIFEST = "manifest.json"
LOCK = ".lock"
FORMAT = "gemma_scope_pz.activation_cache"
# Header keys that must match for a cache to be resumed: what the rows are. ``model_name`` is only
# compared when no weights fingerprint is given.
IDENTITY_KEYS = (
    "model_fingerprint",
    "sites",
    "widths",
    "dtype",
    "normalization",
    "corpus",
    "context_length",
    "add_bos",
    "tail",
    "packing",
    "model_dtype",
    "cpu_matmul",
)
# What a header written before a key existed means by its absence.
HEADER_DEFAULTS = {"packing": "document", "model_dtype": "float32", "cpu_matmul": "float32"}
_SHARD_NAME = re.compile(r"shard_\d{6}\.s\d+\.npy")
_TMP = ".tmp"


def _save_npy(path: str, array: np.ndarray) -> None:
    """Writes ``path + ".tmp"`` then renames it; a full disk is one clear ``OSError``."""
    tmp = path + _TMP
    try:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(e.errno, f"no space left on device while writing {path}") from e
        raise


# --------------------------------------------------------------------------- on-disk cache
class ActivationCache:
    """A directory of ``.npy`` activation shards plus a manifest (see the module docstring).

    A cache opened with ``create_or_resume`` is a writer: it holds the folder's lock until
    ``close()`` (or the end of a ``with`` block, or of the process). ``open`` gives a reader.

    Attributes:
      path: The cache directory.
      header: What the rows are (see ``IDENTITY_KEYS``) plus ``model_name`` for messages.
      shards: List of ``{"name": str, "rows": int}`` of complete shards.
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any], shards: list[dict]):
        self.path, self.header, self.shards = os.fspath(path), header, shards
        self._mmaps: dict[tuple[int, int], np.ndarray] = {}
        self._lock: FileLock | None = None
        self._pending: list[str] = []

    # ------------------------------------------------------------ create / open / resume
    @classmethod
    def create_or_resume(
        cls,
        path: str | os.PathLike,
        *,
        model_name: str,
        sites: Sequence[str],
        widths: Sequence[int],
        dtype: str = "float32",
        normalization: str = "none",
        corpus: str = "",
        context_length: int = 0,
        model_fingerprint: str = "",
        add_bos: bool = True,
        tail: str = "pad",
        packing: str = "document",
        model_dtype: str = "float32",
        cpu_matmul: str = "float32",
    ) -> ActivationCache:
        """Opens a cache for appending (a writer), creating it or resuming after a crash.

        ``model_fingerprint`` (``models.fingerprint.weights_fingerprint``) identifies the weights;
        without one, the ``model_name`` stands in for it.

        Raises:
          LockHeld: if another process is writing this cache (the message names its pid).
          ValueError: if an existing cache holds other data (another model's weights, site(s),
            corpus, shape or harvest settings: the message names the differing key and both
            values), or the folder holds shard files that no manifest lists.
        """
        path = os.fspath(path)
        header = {
            "model_name": model_name,
            "model_fingerprint": model_fingerprint,
            "sites": list(sites),
            "widths": [int(w) for w in widths],
            "dtype": str(np.dtype(dtype)),
            "normalization": normalization,
            "corpus": corpus,
            "context_length": int(context_length),
            "add_bos": bool(add_bos),
            "tail": tail,
            "packing": packing,
            "model_dtype": model_dtype,
            "cpu_matmul": cpu_matmul,
        }
        if len(header["sites"]) != len(header["widths"]):
            raise ValueError(f"ActivationCache {path}: {len(sites)} sites but {len(widths)} widths")
        os.makedirs(path, exist_ok=True)
        lock = FileLock(os.path.join(path, LOCK), what="activation cache")
        lock.acquire()
        try:
            cache = cls._create_or_check(path, header)
            cache._lock = lock
            cache._remove_unfinished()
        except BaseException:
            lock.release()
            raise
        return cache

    @classmethod
    def _create_or_check(cls, path: str, header: dict[str, Any]) -> ActivationCache:
        if not os.path.exists(os.path.join(path, MANIFEST)):
            foreign = sorted(n for n in os.listdir(path) if _SHARD_NAME.fullmatch(n))
            if foreign:
                raise ValueError(
                    f"ActivationCache {path}: the folder holds {foreign[0]} but no {MANIFEST}: "
                    "files this package did not write; choose an empty folder"
                )
            cache = cls(path, header, [])
            cache._write_manifest()
            return cache
        cache = cls.open(path)
        keys = IDENTITY_KEYS + (() if header["model_fingerprint"] else ("model_name",))
        for key in keys:
            existing = cache.header.get(key, HEADER_DEFAULTS.get(key))
            if existing != header[key]:
                raise ValueError(
                    f"ActivationCache {path}: existing cache has {key}={existing!r} "
                    f"(model {cache.header.get('model_name')!r}, sites {cache.header.get('sites')}) "
                    f"but {key}={header[key]!r} was requested (model {header['model_name']!r}, "
                    f"sites {header['sites']}); use another folder or delete this one"
                )
        return cache

    @classmethod
    def open(cls, path: str | os.PathLike) -> ActivationCache:
        """Opens an existing cache for reading (no lock: complete shards are never changed)."""
        path = os.fspath(path)
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(f"ActivationCache: no {MANIFEST} in {path}")
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"ActivationCache: {manifest_path} is not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"ActivationCache: {manifest_path} is not a {FORMAT} manifest")
        cache = cls(path, manifest["header"], list(manifest["shards"]))
        cache._pending = list(manifest.get("pending", []))
        return cache

    def close(self) -> None:
        """Releases the writer's lock (a reader: nothing to do); the cache stays readable."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> ActivationCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_manifest(self, pending: Sequence[str] = ()) -> None:
        manifest = {
            "format": FORMAT,
            "version": 2,
            "header": self.header,
            "shards": self.shards,
            "pending": list(pending),
        }
        write_atomically(os.path.join(self.path, MANIFEST), json.dumps(manifest, indent=1))

    def _remove_unfinished(self) -> None:
        """Removes the files of a shard whose writer died (listed as pending), and only those."""
        pending = self._pending
        for name in pending:
            for stray in (name, name + _TMP):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.path, stray))
        if pending:
            self._write_manifest()
        self._pending = []

    # ------------------------------------------------------------ writing
    @property
    def n_sites(self) -> int:
        return len(self.header["sites"])

    @property
    def n_rows(self) -> int:
        """Rows in complete shards (where a restarted harvester should resume)."""
        return sum(int(s["rows"]) for s in self.shards)

    def _file(self, shard: int, site: int) -> str:
        return f"shard_{shard:06d}.s{site}.npy"

    def append(self, *arrays: np.ndarray) -> None:
        """Writes one shard (one ``[n, width]`` array per site) and records it in the manifest.

        The shard's file names are recorded as pending before any is written, so a writer that
        dies mid-shard leaves only files the next writer knows to remove. On an error (a full disk:
        ``OSError`` "no space left on device while writing FILE") this shard's files are removed
        and the cache stays as it was.

        Raises:
          RuntimeError: if this cache was opened for reading or closed.
          FileExistsError: if a file of the new shard exists though no manifest lists it.
          ValueError: for a wrong number of arrays or a wrong shape (naming the site).
        """
        if self._lock is None:
            raise RuntimeError(
                f"ActivationCache {self.path}: not open for writing (use create_or_resume)"
            )
        arrays = self._checked(arrays)
        index = len(self.shards)
        names = [self._file(index, site) for site in range(self.n_sites)]
        for name in names:
            if os.path.exists(os.path.join(self.path, name)):
                raise FileExistsError(
                    f"ActivationCache {self.path}: {name} exists but no manifest lists it; "
                    "not overwriting a file this cache did not write"
                )
        self._write_manifest(pending=names)
        entry = {"name": f"shard_{index:06d}", "rows": int(arrays[0].shape[0])}
        try:
            for name, array in zip(names, arrays, strict=True):
                _save_npy(os.path.join(self.path, name), array)
            self.shards.append(entry)
            self._write_manifest()
        except BaseException:
            if self.shards and self.shards[-1] is entry:
                self.shards.pop()
            for name in names:
                for stray in (name, name + _TMP):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(self.path, stray))
            with contextlib.suppress(OSError):
                self._write_manifest()  # pending cleared; if this fails too, the next writer clears it
            raise

    def _checked(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(arrays) != self.n_sites:
            raise ValueError(
                f"ActivationCache.append: expected {self.n_sites} arrays, got {len(arrays)}"
            )
        n = np.shape(arrays[0])[0]
        out = []
        for site, (array, width) in enumerate(zip(arrays, self.header["widths"], strict=True)):
            array = np.ascontiguousarray(array, dtype=self.header["dtype"])
            if array.shape != (n, width):
                raise ValueError(
                    f"ActivationCache.append: site {self.header['sites'][site]!r} array has shape "
                    f"{array.shape}, expected ({n}, {width})"
                )
            out.append(array)
        return out

    # ------------------------------------------------------------ reading
    def _mmap(self, shard: int, site: int) -> np.ndarray:
        key = (shard, site)
        if key not in self._mmaps:
            self._mmaps[key] = np.load(
                os.path.join(self.path, self._file(shard, site)), mmap_mode="r", allow_pickle=False
            )
        return self._mmaps[key]

    def read_rows(self, indices: np.ndarray, sites: Sequence[int] | None = None) -> tuple:
        """Rows at global ``indices`` (any order), one float32 array per site (or per index in
        ``sites``, positions into ``header["sites"]``)."""
        indices = np.asarray(indices, np.int64)
        sites = range(self.n_sites) if sites is None else list(sites)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_rows):
            raise IndexError(
                f"ActivationCache {self.path}: row index out of range [0, {self.n_rows})"
            )
        bounds = np.cumsum([0] + [int(s["rows"]) for s in self.shards])
        shard_of = np.searchsorted(bounds, indices, side="right") - 1
        widths = self.header["widths"]
        out = [np.empty((indices.size, widths[site]), np.float32) for site in sites]
        for shard in np.unique(shard_of):
            where = np.nonzero(shard_of == shard)[0]
            local = indices[where] - bounds[shard]
            order = np.argsort(local, kind="stable")
            for column, site in enumerate(sites):
                out[column][where[order]] = self._mmap(int(shard), site)[local[order]]
        return tuple(out)

    def batches(
        self, batch_size: int, seed: int = 0, sites: Sequence[str] | None = None
    ) -> CacheBatches:
        """Random-access batches for the trainer (a ``BatchSource``), of all sites or of ``sites``.

        Raises:
          ValueError: if a site in ``sites`` is not in this cache (the message names both).
        """
        return CacheBatches(self, batch_size, seed, sites=sites)


class CacheBatches:
    """``batch_at(step)`` over an :class:`ActivationCache`: an array for one site, a tuple for more.

    Rows are shuffled per epoch as in ``train.sources.batch_indices``.

    Attributes:
      cache: The cache.
      batch_size: Rows per batch.
      seed: Shuffle seed.
      sites: The sites served, in order (default: all of the cache's sites).
    """

    def __init__(
        self,
        cache: ActivationCache,
        batch_size: int,
        seed: int = 0,
        *,
        sites: Sequence[str] | None = None,
    ):
        self.cache, self.batch_size, self.seed = cache, int(batch_size), int(seed)
        stored = list(cache.header["sites"])
        self.sites = stored if sites is None else list(sites)
        missing = [s for s in self.sites if s not in stored]
        if missing or not self.sites:
            raise ValueError(f"Activation cache {cache.path} holds sites {stored}, not {missing}")
        self._columns = [stored.index(s) for s in self.sites]

    def batch_at(self, step: int):
        """Batch ``step``: an array (one site) or a tuple of arrays (several sites)."""
        indices = batch_indices(step, self.batch_size, self.cache.n_rows, self.seed)
        rows = self.cache.read_rows(indices, self._columns)
        return rows[0] if len(rows) == 1 else rows
