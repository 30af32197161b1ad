"""Activation stores: an on-disk shard cache served by step, and a shuffle buffer for streams.

``ActivationCache.batches(batch_size, seed)`` is a ``BatchSource`` (see ``train/sources.py``): batch
``step`` is the same rows whenever it is asked for, so a resumed run replays an uninterrupted one.

On-disk cache layout (``ActivationCache``)::

    cache_dir/manifest.json            header + list of complete shards (atomically rewritten)
    cache_dir/shard_000000.s0.npy      rows of site 0 (written to a temp name, then os.replace)
    cache_dir/shard_000000.s1.npy      rows of site 1 (transcoder targets), if any

A shard is complete once it is listed in the manifest; after a crash, temp files and shard
files missing from the manifest are removed, and appending continues at row ``n_rows`` (so a
harvester that restarts from ``cache.n_rows`` leaves no duplicates or gaps).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from gemma_scope_pz.io import write_atomically
from gemma_scope_pz.train.sources import batch_indices

MANIFEST = "manifest.json"
FORMAT = "gemma_scope_pz.activation_cache"
_HEADER_KEYS = (
    "model_name",
    "sites",
    "widths",
    "dtype",
    "normalization",
    "corpus",
    "context_length",
)


# --------------------------------------------------------------------------- shuffle buffer
class ShuffleBuffer:
    """Mixes a stream of activation batches through an in-memory buffer of ``capacity`` rows.

    Each output batch takes ``batch_size`` uniformly random rows of the buffer and refills
    their slots with the next incoming rows, so tokens of one document are spread over many
    batches. Deterministic given the seed and the input stream (but not random-access: use
    :class:`ActivationCache` for exactly resumable training).
    """

    def __init__(
        self, source: Iterator[np.ndarray], *, capacity: int, batch_size: int, seed: int = 0
    ):
        if capacity < batch_size:
            raise ValueError(f"ShuffleBuffer: capacity {capacity} < batch_size {batch_size}")
        self.source, self.capacity, self.batch_size = iter(source), capacity, batch_size
        self.rng = np.random.default_rng(seed)
        self.buffer: np.ndarray | None = None
        self.pending = np.zeros((0, 0), np.float32)
        self.filled = 0

    def _take(self, n: int) -> np.ndarray | None:
        while self.pending.shape[0] < n:
            try:
                nxt = np.asarray(next(self.source))
            except StopIteration:
                return None
            self.pending = nxt if self.pending.size == 0 else np.concatenate([self.pending, nxt])
        rows, self.pending = self.pending[:n], self.pending[n:]
        return rows

    def __iter__(self) -> Iterator[np.ndarray]:
        first = self._take(self.capacity)
        if first is None:
            raise ValueError(f"ShuffleBuffer: the source has fewer than {self.capacity} rows")
        self.buffer = first.copy()
        while True:
            slots = self.rng.choice(self.capacity, self.batch_size, replace=False)
            batch = self.buffer[slots].copy()
            refill = self._take(self.batch_size)
            yield batch
            if refill is None:
                return
            self.buffer[slots] = refill


# --------------------------------------------------------------------------- on-disk cache
def _atomic_json(path: str, obj: Any) -> None:
    write_atomically(path, json.dumps(obj, indent=1))


class ActivationCache:
    """A directory of ``.npy`` activation shards plus a manifest (see the module docstring).

    Attributes:
      path: The cache directory.
      header: ``model_name``, ``sites`` (list), ``widths`` (list, one per site), ``dtype``,
        ``normalization``, ``corpus``, ``context_length``.
      shards: List of ``{"name": str, "rows": int}`` of complete shards.
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any], shards: list[dict]):
        self.path, self.header, self.shards = os.fspath(path), header, shards
        self._mmaps: dict[tuple[int, int], np.ndarray] = {}

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
    ) -> ActivationCache:
        """Opens a cache for appending, creating it or resuming after a crash.

        Raises:
          ValueError: if an existing cache was written for another model, site(s) or shape
            (the message names both).
        """
        path = os.fspath(path)
        header = {
            "model_name": model_name,
            "sites": list(sites),
            "widths": [int(w) for w in widths],
            "dtype": str(np.dtype(dtype)),
            "normalization": normalization,
            "corpus": corpus,
            "context_length": int(context_length),
        }
        if len(header["sites"]) != len(header["widths"]):
            raise ValueError(f"ActivationCache {path}: {len(sites)} sites but {len(widths)} widths")
        os.makedirs(path, exist_ok=True)
        if not os.path.exists(os.path.join(path, MANIFEST)):
            cache = cls(path, header, [])
            cache._write_manifest()
        else:
            cache = cls.open(path)
            for key in _HEADER_KEYS:
                if cache.header.get(key) != header[key]:
                    raise ValueError(
                        f"ActivationCache {path}: existing cache has {key}={cache.header.get(key)!r} "
                        f"(model {cache.header.get('model_name')!r}, sites {cache.header.get('sites')}) "
                        f"but {key}={header[key]!r} was requested (model {model_name!r}, "
                        f"sites {list(sites)})"
                    )
        cache._remove_strays()
        return cache

    @classmethod
    def open(cls, path: str | os.PathLike) -> ActivationCache:
        """Opens an existing cache for reading."""
        path = os.fspath(path)
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.exists(manifest_path):
            raise FileNotFoundError(f"ActivationCache: no {MANIFEST} in {path}")
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"ActivationCache: {manifest_path} is not a {FORMAT} manifest")
        return cls(path, manifest["header"], list(manifest["shards"]))

    def _write_manifest(self) -> None:
        _atomic_json(
            os.path.join(self.path, MANIFEST),
            {"format": FORMAT, "version": 1, "header": self.header, "shards": self.shards},
        )

    def _remove_strays(self) -> None:
        listed = {self._file(i, s) for i in range(len(self.shards)) for s in range(self.n_sites)}
        for name in os.listdir(self.path):
            if name == MANIFEST:
                continue
            if ".tmp" in name or (name.startswith("shard_") and name not in listed):
                os.remove(os.path.join(self.path, name))

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
        """Writes one shard (one ``[n, width]`` array per site) and records it in the manifest."""
        if len(arrays) != self.n_sites:
            raise ValueError(
                f"ActivationCache.append: expected {self.n_sites} arrays, got {len(arrays)}"
            )
        n = arrays[0].shape[0]
        index = len(self.shards)
        for site, (array, width) in enumerate(zip(arrays, self.header["widths"], strict=True)):
            array = np.ascontiguousarray(array, dtype=self.header["dtype"])
            if array.shape != (n, width):
                raise ValueError(
                    f"ActivationCache.append: site {self.header['sites'][site]!r} array has shape "
                    f"{array.shape}, expected ({n}, {width})"
                )
            final = os.path.join(self.path, self._file(index, site))
            tmp = f"{final}.tmp.{os.getpid()}.npy"
            np.save(tmp, array, allow_pickle=False)
            os.replace(tmp, final)
        self.shards.append({"name": f"shard_{index:06d}", "rows": int(n)})
        self._write_manifest()

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
