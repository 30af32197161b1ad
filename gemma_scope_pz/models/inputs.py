"""The one input convention of the runners: text or token ids in, a padded ``[batch, seq]`` batch out.

``as_token_batch`` accepts what a notebook naturally has at hand:

* a string, or a list of strings (tokenized with the model's own tokenizer, BOS added);
* a list of ids (one prompt), or a list of lists of ids (ragged; padded here);
* a ``[seq]`` or ``[batch, seq]`` integer array (numpy or JAX).

It returns ``(tokens int32 [batch, seq], mask bool [batch, seq])`` with ``mask`` True on real
tokens. ``check_token_ids`` (from ``models.token_ids``) is the range check every runner applies.
``bucket_length`` and ``pad_columns`` round sequence lengths up to a few shapes so that a session
of prompts of varied lengths compiles a handful of programs, not one per length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_scope_pz.models.special_tokens import PAD_ID
from gemma_scope_pz.models.token_ids import check_token_ids, pad_rows

__all__ = [
    "MIN_BUCKET",
    "as_token_batch",
    "bucket_length",
    "check_token_ids",
    "pad_columns",
    "pad_rows",
    "tokenizer_of",
]

# The shortest bucket; lengths round up to the next power of two at or above it.
MIN_BUCKET = 16


def bucket_length(length: int, limit: int | None = None) -> int:
    """The padded length for ``length`` columns: the next power of two, at least ``MIN_BUCKET``.

    Never above ``limit`` (the model's context), and never below ``length`` itself.
    """
    if length < 1:
        raise ValueError(f"sequence length must be >= 1, got {length}")
    bucket = max(MIN_BUCKET, 1 << (length - 1).bit_length())
    if limit is not None and bucket > limit:
        return max(length, limit)
    return bucket


def pad_columns(tokens: np.ndarray, width: int, fill: int, *, side: str = "right") -> np.ndarray:
    """``tokens [batch, seq]`` widened to ``width`` columns with ``fill`` on ``side``."""
    extra = width - tokens.shape[1]
    if extra <= 0:
        return tokens
    pad = ((0, 0), (0, extra)) if side == "right" else ((0, 0), (extra, 0))
    return np.pad(tokens, pad, constant_values=fill)


_tokenizers: dict[str, Any] = {}


def tokenizer_of(model_or_tokenizer: Any) -> Any:
    """The tokenizer to use for text: given directly, or the one of the model's checkpoint.

    A model loaded with ``load_model`` remembers its ``source``; a model built in memory (or
    ``None``) gets the offline Gemma 3 tokenizer.
    """
    from gemma_scope_pz.models.tokenizer import load_tokenizer

    if model_or_tokenizer is None or hasattr(model_or_tokenizer, "body"):
        source = getattr(model_or_tokenizer, "source", None)
        if source is None:
            return load_tokenizer()
        if source not in _tokenizers:
            _tokenizers[source] = load_tokenizer(source)
        return _tokenizers[source]
    if callable(getattr(model_or_tokenizer, "encode", None)):
        return model_or_tokenizer  # a Gemma3Tokenizer or look-alike: encode(text, add_bos=...)
    return load_tokenizer(model_or_tokenizer)


def as_token_batch(
    inputs: Any,
    model_or_tokenizer: Any = None,
    *,
    pad_side: str = "right",
    add_bos: bool = True,
    pad_id: int = PAD_ID,
) -> tuple[np.ndarray, np.ndarray]:
    """Turns any accepted input (see the module docstring) into ``(tokens, mask)``.

    Args:
      inputs: A string, list of strings, list of ids, list of id lists, or an int array.
      model_or_tokenizer: Where the tokenizer for text comes from (``tokenizer_of``); unused
        for token ids.
      pad_side: Where ragged rows are padded: "right" or "left".
      add_bos: Prepend BOS when tokenizing text (ids are taken as given).
      pad_id: The padding id; in an array input, it marks the padding (``mask = tokens != pad``).

    Raises:
      TypeError: ``inputs`` is none of the accepted kinds.
      ValueError: An empty input, an empty row, or an array that is not 1-D or 2-D.
    """
    if isinstance(inputs, str):
        inputs = [inputs]
    if hasattr(inputs, "shape") and hasattr(inputs, "dtype"):
        return _from_array(np.asarray(inputs), pad_id)
    if not isinstance(inputs, Sequence) or len(inputs) == 0:
        raise ValueError(f"expected text or token ids, got an empty {type(inputs).__name__}")
    if all(isinstance(item, str) for item in inputs):
        tokenizer = tokenizer_of(model_or_tokenizer)
        rows = [tokenizer.encode(text, add_bos=add_bos) for text in inputs]
    elif all(_is_int(item) for item in inputs):
        rows = [list(inputs)]
    elif all(
        isinstance(item, Sequence | np.ndarray) and not isinstance(item, str) for item in inputs
    ):
        rows = [_id_row(item, row) for row, item in enumerate(inputs)]
    else:
        kinds = sorted({type(item).__name__ for item in inputs})
        raise TypeError(f"inputs mix {kinds}: pass text, ids, or lists of ids")
    if any(len(r) == 0 for r in rows):
        raise ValueError(f"row {next(i for i, r in enumerate(rows) if not r)} has no tokens")
    return pad_rows(rows, pad_id=pad_id, side=pad_side)


def _is_int(item: Any) -> bool:
    return isinstance(item, int | np.integer) and not isinstance(item, bool)


def _id_row(item: Any, row: int) -> list[int]:
    array = np.asarray(item)
    if array.ndim != 1 or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"row {row} is not a list of integer token ids (dtype {array.dtype})")
    return array.tolist()


def _from_array(array: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    if array.ndim == 1:
        array = array[None, :]
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"token array must be [seq] or [batch, seq], got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"token ids must be integers, got dtype {array.dtype}")
    info = np.iinfo(np.int32)
    if array.size and (array.min() < info.min or array.max() > info.max):
        bad = array.min() if array.min() < info.min else array.max()
        raise ValueError(f"token id {bad} does not fit in int32")
    return array.astype(np.int32), array != pad_id
