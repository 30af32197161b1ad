"""The trainer's data-source protocol: ``batch_at(step) -> x`` or ``(x_in, x_out)``.

Training reads its data by step index, so a run resumed at step ``s`` replays exactly the batches an
uninterrupted run would have seen. Anything with a ``batch_at(step)`` method is a ``BatchSource``;
``as_source`` turns the other forms the trainer accepts into one::

    source = as_source(x, batch_size=4096, seed=0)          # [n, d_in] array, shuffled per epoch
    source = as_source((x_in, x_out), batch_size=4096)      # transcoder pairs
    source = as_source(lambda step: make_batch(step))       # a function of the step
    source = as_source(iter(batches), replay=4)             # a stream (exact only if it replays)
    source = cache.batches(4096, seed=0)                    # an ActivationCache (train/store.py)

``ShuffleBuffer`` mixes a stream of activation rows into batches (not addressable by step).

Batches of epoch ``e`` follow a permutation of all rows drawn from ``np.random.default_rng([seed, e])``
(``batch_indices``); a batch that crosses an epoch boundary takes the tail of one permutation and the
head of the next. Array and cache sources share this rule, so both give the same batches for the same
rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

Batch = Any  # an array [batch, d_in], or a pair (x_in [batch, d_in], x_out [batch, d_out])


@runtime_checkable
class BatchSource(Protocol):
    """Data for the trainer, addressed by step.

    ``batch_at(step)`` returns the batch of training step ``step``: a ``[batch_size, d_in]`` float
    array (autoencoders) or a pair ``(x_in, x_out)`` (transcoders). Calling it again with the same
    step must give the same batch wherever exact resumption matters.
    """

    def batch_at(self, step: int) -> Batch: ...


# --------------------------------------------------------------------------- shuffled row order
@functools.lru_cache(maxsize=2)
def _permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(n_rows)
    perm.flags.writeable = False
    return perm


def batch_indices(step: int, batch_size: int, n_rows: int, seed: int) -> np.ndarray:
    """Row indices of batch ``step`` under per-epoch permutations seeded by ``(seed, epoch)``."""
    if n_rows <= 0:
        raise ValueError("batch_indices: the data set has no rows")
    start = step * batch_size
    parts, need = [], batch_size
    while need > 0:
        epoch, offset = divmod(start, n_rows)
        take = _permutation(n_rows, seed, epoch)[offset : offset + need]
        parts.append(take)
        need -= take.size
        start += take.size
    return np.concatenate(parts)


# --------------------------------------------------------------------------- the sources
class ArraySource:
    """In-memory arrays served as ``batch_at(step)``, shuffled per epoch (see ``batch_indices``).

    Attributes:
      x_in: ``[n, d_in]`` inputs.
      x_out: ``[n, d_out]`` targets, or ``None`` (autoencoder).
      batch_size: Rows per batch.
      seed: Shuffle seed.
    """

    def __init__(self, x_in, x_out=None, *, batch_size: int, seed: int = 0):
        self.x_in = np.asarray(x_in)
        self.x_out = None if x_out is None else np.asarray(x_out)
        if self.x_in.ndim != 2:
            raise ValueError(f"ArraySource: x_in must be [n, d], got shape {self.x_in.shape}")
        if self.x_out is not None and self.x_out.shape[0] != self.x_in.shape[0]:
            raise ValueError(
                f"ArraySource: x_in has {self.x_in.shape[0]} rows but x_out {self.x_out.shape[0]}"
            )
        if int(batch_size) < 1:
            raise ValueError(f"ArraySource: batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed = int(batch_size), int(seed)

    @property
    def n_rows(self) -> int:
        return self.x_in.shape[0]

    def batch_at(self, step: int) -> Batch:
        """Batch ``step``: an array, or ``(x_in, x_out)`` for transcoders."""
        idx = batch_indices(step, self.batch_size, self.n_rows, self.seed)
        if self.x_out is None:
            return self.x_in[idx]
        return self.x_in[idx], self.x_out[idx]


class CallableSource:
    """A function of the step, ``fn(step) -> batch``, as a ``BatchSource``.

    Attributes:
      fn: The function.
    """

    def __init__(self, fn: Callable[[int], Batch]):
        self.fn = fn

    def batch_at(self, step: int) -> Batch:
        return self.fn(step)


class IteratorSource:
    """A stream of batches as a ``BatchSource``: batch ``i`` is the ``i``-th item of the stream.

    The stream only goes forward, so each batch is held until it is no longer needed: the first
    ``replay`` batches stay (the trainer reads them twice: once to estimate the normaliser, once to
    train), later ones are dropped once a later step is asked for. A resumed run re-reads and drops
    the batches before its start step, so resuming is exact only if the stream replays the same
    batches.

    Attributes:
      position: Number of items taken from the stream so far.
      replay: How many leading batches are kept for a second read.
    """

    def __init__(self, batches: Iterable[Batch], *, replay: int = 0):
        self._iterator = iter(batches)
        self._held: dict[int, Batch] = {}
        self.position = 0
        self.replay = int(replay)

    def batch_at(self, step: int) -> Batch:
        while self.position <= step:
            try:
                self._held[self.position] = next(self._iterator)
            except StopIteration:
                raise ValueError(f"train: the data iterator ended before step {step}") from None
            self.position += 1
        if step not in self._held:
            raise ValueError(f"train: iterator data cannot go back to step {step}")
        batch = self._held[step]
        if step >= self.replay:
            for old in [s for s in self._held if s <= step]:
                del self._held[old]
        return batch


def as_source(data: Any, *, batch_size: int | None = None, seed: int = 0, replay: int = 0):
    """``data`` as a ``BatchSource``.

    Args:
      data: A ``BatchSource`` (returned as is); an array ``[n, d_in]`` or a pair of arrays
        ``(x_in, x_out)`` (an ``ArraySource``, which needs ``batch_size``); a callable
        ``batch_at(step)`` (a ``CallableSource``); or any other iterable of batches (an
        ``IteratorSource``).
      batch_size: Rows per batch, for arrays.
      seed: Shuffle seed, for arrays.
      replay: Leading batches an iterator must serve twice (the trainer's normaliser-estimation
        batches).

    Raises:
      ValueError: for arrays without ``batch_size``; TypeError for data of no accepted form.
    """
    if isinstance(data, BatchSource):
        return data
    arrays = _as_arrays(data)
    if arrays is not None:
        if batch_size is None:
            raise ValueError("as_source: arrays need a batch_size")
        return ArraySource(*arrays, batch_size=batch_size, seed=seed)
    if callable(data):
        return CallableSource(data)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, dict)):
        return IteratorSource(data, replay=replay)
    raise TypeError(
        f"train: data of type {type(data).__name__} is not a batch source (expected an object "
        "with batch_at(step), an array, a pair (x_in, x_out), a function of the step or an "
        "iterator of batches)"
    )


def _as_arrays(data: Any) -> tuple | None:
    """``(x_in,)`` or ``(x_in, x_out)`` when ``data`` is an array or a pair of arrays."""
    if hasattr(data, "shape") and hasattr(data, "dtype"):
        return (data,)
    if isinstance(data, tuple) and len(data) == 2 and all(hasattr(a, "shape") for a in data):
        return data
    return None


# --------------------------------------------------------------------------- streams
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
