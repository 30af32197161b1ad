"""Streaming max-activating examples vs a brute-force numpy computation."""

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from gemma_scope_pz.analysis import examples as ex_mod
from gemma_scope_pz.analysis.examples import (
    MaxActivatingExamples,
    benchmark_update,
    collect_max_activating,
)

N_FEATURES, K, WINDOW, B, T, N_BATCHES = 23, 4, 3, 5, 12, 3


def _corpus(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 500, size=(N_BATCHES, B, T)).astype(np.int32)
    tokens[:, :, 0] = 2  # BOS
    lengths = rng.integers(3, T + 1, size=(N_BATCHES, B))
    mask = np.arange(T)[None, None, :] < lengths[:, :, None]
    tokens[~mask] = 0  # right padding
    mask[:, :, 0] = False  # BOS never counts
    # Continuous values: ties have probability 0; about half the entries are > 0.
    latents = rng.normal(size=(N_BATCHES, B, T, N_FEATURES)).astype(np.float32)
    # Big values on masked positions must never be selected or counted.
    latents[~mask] = 100.0
    return tokens, mask, latents


def _brute_force(tokens, mask, latents, k, window):
    """Per feature: rows sorted by their peak, with windows, using plain numpy."""
    tokens = tokens.reshape(-1, T)
    mask = mask.reshape(-1, T)
    latents = latents.reshape(-1, T, latents.shape[-1])
    masked = np.where(mask[:, :, None], latents, -np.inf)
    peak = masked.max(axis=1)  # [R, F]
    pos = masked.argmax(axis=1)
    result = {}
    for f in range(latents.shape[-1]):
        order = np.argsort(-peak[:, f], kind="stable")[:k]
        items = []
        for r in order:
            p = pos[r, f]
            lo, hi = max(0, p - window), min(T, p + window + 1)
            items.append(
                (
                    peak[r, f],
                    r,
                    p,
                    tokens[r, lo:hi],
                    np.where(mask[r, lo:hi], latents[r, lo:hi, f], 0.0),
                    p - lo,
                )
            )
        result[f] = items
    return result


def _stream(tokens, mask, latents, k=K, window=WINDOW):
    state = MaxActivatingExamples.create(N_FEATURES, k=k, window=window)
    for i in range(N_BATCHES):
        state = state.update(tokens[i], latents[i], mask[i], row_offset=i * B)
    return state


def test_streaming_top_k_matches_brute_force():
    tokens, mask, latents = _corpus()
    state = _stream(tokens, mask, latents)
    expected = _brute_force(tokens, mask, latents, K, WINDOW)
    for f in range(N_FEATURES):
        got = state.top(f, only_active=False)
        assert len(got) == K
        for g, (value, row, pos, wt, wv, peak_index) in zip(got, expected[f], strict=True):
            np.testing.assert_allclose(g.value, value, rtol=1e-6)
            assert (g.row, g.position, g.peak_index) == (row, pos, peak_index)
            np.testing.assert_array_equal(g.window_tokens, wt)
            np.testing.assert_allclose(g.window_values, wv, rtol=1e-6)
            assert g.window_values[g.peak_index] == pytest.approx(g.value)
        active = state.top(f)
        assert [e.row for e in active] == [e.row for e in got if e.value > 0]


def test_counters_match_numpy():
    tokens, mask, latents = _corpus(1)
    state = _stream(tokens, mask, latents)
    active = (latents > 0) & mask[..., None]
    np.testing.assert_array_equal(np.asarray(state.fire_counts), active.sum(axis=(0, 1, 2)))
    np.testing.assert_allclose(
        np.asarray(state.activation_sums),
        np.where(active, latents, 0).sum(axis=(0, 1, 2)),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        np.asarray(state.max_activation),
        np.where(mask[..., None], latents, -np.inf).max(axis=(0, 1, 2)),
    )
    assert int(state.n_tokens) == mask.sum()
    assert int(state.n_rows) == N_BATCHES * B


