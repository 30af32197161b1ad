"""Metrics against direct numpy formulas (with masks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from gemma_scope_pz.scope import metrics

B, S, D, V = 3, 7, 5, 11


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, S, D)).astype(np.float32) + 3.0
    x_hat = x + 0.3 * rng.normal(size=(B, S, D)).astype(np.float32)
    mask = rng.random((B, S)) > 0.3
    mask[:, 0] = False  # BOS
    mask[0, 1] = True
    return x, x_hat, mask


def test_fvu(data):
    x, x_hat, mask = data
    sel, sel_hat = x[mask].astype(np.float64), x_hat[mask].astype(np.float64)
    want = ((sel - sel_hat) ** 2).sum() / ((sel - sel.mean(axis=0)) ** 2).sum()
    np.testing.assert_allclose(jax.jit(metrics.fvu)(x, x_hat, mask), want, rtol=1e-5)
    flat = x.reshape(-1, D).astype(np.float64)
    want_all = ((flat - x_hat.reshape(-1, D)) ** 2).sum() / ((flat - flat.mean(0)) ** 2).sum()
    np.testing.assert_allclose(metrics.fvu(x, x_hat), want_all, rtol=1e-5)
    assert float(metrics.fvu(x, x)) == 0.0
    named = pz.nx.wrap(jnp.asarray(x), "batch", "seq", "embedding")
    named_hat = pz.nx.wrap(jnp.asarray(x_hat).transpose(2, 0, 1), "embedding", "batch", "seq")
    np.testing.assert_allclose(metrics.fvu(named, named_hat, mask), want, rtol=1e-5)


def test_l0(data):
    _, _, mask = data
    rng = np.random.default_rng(1)
    latents = np.where(rng.random((B, S, 40)) < 0.2, rng.random((B, S, 40)), 0.0).astype(np.float32)
    want = np.count_nonzero(latents, axis=-1)[mask].mean()
    np.testing.assert_allclose(jax.jit(metrics.l0)(latents, mask), want, rtol=1e-6)
    np.testing.assert_allclose(metrics.l0(latents), np.count_nonzero(latents, -1).mean(), rtol=1e-6)


def numpy_log_softmax(z):
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cross_entropy(data):
    _, _, mask = data
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(B, S, V)).astype(np.float32) * 3
    tokens = rng.integers(0, V, size=(B, S)).astype(np.int32)
    lp = numpy_log_softmax(logits)
    nll, weight = 0.0, 0
    for b in range(B):
        for t in range(S - 1):
            if mask[b, t]:
                nll -= lp[b, t, tokens[b, t + 1]]
                weight += 1
    np.testing.assert_allclose(
        jax.jit(metrics.cross_entropy)(logits, tokens, mask), nll / weight, rtol=1e-5
    )
    # the last column of the mask is never used
    mask2 = mask.copy()
    mask2[:, -1] = ~mask2[:, -1]
    np.testing.assert_allclose(
        metrics.cross_entropy(logits, tokens, mask2), nll / weight, rtol=1e-5
    )
    all_nll = -np.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1).mean()
    np.testing.assert_allclose(metrics.cross_entropy(logits, tokens), all_nll, rtol=1e-5)


def test_kl(data):
    _, _, mask = data
    rng = np.random.default_rng(3)
    clean = rng.normal(size=(B, S, V)).astype(np.float32)
    other = clean + rng.normal(size=(B, S, V)).astype(np.float32)
    lp, lq = numpy_log_softmax(clean), numpy_log_softmax(other)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    np.testing.assert_allclose(
        jax.jit(metrics.kl_divergence)(clean, other, mask), kl[mask].mean(), rtol=1e-5
    )
    assert abs(float(metrics.kl_divergence(clean, clean, mask))) < 1e-6


def test_fvu_from_streamed_sums(data):
    x, x_hat, mask = data
    sel, sel_hat = x[mask].astype(np.float64), x_hat[mask].astype(np.float64)
    halves = np.array_split(np.arange(len(sel)), 2)  # two "batches" summed on the host
    sums = [
        (((sel[i] - sel_hat[i]) ** 2).sum(), sel[i].sum(0), (sel[i] ** 2).sum(), len(i))
        for i in halves
    ]
    sq_err, sum_x, sum_sq, n = (sum(parts) for parts in zip(*sums, strict=True))
    want = ((sel - sel_hat) ** 2).sum() / ((sel - sel.mean(axis=0)) ** 2).sum()
    assert metrics.fvu_from_sums(sq_err, sum_x, sum_sq, n) == pytest.approx(want, rel=1e-10)


def test_per_token_terms_and_prediction_mask(data):
    _, _, mask = data
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(B, S, V)).astype(np.float32)
    tokens = rng.integers(0, V, size=(B, S)).astype(np.int32)
    lp = numpy_log_softmax(logits)
    want = -np.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(metrics.next_token_nll(logits, tokens), want, rtol=1e-5)
    real = rng.random((B, S)) > 0.2
    pred = np.asarray(metrics.prediction_mask(mask, real))
    for b in range(B):
        for t in range(S - 1):
            assert pred[b, t] == (mask[b, t] and real[b, t + 1])


def test_scalars_and_dead_fraction():
    assert float(metrics.delta_loss(2.0, 2.5)) == pytest.approx(0.5)
    assert float(metrics.ce_recovered(2.0, 2.5, 4.0)) == pytest.approx((4.0 - 2.5) / (4.0 - 2.0))
    assert float(metrics.ce_recovered(2.0, 2.0, 4.0)) == pytest.approx(1.0)
    assert np.isnan(metrics.ce_recovered(2.0, 2.5, 2.0))  # ablating changes nothing
    traced = jax.jit(metrics.ce_recovered)(jnp.float32(2.0), jnp.float32(3.0), jnp.float32(4.0))
    assert isinstance(traced, jax.Array) and float(traced) == pytest.approx(0.5)
    assert np.isnan(jax.jit(metrics.ce_recovered)(jnp.float32(2.0), 2.5, jnp.float32(2.0)))
    counts = np.array([0, 3, 0, 1, 5, 0, 0, 2])
    assert float(jax.jit(metrics.dead_fraction)(counts)) == pytest.approx(4 / 8)


def test_bad_mask():
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3\)"):
        metrics.l0(np.ones((2, 4, 3)), np.ones((2, 3), bool))
