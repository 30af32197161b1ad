"""Packing documents into fixed-shape, BOS-led token contexts (and batches of them).

Each document is tokenized on the host and cut into contexts of ``context_len`` tokens that all start
with BOS and never mix two documents; a document's tail is padded (or dropped)::

    contexts = pack_contexts(load_corpus(None), tokenizer, 128)         # int32 [128] each
    held_out = corpus_contexts(tokenizer, None, 8, from_end=True)       # int32 [8, 128]
    mask = real_token_mask(held_out, tokenizer.pad_id)                  # False at BOS and pads
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from gemma_scope_pz.data.corpus import Corpus, as_corpus
from gemma_scope_pz.scope.tokens import token_mask


def text_tokenizer(tokenizer: Any) -> Any:
    """``tokenizer`` if it has ``encode``/``bos_id``/``pad_id``, else wrapped by ``as_tokenizer``."""
    if all(hasattr(tokenizer, name) for name in ("encode", "bos_id", "pad_id")):
        return tokenizer
    from gemma_scope_pz.models.tokenizer import as_tokenizer

    return as_tokenizer(tokenizer)


def pack_contexts(
    docs: Iterable[str],
    tokenizer: Any,
    context_len: int,
    *,
    add_bos: bool = True,
    tail: str = "pad",
) -> Iterator[np.ndarray]:
    """Cuts documents into int32 contexts ``[context_len]``, one document per context.

    Every context holds tokens of a single document: ``[BOS, t_i, ..., t_{i+context_len-2}]``
    (without ``add_bos``, ``context_len`` document tokens). Documents are never glued together;
    later contexts of a long document restart with BOS (the text before it is not seen).

    Args:
      docs: Documents (``str``), e.g. a ``Corpus``.
      tokenizer: Anything with ``encode(text, add_bos=False) -> list[int]``, ``bos_id`` and
        ``pad_id`` (a ``Gemma3Tokenizer``); other tokenizers, such as the ``gemma`` library's
        ``gm.text.Gemma3Tokenizer``, are wrapped with ``models.tokenizer.as_tokenizer``.
      context_len: Tokens per context, BOS included.
      add_bos: Start every context with ``tokenizer.bos_id``.
      tail: What to do with a document's last, short piece: "pad" (fill up with ``pad_id``) or
        "drop" (discard it).

    Use ``real_token_mask`` for the positions that hold document tokens.
    """
    if tail not in ("pad", "drop"):
        raise ValueError(f"tail must be 'pad' or 'drop', got {tail!r}")
    n_text = context_len - 1 if add_bos else context_len
    if n_text < 1:
        raise ValueError(f"context_len={context_len} leaves no room for document tokens")
    tokenizer = text_tokenizer(tokenizer)
    pad_id = int(tokenizer.pad_id)
    for doc in docs:
        ids = np.asarray(tokenizer.encode(doc, add_bos=False), dtype=np.int32)
        if add_bos and ids.size and ids[0] == tokenizer.bos_id:
            ids = ids[1:]  # tokenizers that add BOS regardless
        n_full = ids.size // n_text
        n_rows = n_full + (tail == "pad" and ids.size % n_text > 0)
        if n_rows == 0:
            continue
        text = np.full(n_rows * n_text, pad_id, dtype=np.int32)
        text[: min(ids.size, text.size)] = ids[: text.size]
        rows = text.reshape(n_rows, n_text)
        if add_bos:
            rows = np.concatenate([np.full((n_rows, 1), tokenizer.bos_id, np.int32), rows], axis=1)
        yield from rows


def corpus_contexts(
    tokenizer: Any,
    corpus: Corpus | Iterable[str] | str | None = None,
    n_contexts: int = 8,
    *,
    context_len: int = 128,
    from_end: bool = False,
) -> np.ndarray:
    """The first ``n_contexts`` packed contexts of a corpus, int32 ``[n, context_len]``.

    With ``from_end`` the documents are read last to first: for a corpus whose beginning was
    harvested for training (the tour, short runs), this gives held-out evaluation text.
    """
    corpus = as_corpus(corpus)
    docs = list(corpus)
    if from_end:
        docs.reverse()
    rows = list(itertools.islice(pack_contexts(docs, tokenizer, context_len), n_contexts))
    if not rows:
        raise ValueError(f"Corpus {corpus.name!r} yielded no tokens")
    return np.stack(rows)


def real_token_mask(
    tokens: np.ndarray, pad_id: int, *, has_bos: bool = True, bos_id: int | None = None
) -> np.ndarray:
    """Boolean mask of the document tokens of packed contexts: False at BOS (position 0, with
    ``has_bos``) and at padding; ``scope.tokens.token_mask`` with the packing's conventions.
    With ``bos_id`` (contexts of ``pack_concatenated``), every BOS token is False too."""
    return np.asarray(
        token_mask(np.asarray(tokens), bos_id=bos_id, pad_id=int(pad_id), exclude_bos=has_bos)
    )


PACKINGS: tuple[str, ...] = ("document", "concat")


def pack_concatenated(
    docs: Iterable[str], tokenizer: Any, context_len: int, *, tail: str = "pad"
) -> Iterator[np.ndarray]:
    """Packs documents back to back into int32 contexts ``[context_len]`` with no padding inside.

    The token stream is ``BOS doc_0 BOS doc_1 ...`` (one BOS before every document) cut into
    contexts that each start with BOS: a context beginning at a document start uses that
    document's BOS; one beginning inside a document gets a BOS prepended (the rest of the document
    follows without the text before it). This is how SAELens packs (``concat_and_batch_sequences``
    with a BOS at each context start and BOS as the document separator). Attention is causal over
    the whole context, so a token also sees the earlier documents of its context: our model has
    no segment mask. Only the last context can hold padding (``tail="pad"``) or is dropped
    (``tail="drop"``). ``real_token_mask(..., bos_id=tokenizer.bos_id)`` marks the document tokens.
    """
    if tail not in ("pad", "drop"):
        raise ValueError(f"tail must be 'pad' or 'drop', got {tail!r}")
    if context_len < 2:
        raise ValueError(f"context_len={context_len} leaves no room for document tokens")
    tokenizer = text_tokenizer(tokenizer)
    bos, pad_id = int(tokenizer.bos_id), int(tokenizer.pad_id)
    pending: list[np.ndarray] = []  # the stream not yet cut, each piece starting with BOS or not
    n_pending = 0
    for doc in docs:
        ids = np.asarray(tokenizer.encode(doc, add_bos=False), dtype=np.int32)
        if ids.size and ids[0] == bos:
            ids = ids[1:]
        if not ids.size:
            continue
        pending.append(np.concatenate([[bos], ids]).astype(np.int32))
        n_pending += ids.size + 1
        while n_pending >= context_len:
            context, pending = _cut(np.concatenate(pending), context_len, bos)
            n_pending = sum(p.size for p in pending)
            yield context
    stream = np.concatenate(pending) if pending else np.zeros(0, np.int32)
    while stream.size:
        context, rest = _cut(stream, context_len, bos)
        stream = rest[0] if rest else np.zeros(0, np.int32)
        if context.size < context_len:
            if tail == "drop" or context.size <= 1:
                return
            context = np.concatenate([context, np.full(context_len - context.size, pad_id)])
        yield context.astype(np.int32)


def _cut(stream: np.ndarray, context_len: int, bos: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The first context of ``stream`` (BOS-led) and the rest (as a one-piece list)."""
    if stream[0] != bos:
        stream = np.concatenate([[bos], stream]).astype(np.int32)
    rest = stream[context_len:]
    return stream[:context_len], ([rest] if rest.size else [])


