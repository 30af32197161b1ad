"""Token id arrays: the one range check before the model, and padding of ragged rows.

Kept free of the model and the tokenizer so that both (and ``models.inputs``) can use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_scope_pz.models.special_tokens import PAD_ID

__all__ = ["check_token_ids", "pad_rows"]


def check_token_ids(tokens: Any, vocab_size: int, *, what: str = "tokens") -> np.ndarray:
    """``tokens`` as an int32 numpy array, after checking every id is in ``[0, vocab_size)``.

    The one check used before running the model (forward, generate, capture, harvest): out of
    range ids would otherwise be silently clamped to the last embedding row by XLA.

    Raises:
      TypeError: The ids are not integers.
      ValueError: An id is outside ``[0, vocab_size)``; the message gives the id and where.
    """
    array = np.asarray(tokens)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{what}: token ids must be integers, got dtype {array.dtype}")
    if array.size:
        low, high = array.min(), array.max()
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            where = tuple(int(i) for i in np.argwhere(array == bad)[0])
            raise ValueError(
                f"{what}: token id {int(bad)} at index {where} is outside the vocabulary "
                f"[0, {vocab_size})"
            )
    return array.astype(np.int32)


def pad_rows(
    rows: Sequence[Sequence[int]],
    *,
    pad_id: int = PAD_ID,
    side: str = "right",
    max_len: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stacks ragged id rows into ``(tokens int32 [batch, seq], mask bool [batch, seq])``.

    Args:
      rows: One list of ids per row (each at least one id).
      pad_id: The fill value.
      side: "right" (real tokens keep positions 0..n-1) or "left" (all rows end together, as
        generation wants).
      max_len: Pad or truncate (keeping the start) to this width; default the longest row.
    """
    if side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {side!r}")
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be positive, got {max_len}")
    if len(rows) == 0:
        raise ValueError("got an empty batch (no rows)")
    width = max_len if max_len is not None else max(len(r) for r in rows)
    rows = [list(r)[:width] for r in rows]
    lengths = np.array([len(r) for r in rows])
    columns = np.arange(width)[None, :]
    if side == "right":
        mask = columns < lengths[:, None]
    else:
        mask = columns >= (width - lengths)[:, None]
    tokens = np.full((len(rows), width), pad_id, np.int32)
    ids = np.fromiter((i for r in rows for i in r), np.int64, int(lengths.sum()))
    if ids.size and (ids.min() < np.iinfo(np.int32).min or ids.max() > np.iinfo(np.int32).max):
        raise ValueError(
            f"token id {ids.max() if ids.max() > 0 else ids.min()} does not fit in int32"
        )
    tokens[mask] = ids
    return tokens, mask
