"""Harvesting activations for dictionary training: corpus → fixed-shape contexts → activation rows.

Documents are packed into BOS-led contexts of ``context_len`` tokens (``data/packing.py``).
Contexts go through the model in batches of a fixed shape ``[batch_size, context_len]``, so the jitted
``capture`` compiles once; the forward pass stops after the last block any site needs. BOS and
padding positions are dropped and the remaining positions are yielded as rows ``[n, width]`` per
site, in the same order for every site (so a transcoder's ``mlp_in`` and ``mlp_out`` rows are
aligned row for row)::

    for rows in harvest(model, tok, load_corpus(None), "blocks.9.resid_post", n_tokens=10**6):
        store.append(rows["blocks.9.resid_post"])

The order of rows is a deterministic function of the corpus, tokenizer and ``context_len``, so a
harvest restarted with ``start_row = rows_already_stored`` continues without gaps or duplicates.
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gemma_scope_pz.backend import cpu_matmul
from gemma_scope_pz.data import packing as packing_lib
from gemma_scope_pz.data.corpus import Corpus, as_corpus
from gemma_scope_pz.models.fingerprint import weights_fingerprint
from gemma_scope_pz.scope.interventions import capture
from gemma_scope_pz.scope.sites import Site


@dataclasses.dataclass(frozen=True)
class HarvestInfo:
    """Provenance of harvested activations, for a store's header.

    Attributes:
      model_name: The model's name (its config name unless given), for people to read.
      sites: Site names, in the order of the yielded arrays.
      widths: Width of each site.
      corpus_name: ``Corpus.name``.
      corpus_fingerprint: ``Corpus.fingerprint``.
      context_len: Tokens per context, BOS included.
      n_tokens: Rows requested (or, from ``harvest_array``, obtained).
      dtype: Dtype of the yielded rows.
      add_bos: Whether contexts start with BOS.
      tail: How document tails were handled ("pad" or "drop").
      model_fingerprint: ``models.fingerprint.weights_fingerprint`` of the model: the identity of
        the weights, which a cache of these rows is keyed by.
      packing: "document" or "concat" (see ``harvest``).
      model_dtype: Dtype the forward ran in ("float32" or "bfloat16").
      cpu_matmul: The CPU matmul mode of the harvesting process (``gemma_scope_pz.backend``;
        "float32" off the CPU).
    """

    model_name: str
    sites: tuple[str, ...]
    widths: tuple[int, ...]
    corpus_name: str
    corpus_fingerprint: str
    context_len: int
    n_tokens: int
    dtype: str = "float32"
    add_bos: bool = True
    tail: str = "pad"
    model_fingerprint: str = ""
    packing: str = "document"
    model_dtype: str = "float32"
    cpu_matmul: str = "float32"

    @property
    def corpus(self) -> str:
        """``"name@fingerprint"`` (``Corpus.label``)."""
        return f"{self.corpus_name}@{self.corpus_fingerprint}"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sites"], out["widths"] = list(self.sites), list(self.widths)
        return out

    def store_header(self) -> dict[str, Any]:
        """Keyword arguments describing the data for an activation store's header."""
        return {
            "model_name": self.model_name,
            "sites": list(self.sites),
            "widths": list(self.widths),
            "dtype": self.dtype,
            "corpus": self.corpus,
            "context_length": self.context_len,
            "model_fingerprint": self.model_fingerprint,
            "add_bos": self.add_bos,
            "tail": self.tail,
            "packing": self.packing,
            "model_dtype": self.model_dtype,
            "cpu_matmul": self.cpu_matmul,
        }


def harvest_info(
    model,
    corpus: Corpus,
    sites: str | Sequence[str],
    *,
    n_tokens: int,
    context_len: int = 128,
    dtype=np.float32,
    add_bos: bool = True,
    tail: str = "pad",
    model_name: str | None = None,
    packing: str = "document",
    model_dtype: str = "float32",
) -> HarvestInfo:
    """The ``HarvestInfo`` of a ``harvest`` call with the same arguments."""
    names = _site_names(sites)
    config = model.config
    return HarvestInfo(
        model_name=model_name or config.name,
        sites=names,
        widths=tuple(Site.parse(s).width(config) for s in names),
        corpus_name=corpus.name,
        corpus_fingerprint=corpus.fingerprint,
        context_len=int(context_len),
        n_tokens=int(n_tokens),
        dtype=np.dtype(dtype).name,
        add_bos=add_bos,
        tail=tail,
        model_fingerprint=weights_fingerprint(model),
        packing=packing,
        model_dtype=model_dtype,
        cpu_matmul=cpu_matmul() if jax.default_backend() == "cpu" else "float32",
    )