def packed_contexts(
    docs: Iterable[str],
    tokenizer: Any,
    context_len: int,
    packing: str = "document",
    *,
    add_bos: bool = True,
    tail: str = "pad",
) -> Iterator[np.ndarray]:
    """``pack_contexts`` (``packing="document"``) or ``pack_concatenated`` (``"concat"``, which
    needs ``add_bos``: BOS separates its documents)."""
    if packing == "document":
        return pack_contexts(docs, tokenizer, context_len, add_bos=add_bos, tail=tail)
    if packing == "concat":
        if not add_bos:
            raise ValueError("packing='concat' needs add_bos=True (BOS separates documents)")
        return pack_concatenated(docs, tokenizer, context_len, tail=tail)
    raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")


def batch_contexts(
    contexts: Iterable[np.ndarray], batch_size: int, context_len: int, pad_id: int
) -> Iterator[np.ndarray]:
    """Stacks contexts into ``[batch_size, context_len]`` int32 batches; the last is filled up with
    all-pad rows (which ``real_token_mask`` masks out entirely)."""
    iterator = iter(contexts)
    while chunk := list(itertools.islice(iterator, batch_size)):
        batch = np.full((batch_size, context_len), pad_id, dtype=np.int32)
        batch[: len(chunk)] = np.stack(chunk)
        yield batch
