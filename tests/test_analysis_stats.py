"""FeatureStats vs numpy formulas over a small corpus."""

import json
import math

import numpy as np
import pytest

from gemma_scope_pz.analysis.examples import MaxActivatingExamples
from gemma_scope_pz.analysis.stats import FeatureStats


def _data(seed=0, n_features=50):
    rng = np.random.default_rng(seed)
    mask = rng.random((6, 16)) > 0.2
    # Per-feature firing probability spread over several decades.
    p = 10.0 ** rng.uniform(-3, 0, size=n_features)
    fires = rng.random((6, 16, n_features)) < p
    latents = np.where(fires, rng.uniform(0.1, 5.0, size=fires.shape), 0.0).astype(np.float32)
    latents[..., :3] = 0.0  # dead features
    latents[..., 3] = 1.5  # dense feature (fires everywhere)
    tokens = rng.integers(3, 100, size=(6, 16)).astype(np.int32)
    return tokens, mask, latents


def _numpy_stats(mask, latents):
    active = (latents > 0) & mask[..., None]
    counts = active.sum(axis=(0, 1))
    sums = np.where(active, latents, 0).sum(axis=(0, 1), dtype=np.float64)
    return mask.sum(), counts, sums


def test_stats_match_numpy():
    tokens, mask, latents = _data()
    state = MaxActivatingExamples.create(latents.shape[-1], k=2, window=1)
    state = state.update(tokens[:3], latents[:3], mask[:3], 0).update(
        tokens[3:], latents[3:], mask[3:], 3
    )
    stats = FeatureStats.from_examples(state, dense_threshold=0.5)
    n_tokens, counts, sums = _numpy_stats(mask, latents)
    assert stats.n_tokens == n_tokens
    np.testing.assert_array_equal(stats.fire_counts, counts)
    np.testing.assert_allclose(stats.density, counts / n_tokens)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_allclose(stats.mean_activation, sums / counts, rtol=1e-5)
    assert np.isnan(stats.mean_activation[:3]).all()
    np.testing.assert_array_equal(stats.dead, counts == 0)
    np.testing.assert_array_equal(stats.dense, counts / n_tokens > 0.5)
    assert stats.dense[3] and stats.dead[:3].all()
    np.testing.assert_allclose(
        stats.max_activation, np.where(mask[..., None], latents, -np.inf).max(axis=(0, 1))
    )


def test_histogram_and_summary():
    _, mask, latents = _data(1)
    n_tokens, counts, sums = _numpy_stats(mask, latents)
    maxes = latents.max(axis=(0, 1))
    stats = FeatureStats.from_counts(n_tokens, counts, sums, maxes)
    hist, edges = stats.log10_density_histogram(bins=12)
    live = counts[counts > 0] / n_tokens
    lo = math.floor(math.log10(1 / n_tokens))
    want, want_edges = np.histogram(np.log10(live), bins=12, range=(lo, 0))
    np.testing.assert_array_equal(hist, want)
    np.testing.assert_allclose(edges, want_edges)
    assert hist.sum() == (counts > 0).sum()  # every live feature lands in a bin

    summary = json.loads(json.dumps(stats.summary(bins=12)))
    assert summary["n_dead"] == int((counts == 0).sum())
    assert summary["n_dense"] == int((counts / n_tokens > 0.1).sum())
    assert summary["dense_threshold"] == 0.1
    assert summary["log10_density_histogram"]["counts"] == want.tolist()
    assert summary["median_live_density"] == pytest.approx(float(np.median(live)))
    one = json.loads(json.dumps(stats.feature(0)))
    assert one["dead"] and one["mean_activation"] is None
    assert stats.feature(3)["mean_activation"] == pytest.approx(1.5)


def test_bad_counts_raise():
    with pytest.raises(ValueError, match="same length"):
        FeatureStats.from_counts(10, [1, 2], [1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="n_tokens=10"):
        FeatureStats.from_counts(10, [11], [1.0], [1.0])
    with pytest.raises(IndexError):
        FeatureStats.from_counts(10, [1], [1.0], [1.0]).feature(1)
