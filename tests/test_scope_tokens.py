"""The one token mask: BOS (by position and by id), padding (left or right), special ids, prefix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_scope_pz.scope.tokens import TURN_MARKER_IDS, token_mask

BOS, PAD = 2, 0


def _reference(row, *, exclude_bos=True, special=(), prefix=0):
    """Loop-by-loop definition: real tokens, minus BOS (first real position or BOS id), minus
    special ids, minus ``prefix`` real positions after BOS."""
    out, seen = [], 0
    for t in row:
        if t == PAD:
            out.append(False)
            continue
        counted = seen >= prefix + (1 if exclude_bos else 0)
        counted &= not (exclude_bos and t == BOS) and t not in special
        out.append(counted)
        seen += 1
    return out


ROWS = np.array(
    [
        [BOS, 5, 7, 9, PAD, PAD],  # right-padded
        [PAD, PAD, BOS, 105, 8, 106],  # left-padded, turn markers
        [4, 5, 6, 7, 8, 9],  # no BOS id: position 0 still excluded
        [PAD] * 6,  # all padding
        [BOS, 3, BOS, 3, 3, 3],  # a second BOS never counts
    ],
    np.int32,
)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"exclude_bos": False},
        {"special_ids": TURN_MARKER_IDS},
        {"exclude_prefix": 2},
        {"exclude_prefix": 1, "exclude_bos": False, "special_ids": (3,)},
    ],
)
def test_matches_the_loop_definition(kwargs):
    want = [
        _reference(
            row,
            exclude_bos=kwargs.get("exclude_bos", True),
            special=kwargs.get("special_ids", ()),
            prefix=kwargs.get("exclude_prefix", 0),
        )
        for row in ROWS.tolist()
    ]
    host = token_mask(ROWS, **kwargs)
    assert isinstance(host, np.ndarray) and host.dtype == bool
    np.testing.assert_array_equal(host, want)
    traced = jax.jit(lambda t: token_mask(t, **kwargs))(jnp.asarray(ROWS))
    assert isinstance(traced, jax.Array)
    np.testing.assert_array_equal(np.asarray(traced), want)


def test_defaults_and_other_inputs():
    np.testing.assert_array_equal(token_mask(ROWS[:2]), [[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(token_mask([BOS, 5, 6]), [False, True, True])
    # No padding id: a 0 is an ordinary token; custom BOS id.
    np.testing.assert_array_equal(
        token_mask(np.array([[7, 0, 1, 7]]), bos_id=7, pad_id=None), [[0, 1, 1, 0]]
    )


def test_bad_input():
    with pytest.raises(ValueError, match=r"integer ids .*float32\(2,\)"):
        token_mask(np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="exclude_prefix must be >= 0, got -1"):
        token_mask(ROWS, exclude_prefix=-1)