def harvest(
    model,
    tokenizer: Any,
    corpus: Corpus | Iterable[str] | str | None,
    sites: str | Sequence[str],
    *,
    n_tokens: int | None,
    context_len: int = 128,
    batch_size: int = 8,
    dtype=np.float32,
    add_bos: bool = True,
    tail: str = "pad",
    start_row: int = 0,
    progress: bool = True,
    packing: str = "document",
    model_dtype: str = "float32",
) -> Iterator[dict[str, np.ndarray]]:
    """Yields activation rows ``{site: [n, width]}`` per batch of contexts, until ``n_tokens``.

    One jitted ``capture`` per ``[batch_size, context_len]`` batch (one compilation), stopping after
    the last block needed; one device→host transfer per batch. The next batch is dispatched before
    the previous one is copied back, so host tokenization overlaps device compute. BOS and padding
    positions are dropped; all sites share the same rows (positions), in the same order.

    Args:
      model: A ``Gemma3LM``.
      tokenizer: See ``pack_contexts``.
      corpus: A ``Corpus``, any iterable of ``str``, or a ``load_corpus`` spec.
      sites: One site name or several (e.g. ``["blocks.5.mlp_in", "blocks.5.mlp_out"]``).
      n_tokens: Total rows wanted (counting from the corpus start, ``start_row`` included); None
        for the whole corpus. A corpus that runs out first gives fewer rows, with a warning.
      context_len: Tokens per context, BOS included.
      batch_size: Contexts per forward pass.
      dtype: Dtype of the yielded rows.
      add_bos, tail: See ``pack_contexts``.
      start_row: Skip the first rows (to resume a harvest); whole contexts before it are skipped
        without running the model.
      progress: Show a tqdm bar over tokens.
      packing: "document" (``pack_contexts``: one document per context, tails padded) or
        "concat" (``pack_concatenated``: documents back to back, no padding, as SAELens packs).
      model_dtype: "float32", or "bfloat16" to run the forward with bfloat16 weights and
        activations (``model_in_dtype``); the rows are cast to ``dtype`` either way.

    Raises:
      ValueError: if the corpus yields no tokens (the message names it), a token id is outside the
        model's vocabulary, or a site is unknown (the capture's error).
    """
    corpus = as_corpus(corpus)
    names = _site_names(sites)
    for name in names:
        Site.parse(name).check(model.config)
    if (n_tokens is not None and n_tokens < 0) or start_row < 0:
        raise ValueError(f"n_tokens and start_row must be >= 0, got {n_tokens}, {start_row}")
    if n_tokens is not None and start_row >= n_tokens:
        return
    tokenizer = packing_lib.text_tokenizer(tokenizer)
    mask = _mask_fn(tokenizer, add_bos, packing)
    contexts = packing_lib.packed_contexts(
        corpus, tokenizer, context_len, packing, add_bos=add_bos, tail=tail
    )
    contexts, skip = _skip_rows(contexts, start_row, mask)
    batches = packing_lib.batch_contexts(contexts, batch_size, context_len, int(tokenizer.pad_id))
    batches = _checked_ids(batches, model.config.vocab_size, corpus.name)
    model = model_in_dtype(model, model_dtype)
    done = start_row
    bar = tqdm(total=n_tokens, initial=start_row, unit="tok", disable=not progress, desc="harvest")
    try:
        for rows in _activation_rows(model, batches, names, mask, dtype):
            if skip:
                rows, skip = {k: v[skip:] for k, v in rows.items()}, 0
            if n_tokens is not None:
                rows = {k: v[: n_tokens - done] for k, v in rows.items()}
            n = len(rows[names[0]])
            if n:
                done += n
                bar.update(n)
                yield rows
            if n_tokens is not None and done >= n_tokens:
                return
    finally:
        bar.close()
    _check_count(corpus.name, done, n_tokens)


def _check_count(corpus_name: str, done: int, n_tokens: int | None) -> None:
    """No rows at all is an error; fewer than ``n_tokens`` a warning."""
    if done == 0:
        raise ValueError(f"Corpus {corpus_name!r} yielded no tokens to harvest")
    if n_tokens is not None and done < n_tokens:
        warnings.warn(
            f"Corpus {corpus_name!r} ran out after {done} of {n_tokens} requested rows",
            stacklevel=3,
        )


def _checked_ids(batches: Iterable[np.ndarray], vocab: int, corpus_name: str) -> Iterator:
    """``batches``, each checked by ``check_corpus_ids``."""
    for tokens in batches:
        yield check_corpus_ids(tokens, vocab, corpus_name)


def check_corpus_ids(tokens: np.ndarray, vocab: int, corpus_name: str) -> np.ndarray:
    """``tokens`` if its ids lie in ``[0, vocab)``, else a ``ValueError`` naming the corpus."""
    if tokens.min() < 0 or tokens.max() >= vocab:
        bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
        raise ValueError(
            f"Corpus {corpus_name!r}: token id {bad} is outside the model's "
            f"vocabulary [0, {vocab}) (wrong tokenizer?)"
        )
    return tokens