def test_windows_at_sequence_edges():
    tokens = np.arange(100, 100 + 2 * T, dtype=np.int32).reshape(2, T)
    tokens[:, 0] = 2
    mask = np.ones((2, T), bool)
    mask[:, 0] = False
    latents = np.full((2, T, 3), 0.1, np.float32)
    latents[0, 1, 0] = 5.0  # right after BOS: window clipped on the left
    latents[1, T - 1, 1] = 7.0  # last token: window clipped on the right
    latents[0, 0, 2] = 9.0  # BOS: masked, must not be the peak
    latents[1, 5, 2] = 3.0
    state = MaxActivatingExamples.create(3, k=1, window=WINDOW).update(tokens, latents, mask, 10)
    (e0,) = state.top(0)
    assert (e0.row, e0.position, e0.peak_index) == (10, 1, 1)
    np.testing.assert_array_equal(e0.window_tokens, tokens[0, : 1 + WINDOW + 1])
    assert e0.window_values[0] == 0.0  # BOS is masked: shown as a token, value 0
    (e1,) = state.top(1)
    assert (e1.row, e1.position, e1.peak_index) == (11, T - 1, WINDOW)
    np.testing.assert_array_equal(e1.window_tokens, tokens[1, T - 1 - WINDOW :])
    (e2,) = state.top(2)
    assert (e2.row, e2.position, e2.value) == (11, 5, pytest.approx(3.0))


def test_one_peak_per_context_and_no_recompile():
    rng = np.random.default_rng(3)
    tokens = rng.integers(3, 50, size=(2, T)).astype(np.int32)
    latents = np.zeros((2, T, 2), np.float32)
    latents[0, [2, 5, 8], 0] = [9.0, 8.0, 7.0]  # one context with three big values
    latents[1, 4, 0] = 1.0
    state = MaxActivatingExamples.create(2, k=3, window=1)
    state = state.update(tokens, latents, np.ones((2, T), bool), 0)
    size = ex_mod._update._cache_size()
    state = state.update(tokens, -latents, np.ones((2, T), bool), 2)
    assert ex_mod._update._cache_size() == size  # row_offset is traced, not static
    rows = [e.row for e in state.top(0)]
    assert rows == [0, 1]  # row 0 counted once despite three large positions


def test_collect_and_named_latents():
    tokens, mask, latents = _corpus(2)
    lookup = {tokens[i].tobytes(): latents[i] for i in range(N_BATCHES)}

    def encode(tok):
        return jnp.asarray(lookup[np.asarray(tok).tobytes()])

    batches = [(tokens[i], mask[i]) for i in range(N_BATCHES)]
    got = collect_max_activating(batches, encode, N_FEATURES, K, WINDOW, progress=False)
    want = _stream(tokens, mask, latents)
    np.testing.assert_array_equal(np.asarray(got.rows), np.asarray(want.rows))
    np.testing.assert_array_equal(np.asarray(got.window_tokens), np.asarray(want.window_tokens))

    named = pz.nx.wrap(jnp.asarray(latents[0])).tag("batch", "seq", "latents")
    a = MaxActivatingExamples.create(N_FEATURES, K, WINDOW).update(tokens[0], named, mask[0])
    b = MaxActivatingExamples.create(N_FEATURES, K, WINDOW).update(tokens[0], latents[0], mask[0])
    np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))


def test_bad_inputs_raise_clear_errors():
    state = MaxActivatingExamples.create(4, k=2, window=1)
    tok = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError, match="features"):
        state.update(tok, np.zeros((2, 5, 3), np.float32))
    with pytest.raises(ValueError, match="tokens shape"):
        state.update(tok, np.zeros((2, 6, 4), np.float32))
    with pytest.raises(ValueError, match="mask shape"):
        state.update(tok, np.zeros((2, 5, 4), np.float32), np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="k >= 1"):
        MaxActivatingExamples.create(4, k=0)
    with pytest.raises(IndexError):
        state.top(4)


def test_benchmark_runs_small():
    out = benchmark_update(n_features=64, k=3, window=2, batch=2, seq=8, steps=2)
    assert out["step_s"] > 0 and out["state_mb"] > 0


def test_default_mask_is_the_token_mask():
    """Without a mask, BOS (position 0 or the BOS id) and padding never count."""
    tokens = np.array([[2, 5, 6, 7, 0, 0], [0, 2, 8, 2, 9, 4]], np.int32)  # right / left padded
    latents = np.full((2, 6, 1), 1.0, np.float32)
    latents[0, 0, 0] = latents[1, 1, 0] = latents[1, 3, 0] = 50.0  # BOS positions
    latents[0, 4, 0] = latents[1, 0, 0] = 60.0  # padding
    state = MaxActivatingExamples.create(1, k=2, window=1).update(tokens, latents)
    assert int(state.n_tokens) == 3 + 3
    assert float(state.max_activation[0]) == 1.0
    assert int(state.fire_counts[0]) == 6
