"""The one SAE forward math (gemma_scope_pz.scope.sae) against numpy formulas, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_scope_pz.scope import sae


def numpy_topk(z: np.ndarray, k: int) -> np.ndarray:
    """Exactly k per row; a stable sort of -z puts the lowest index first among equal values."""
    out = np.zeros_like(z)
    flat, flat_out = z.reshape(-1, z.shape[-1]), out.reshape(-1, z.shape[-1])
    for row in range(flat.shape[0]):
        idx = np.argsort(-flat[row], kind="stable")[:k]
        flat_out[row, idx] = np.maximum(flat[row, idx], 0.0)
    return out


def test_pre_activations_decode_skip_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5)).astype(np.float32)
    w_enc, b_enc = rng.normal(size=(5, 7)).astype(np.float32), rng.normal(size=7).astype(np.float32)
    w_dec, b_dec = rng.normal(size=(7, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    w_skip = rng.normal(size=(5, 4)).astype(np.float32)
    z = sae.pre_activations(x, w_enc, b_enc)
    np.testing.assert_allclose(z, x @ w_enc + b_enc, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        sae.decode(z, w_dec, b_dec), (x @ w_enc + b_enc) @ w_dec + b_dec, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(sae.skip(x, w_skip), x @ w_skip, rtol=1e-5, atol=1e-5)
    # bfloat16 operands, float32 accumulation: close to float32, result is float32
    z16 = sae.pre_activations(x, w_enc, b_enc, dtype="bfloat16")
    assert z16.dtype == jnp.float32
    np.testing.assert_allclose(z16, x @ w_enc + b_enc, rtol=0.05, atol=0.1)
    with pytest.raises(ValueError, match="dtype must be one of"):
        sae.decode(z, w_dec, b_dec, dtype="float16")


def test_jumprelu_is_strict_and_per_latent():
    threshold = np.array([0.5, 1.0, 1.5], np.float32)
    z = np.array([[0.5, 1.0, 1.5], [0.6, 0.9, 3.0], [-1.0, 2.0, 1.5001]], np.float32)
    want = np.where(z > threshold, z, 0.0)
    np.testing.assert_array_equal(sae.jumprelu(z, threshold), want)
    np.testing.assert_array_equal(want[0], 0.0)  # z == threshold is not kept
    np.testing.assert_array_equal(sae.activate(z, "jumprelu", threshold=threshold), want)
    np.testing.assert_array_equal(sae.activate(z, "relu"), np.maximum(z, 0.0))


def test_topk_matches_numpy_on_random_rows():
    z = np.random.default_rng(1).normal(size=(3, 4, 16)).astype(np.float32)
    np.testing.assert_array_equal(sae.topk(z, 5), numpy_topk(z, 5))
    np.testing.assert_array_equal(sae.activate(z, "topk", k=5), numpy_topk(z, 5))
    one_row = z[0, 0]
    np.testing.assert_array_equal(sae.topk(one_row, 3), numpy_topk(one_row[None], 3)[0])


def test_topk_ties_keep_exactly_k_lowest_index_first():
    z = np.array(
        [
            [1.0, 2.0, 2.0, 2.0, 0.5, 2.0],  # four tied maxima, k=2: indices 1 and 2
            [3.0, 3.0, 3.0, 3.0, 3.0, 3.0],  # all tied: the first k
            [0.0, 0.0, 5.0, 0.0, 0.0, 0.0],  # tie among the zeros for the second slot
        ],
        np.float32,
    )
    f = np.asarray(sae.topk(z, 2))
    np.testing.assert_array_equal(f, numpy_topk(z, 2))
    np.testing.assert_array_equal(f[0], [0, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(f[1], [3, 3, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(sae.topk_mask(z, 2)).sum(-1), 2)
    np.testing.assert_array_equal(sae.topk_indices(z, 2), [[1, 2], [0, 1], [2, 0]])


def test_topk_kept_negatives_become_zero_and_gradient_reaches_kept_only():
    z = jnp.asarray([[-3.0, -1.0, -2.0, 4.0]])
    np.testing.assert_array_equal(sae.topk(z, 2), [[0.0, 0.0, 0.0, 4.0]])
    grad = jax.grad(lambda v: jnp.sum(sae.topk(v, 2) * jnp.arange(1.0, 5.0)))(z)
    np.testing.assert_array_equal(grad, [[0.0, 0.0, 0.0, 4.0]])  # -1 kept but ReLU'd: no gradient


def test_topk_rejects_bad_k():
    z = jnp.ones((2, 4))
    for k in (0, 5):
        with pytest.raises(ValueError, match=f"topk needs 0 < k <= 4, got k={k}"):
            sae.topk(z, k)
    with pytest.raises(ValueError, match="activation 'topk' needs k"):
        sae.activate(z, "topk")
    with pytest.raises(ValueError, match="activation must be one of"):
        sae.activate(z, "gelu")
    with pytest.raises(ValueError, match="activation 'jumprelu' needs a threshold"):
        sae.activate(z, "jumprelu")


def test_batchtopk_threshold_and_kept_set_match_numpy():
    z = np.random.default_rng(2).normal(size=(8, 32)).astype(np.float32) + 1.0
    k = 3
    positive = np.maximum(z, 0.0)
    want_threshold = np.sort(positive.ravel())[::-1][k * 8 - 1]
    threshold = sae.batchtopk_threshold(z, k)
    assert threshold.shape == ()
    np.testing.assert_allclose(float(threshold), want_threshold)
    f = np.asarray(sae.batchtopk(z, k))
    want = np.where((positive >= want_threshold) & (positive > 0), positive, 0.0)
    np.testing.assert_array_equal(f, want)
    assert np.count_nonzero(f) == k * 8
    assert np.count_nonzero(f, axis=1).std() > 0  # per-row counts vary, the total is fixed
    np.testing.assert_array_equal(sae.activate(z, "batchtopk", k=k), want)
    # a given (running) threshold replaces the batch one
    np.testing.assert_array_equal(
        sae.activate(z, "batchtopk", k=k, threshold=jnp.asarray(1.5)),
        np.where(positive >= 1.5, positive, 0.0),
    )


def test_batchtopk_threshold_counts_rows_over_all_leading_axes_and_ties():
    z = np.zeros((2, 3, 4), np.float32)
    z[..., 0] = 2.0  # six rows, one large value each, all tied
    z[0, 0, 1] = 1.0
    # k=1 keeps 6 values: the six tied 2.0s, threshold 2.0
    assert float(sae.batchtopk_threshold(z, 1)) == 2.0
    np.testing.assert_array_equal(np.count_nonzero(np.asarray(sae.batchtopk(z, 1))), 6)
    # k=2 asks for 12 values but only 7 are positive: threshold 0, zeros are never kept
    assert float(sae.batchtopk_threshold(z, 2)) == 0.0
    np.testing.assert_array_equal(np.count_nonzero(np.asarray(sae.batchtopk(z, 2))), 7)


def test_encode_is_activate_of_pre_activations():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    w_enc, b_enc = rng.normal(size=(5, 9)).astype(np.float32), rng.normal(size=9).astype(np.float32)
    z = x @ w_enc + b_enc
    np.testing.assert_allclose(
        sae.encode(x, w_enc, b_enc, "topk", k=3), numpy_topk(z, 3), rtol=1e-5, atol=1e-5
    )
    threshold = np.full(9, 0.3, np.float32)
    np.testing.assert_allclose(
        sae.encode(x, w_enc, b_enc, "jumprelu", threshold=threshold),
        np.where(z > 0.3, z, 0.0),
        rtol=1e-5,
        atol=1e-5,
    )