MODEL_DTYPES: tuple[str, ...] = ("float32", "bfloat16")


def model_in_dtype(model, model_dtype: str):
    """``model`` with every floating-point array (weights and constants) cast to ``model_dtype``,
    so its forward runs in that dtype throughout; the model itself for "float32"."""
    if model_dtype not in MODEL_DTYPES:
        raise ValueError(f"model_dtype must be one of {MODEL_DTYPES}, got {model_dtype!r}")
    if model_dtype == "float32":
        return model
    target = jnp.dtype(model_dtype)

    def cast(leaf):
        if isinstance(leaf, jax.Array | np.ndarray) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(leaf, target)
        return leaf

    return jax.tree_util.tree_map(cast, model)


def _mask_fn(tokenizer, add_bos: bool, kind: str):
    """``tokens -> bool mask`` of the rows kept (document tokens) for this packing."""
    pad_id = int(tokenizer.pad_id)
    bos_id = int(tokenizer.bos_id) if kind == "concat" else None
    return lambda tokens: packing_lib.real_token_mask(
        tokens, pad_id, has_bos=add_bos, bos_id=bos_id
    )


def _activation_rows(
    model, batches: Iterable[np.ndarray], names: tuple[str, ...], mask, dtype
) -> Iterator[dict[str, np.ndarray]]:
    """The document-token rows of each batch, ``{site: [n, width]}``; batch ``i + 1`` is dispatched
    to the device before batch ``i`` is copied back, so host work overlaps device compute."""
    pending = None  # (device activations, mask) of the batch dispatched last
    for tokens in batches:
        acts = capture(model, tokens, list(names), stop_early=True)
        submitted = (acts, mask(tokens))
        if pending is not None:
            yield _gather(jax.device_get(pending[0]), pending[1], names, dtype)
        pending = submitted
    if pending is not None:
        yield _gather(jax.device_get(pending[0]), pending[1], names, dtype)


def harvest_array(
    model,
    tokenizer: Any,
    corpus: Corpus | Iterable[str] | str | None,
    sites: str | Sequence[str],
    *,
    n_tokens: int | None,
    model_name: str | None = None,
    **options,
) -> tuple[dict[str, np.ndarray], HarvestInfo]:
    """``harvest`` collected into one array per site (for small runs), with its ``HarvestInfo``.

    ``options`` are those of ``harvest``; ``info.n_tokens`` is the number of rows obtained.
    """
    corpus = as_corpus(corpus)
    names = _site_names(sites)
    parts = list(harvest(model, tokenizer, corpus, names, n_tokens=n_tokens, **options))
    arrays = {name: np.concatenate([p[name] for p in parts]) for name in names}
    info_options = {
        k: options[k]
        for k in ("context_len", "dtype", "add_bos", "tail", "packing", "model_dtype")
        if k in options
    }
    info = harvest_info(
        model,
        corpus,
        names,
        n_tokens=len(arrays[names[0]]),
        model_name=model_name,
        **info_options,
    )
    return arrays, info


def _site_names(sites: str | Sequence[str]) -> tuple[str, ...]:
    names = (sites,) if isinstance(sites, str) else tuple(sites)
    if not names:
        raise ValueError("harvest needs at least one site")
    return tuple(dict.fromkeys(Site.parse(s).name for s in names))


def _gather(acts: dict, mask: np.ndarray, names: tuple[str, ...], dtype) -> dict[str, np.ndarray]:
    flat = mask.reshape(-1)
    return {
        name: np.asarray(acts[name]).reshape(flat.size, -1)[flat].astype(dtype, copy=False)
        for name in names
    }


def _skip_rows(
    contexts: Iterator[np.ndarray], start_row: int, mask
) -> tuple[Iterator[np.ndarray], int]:
    """Drops whole contexts lying before ``start_row``; returns the rest and the rows still to skip
    inside the first remaining context."""
    skipped = 0
    for context in contexts:
        n_real = int(mask(context).sum())
        if skipped + n_real > start_row:
            return itertools.chain([context], contexts), start_row - skipped
        skipped += n_real
    return iter(()), 0


_MOVED_TO_PACKING = (
    "pack_contexts",
    "corpus_contexts",
    "real_token_mask",
    "batch_contexts",
    "text_tokenizer",
)


def __getattr__(name: str):
    """Packing helpers moved to ``gemma_scope_pz.data.packing``; the old names keep working for
    one release, with a ``DeprecationWarning``."""
    if name in _MOVED_TO_PACKING:
        warnings.warn(
            f"gemma_scope_pz.train.harvest.{name} moved to gemma_scope_pz.data.packing.{name}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(packing_lib, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
