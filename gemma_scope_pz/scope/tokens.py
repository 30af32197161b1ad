"""Which token positions count: the one token mask used by metrics, evaluation, examples and harvest.

A position counts when it holds a real document token: not padding, not the beginning-of-sequence
token (BOS, which Gemma turns into a huge-norm attention sink), and not one of the optional
``special_ids`` (e.g. the chat turn markers ``<start_of_turn>``/``<end_of_turn>``).

"BOS" means both the first real (non-pad) position of a row, whatever its id (the model treats
position 0 as a sink even without a BOS token), and any token equal to ``bos_id``. Rows may be left-
or right-padded; pads are recognised by ``pad_id`` anywhere in the row. ``exclude_prefix`` further
drops the first real positions after BOS (e.g. a fixed chat-template prefix).

NumPy input gives a NumPy mask (host code, no device round trip); anything else, including traced
values inside ``jax.jit``, gives a ``jax.Array``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from gemma_scope_pz.models.special_tokens import BOS_ID, END_OF_TURN_ID, PAD_ID, START_OF_TURN_ID

TURN_MARKER_IDS = (START_OF_TURN_ID, END_OF_TURN_ID)


def token_mask(
    tokens,
    *,
    bos_id: int | None = BOS_ID,
    pad_id: int | None = PAD_ID,
    exclude_bos: bool = True,
    special_ids: Sequence[int] = (),
    exclude_prefix: int = 0,
):
    """Bool mask, True where a token counts (see the module docstring).

    Args:
      tokens: Int token ids ``[..., seq]`` (a NumPy array, a JAX array or nested lists).
      bos_id: The BOS id; None when the vocabulary has none (then only position 0 is BOS).
      pad_id: The padding id; None when ``tokens`` holds no padding.
      exclude_bos: Drop the first real position of each row and every ``bos_id`` token.
      special_ids: Further ids that never count, e.g. ``TURN_MARKER_IDS``.
      exclude_prefix: Also drop this many real positions after BOS.

    Returns:
      A bool array of ``tokens``' shape (NumPy for NumPy input, else ``jax.Array``).
    """
    xp = np if isinstance(tokens, np.ndarray | list | tuple) else jnp
    tokens = xp.asarray(tokens)
    if tokens.ndim == 0 or not xp.issubdtype(tokens.dtype, xp.integer):
        raise ValueError(
            f"token_mask: tokens must be integer ids [..., seq], got {tokens.dtype}{tokens.shape}"
        )
    if exclude_prefix < 0:
        raise ValueError(f"token_mask: exclude_prefix must be >= 0, got {exclude_prefix}")
    real = xp.ones(tokens.shape, bool) if pad_id is None else tokens != pad_id
    position = xp.cumsum(real, axis=-1) - 1  # position among the row's real tokens
    first_counted = exclude_prefix + (1 if exclude_bos else 0)
    mask = real & (position >= first_counted)
    if exclude_bos and bos_id is not None:
        mask = mask & (tokens != bos_id)
    if len(special_ids):
        mask = mask & ~xp.isin(tokens, xp.asarray(list(special_ids), tokens.dtype))
    return mask
