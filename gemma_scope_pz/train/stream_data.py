"""Where streamed batches come from: packed contexts, the refill schedule, the device refill and draw.

:class:`StreamConfig` sets how text becomes batches; :class:`ContextStream` serves the packed
contexts of refill ``r`` (the corpus restarts when it runs out); :func:`make_data_step` builds the
traceable refill-and-draw of one step (LM forward stopping after the deepest site, activations into
the ring buffer of :mod:`~gemma_scope_pz.train.buffer`, one draw of slots). The schedule (refill
``r`` takes contexts ``[r * n, (r + 1) * n)`` into chunk ``r % buffer_refills``; refills ``0 ..
buffer_refills - 1`` fill the buffer before step 0, then one at every step ``s > 0`` divisible by
``refill_every`` until the run is covered: :func:`refill_at`) is documented in
:mod:`~gemma_scope_pz.train.streaming`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma_scope_pz.data import packing
from gemma_scope_pz.data.corpus import Corpus
from gemma_scope_pz.scope.interventions import run_with_captures
from gemma_scope_pz.scope.sites import Site
from gemma_scope_pz.train import buffer as buffer_lib
from gemma_scope_pz.train.config import TrainConfig
from gemma_scope_pz.train.harvest import MODEL_DTYPES, check_corpus_ids

# Contexts per forward on a CPU (``StreamConfig.forward_contexts``): on the 2-core machines here
# the 270M forward to block 9 ran ~1,200 tokens/s in groups of 4 to 16 contexts of 128, ~870 at 32.
CPU_FORWARD_CONTEXTS = 8


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """How text becomes batches on the device.

    Attributes:
      context_len: Tokens per context, BOS included.
      contexts_per_refill: Contexts per forward pass (``None``: enough document tokens for
        ``refill_every`` batches, ``ceil(refill_every * batch_size / (context_len - 1))``).
      refill_every: Steps between refills.
      buffer_refills: Chunks in the ring buffer (refills mixed in every batch).
      seed: Seed of the slot draws.
      checkpoint_every: Checkpoint interval in steps (with a ``checkpoint_dir``).
      log_every: Metrics are read back and shown every this many steps.
      progress_bar: Show a tqdm bar (tokens/s, L0, FVU, dead fraction per dictionary).
      packing: "document" (one document per context, tails padded: ``pack_contexts``) or "concat"
        (documents back to back with a BOS each, no padding, as SAELens packs:
        ``pack_concatenated``; attention then crosses documents within a context).
      model_dtype: "float32", or "bfloat16" to run the LM forward with bfloat16 weights and
        activations (rows are stored as float32 for the dictionaries).
      drain: Stop refilling once the refills cover the run: the last refill is number
        ``ceil(steps / refill_every) - 1`` (from 0), so the model reads about as many tokens as
        the run trains on (with the default ``contexts_per_refill``); the steps after it draw
        from the buffer as it stands. False: a refill every ``refill_every`` steps to the end
        (``buffer_refills - 1`` more refills, whose rows are partly never drawn).
      forward_contexts: Contexts per LM forward within a refill: the refill's contexts go
        through one compiled forward in groups of this many (``None``: 8 on a CPU backend
        without a mesh, where small groups keep the activations in cache and ran ~1.4x faster
        per token than 32 or more; the whole refill at once elsewhere).
    """

    context_len: int = 128
    contexts_per_refill: int | None = None
    refill_every: int = 4
    buffer_refills: int = 8
    seed: int = 0
    checkpoint_every: int = 1000
    log_every: int = 50
    progress_bar: bool = True
    packing: str = "document"
    model_dtype: str = "float32"
    drain: bool = True
    forward_contexts: int | None = None

    def __post_init__(self):
        if self.packing not in packing.PACKINGS:
            raise ValueError(
                f"stream.packing must be one of {packing.PACKINGS}, got {self.packing!r}"
            )
        if self.model_dtype not in MODEL_DTYPES:
            raise ValueError(
                f"stream.model_dtype must be one of {MODEL_DTYPES}, got {self.model_dtype!r}"
            )
        for name in ("context_len", "refill_every", "buffer_refills", "checkpoint_every"):
            if int(getattr(self, name)) < (2 if name == "context_len" else 1):
                raise ValueError(f"stream.{name} must be >= 1 (context_len >= 2)")
        for name in ("contexts_per_refill", "forward_contexts"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"stream.{name} must be >= 1, got {getattr(self, name)}")

    def n_contexts(self, batch_size: int) -> int:
        """Contexts per refill."""
        if self.contexts_per_refill is not None:
            return int(self.contexts_per_refill)
        return math.ceil(self.refill_every * batch_size / (self.context_len - 1))

    def forward_group(self, n_contexts: int, mesh=None) -> int:
        """Contexts per forward for refills of ``n_contexts`` (``forward_contexts`` resolved)."""
        if self.forward_contexts is not None:
            if mesh is not None and self.forward_contexts < n_contexts:
                raise ValueError(
                    "stream.forward_contexts cannot split a refill on a mesh (its contexts are "
                    "already split over 'data'); leave it None"
                )
            return min(int(self.forward_contexts), n_contexts)
        if mesh is None and jax.default_backend() == "cpu":
            return min(CPU_FORWARD_CONTEXTS, n_contexts)
        return n_contexts

    def resume_keys(self) -> dict[str, Any]:
        """The fields a resumed run must share with the checkpoint."""
        keys = dataclasses.asdict(self)
        for operational in ("checkpoint_every", "log_every", "progress_bar"):
            del keys[operational]
        return keys


class ContextStream:
    """Packed contexts of a corpus in batches addressed by refill index (the corpus restarts when it
    runs out). Token ids are checked against the model's vocabulary.

    Attributes:
      corpus: The corpus.
      n_contexts: Contexts per batch.
      context_len: Tokens per context.
    """

    def __init__(
        self,
        corpus: Corpus,
        tokenizer: Any,
        n_contexts: int,
        context_len: int,
        vocab: int,
        packing_kind: str = "document",
    ):
        self.corpus, self.n_contexts, self.context_len = corpus, n_contexts, context_len
        self.packing = packing_kind
        self.tokenizer = packing.text_tokenizer(tokenizer)
        self.vocab = vocab
        self._iterator, self._position = None, 0

    def _contexts(self):
        while True:
            empty = True
            contexts = packing.packed_contexts(
                self.corpus, self.tokenizer, self.context_len, self.packing
            )
            for context in contexts:
                empty = False
                yield context
            if empty:
                raise ValueError(f"Corpus {self.corpus.name!r} yielded no tokens to stream")

    def tokens(self, refill: int) -> np.ndarray:
        """int32 ``[n_contexts, context_len]`` of refill ``refill``."""
        if self._iterator is None or refill < self._position:
            self._iterator, self._position = self._contexts(), 0
        while self._position < refill:
            for _ in range(self.n_contexts):
                next(self._iterator)
            self._position += 1
        batch = np.stack([next(self._iterator) for _ in range(self.n_contexts)])
        self._position += 1
        return check_corpus_ids(batch, self.vocab, self.corpus.name)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_id)

    @property
    def ignored_ids(self) -> tuple[int, ...]:
        """Token ids whose rows never enter the buffer: padding, and with "concat" packing BOS
        (the document separators); position 0 is always left out."""
        if self.packing == "concat":
            return (self.pad_id, int(self.tokenizer.bos_id))
        return (self.pad_id,)


# --------------------------------------------------------------------------- checks
def check_sites(model, configs: Mapping[str, TrainConfig]) -> dict[str, int]:
    """``{site: width}`` the dictionaries need, after checking each against the model."""
    if not configs:
        raise ValueError("train_streaming: no dictionaries to train")
    widths: dict[str, int] = {}
    for name, config in configs.items():
        sae = config.sae
        pairs = [("site_in", sae.site_in, sae.d_in)]
        if sae.is_transcoder:
            pairs.append(("site_out", sae.site_out, sae.out_dim))
        for field, site_name, width in pairs:
            if not site_name:
                raise ValueError(f"train_streaming: dictionary {name!r} has no sae.{field}")
            site = Site.parse(site_name)
            try:
                site.check(model.config)
            except ValueError as exc:
                raise ValueError(f"train_streaming: dictionary {name!r}: {exc}") from None
            if site.width(model.config) != width:
                raise ValueError(
                    f"train_streaming: dictionary {name!r} has width {width} for sae.{field}="
                    f"{site.name}, but the model's {site.name} has width {site.width(model.config)}"
                )
            widths[site.name] = width
    _check_shared(configs)
    return widths


def _check_shared(configs: Mapping[str, TrainConfig]) -> None:
    """The dictionaries of one stream agree on the batch size and the number of steps."""
    first = next(iter(configs.values()))
    for name, config in configs.items():
        for key, get in (
            ("batch_size", lambda c: c.run.batch_size),
            ("num_steps", lambda c: c.num_steps),
        ):
            if get(config) != get(first):
                raise ValueError(
                    f"train_streaming: dictionaries share one data stream, so {key} must agree: "
                    f"{name!r} has {get(config)}, another {get(first)}"
                )


def _site_of(config: TrainConfig, which: str) -> str:
    return Site.parse(config.sae.site_in if which == "in" else config.sae.site_out).name


# --------------------------------------------------------------------------- the device program
def make_data_step(
    sites: tuple[str, ...],
    stream: StreamConfig,
    pad_id: int | tuple[int, ...],
    batch_size: int,
    group: int | None = None,
):
    """``data_step(model, buffer, tokens, step, refill) -> (buffer, n_bad, slots)``: the refill
    (when ``refill``) and the draw of step ``step`` (traceable). Rows at position 0 and at the
    ids ``pad_id`` (one or several: ``ContextStream.ignored_ids``) are not valid. ``model`` comes
    already in ``stream.model_dtype`` (``train_streaming`` casts it once). A refill's forward runs
    ``group`` contexts at a time (``StreamConfig.forward_group``; None: all at once)."""
    ignored = (pad_id,) if isinstance(pad_id, int) else tuple(pad_id)

    def fill(model, buffer, tokens, chunk):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        rows = forward_rows(model, tokens, positions, sites, group)
        valid = positions > 0
        for token_id in ignored:
            valid &= tokens != token_id
        valid = valid.reshape(-1)
        return buffer_lib.write_chunk(buffer, chunk, rows, valid)

    def data_step(model, buffer, tokens, step, refill):
        chunk = (stream.buffer_refills - 1 + step // stream.refill_every) % stream.buffer_refills
        buffer, n_bad = jax.lax.cond(
            refill,
            lambda b: fill(model, b, tokens, chunk),
            lambda b: (b, jnp.zeros((), jnp.int32)),
            buffer,
        )
        slots = buffer_lib.draw_slots(buffer["valid"], stream.seed, step, batch_size)
        return buffer, n_bad, slots

    return fill, data_step


def forward_rows(model, tokens, positions, sites: tuple[str, ...], group: int | None = None):
    """``{site: float32 [n_contexts * context_len, width]}``: the LM forward on ``tokens``
    (stopping after the deepest site), ``group`` contexts at a time: one compiled forward looped
    over the whole groups (``lax.map``), plus one for a remainder (traceable)."""

    def forward(tok, pos):
        _, acts = run_with_captures(model, tok, pos, sites, stop_early=True)
        return {s: acts[s].reshape(-1, acts[s].shape[-1]).astype(jnp.float32) for s in sites}

    n, length = tokens.shape
    if group is None or group >= n:
        return forward(tokens, positions)
    whole = n // group * group
    grouped = (
        tokens[:whole].reshape(-1, group, length),
        positions[:whole].reshape(-1, group, length),
    )
    mapped = jax.lax.map(lambda tp: forward(*tp), grouped)
    rows = {s: a.reshape(-1, a.shape[-1]) for s, a in mapped.items()}
    if whole == n:
        return rows
    rest = forward(tokens[whole:], positions[whole:])
    return {s: jnp.concatenate([rows[s], rest[s]]) for s in sites}


def batch_of(buffer, slots, config: TrainConfig):
    x_in = buffer_lib.take_rows(buffer, _site_of(config, "in"), slots)
    if not config.sae.is_transcoder:
        return x_in, None
    return x_in, buffer_lib.take_rows(buffer, _site_of(config, "out"), slots)


def refill_at(step: int, stream: StreamConfig, num_steps: int) -> int | None:
    """Index of the refill done at ``step`` of a ``num_steps`` run (None: no refill there)."""
    if step == 0 or step % stream.refill_every:
        return None
    index = stream.buffer_refills - 1 + step // stream.refill_every
    if stream.drain and index >= -(-num_steps // stream.refill_every):
        return None
    return index
