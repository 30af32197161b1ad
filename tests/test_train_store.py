"""Activation stores: on-disk cache (crash resume, header checks), batches by step, shuffling."""

import json
import os

import numpy as np
import pytest

from gemma_scope_pz.train.sources import ArraySource, ShuffleBuffer, batch_indices
from gemma_scope_pz.train.store import ActivationCache

HEADER = dict(
    model_name="gemma3-270m",
    sites=["blocks.3.resid_post"],
    widths=[4],
    corpus="toy",
    context_length=16,
)


def _rows(start, n, width=4):
    return np.arange(start, start + n, dtype=np.float32)[:, None] * np.ones(width, np.float32)


def test_batch_indices_cover_each_epoch_once():
    idx = np.concatenate([batch_indices(s, 7, 20, seed=3) for s in range(20)])  # 140 = 7 epochs
    for epoch in range(7):
        assert sorted(idx[epoch * 20 : (epoch + 1) * 20]) == list(range(20))
    assert not np.array_equal(idx[:20], idx[20:40])  # a new permutation per epoch
    np.testing.assert_array_equal(batch_indices(5, 7, 20, 3), batch_indices(5, 7, 20, 3))


def test_cache_write_read_and_crash_resume(tmp_path):
    path = tmp_path / "cache"
    cache = ActivationCache.create_or_resume(path, **HEADER)
    cache.append(_rows(0, 10))
    cache.append(_rows(10, 6))
    # the state a writer killed while writing shard 2 leaves: the shard's names recorded as pending,
    # a finished file and a temp file; then its lock dies with it
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(
        json.dumps({**manifest, "pending": ["shard_000002.s0.npy"]})
    )
    np.save(path / "shard_000002.s0.npy", _rows(16, 3))
    (path / "shard_000002.s0.npy.tmp").write_bytes(b"partial")
    cache.close()
    resumed = ActivationCache.create_or_resume(path, **HEADER)
    assert resumed.n_rows == 16
    assert sorted(os.listdir(path)) == [
        ".lock",
        "manifest.json",
        "shard_000000.s0.npy",
        "shard_000001.s0.npy",
    ]
    assert json.loads((path / "manifest.json").read_text())["pending"] == []
    resumed.append(_rows(resumed.n_rows, 9))  # the harvester restarts at row n_rows
    resumed.close()
    reader = ActivationCache.open(path)
    assert reader.n_rows == 25
    (everything,) = reader.read_rows(np.arange(25))
    np.testing.assert_array_equal(everything[:, 0], np.arange(25))  # no duplicates, no gaps
    idx = np.array([24, 3, 11, 0, 16])
    np.testing.assert_array_equal(reader.read_rows(idx)[0][:, 0], idx)
    manifest = json.loads((path / "manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [10, 6, 9]
    assert manifest["header"]["context_length"] == 16
    batches = reader.batches(batch_size=8, seed=1)
    for step in (0, 3, 7):
        np.testing.assert_array_equal(batches.batch_at(step)[:, 0], batch_indices(step, 8, 25, 1))


def test_cache_refuses_other_site_or_model(tmp_path):
    with ActivationCache.create_or_resume(tmp_path, **HEADER) as cache:
        cache.append(_rows(0, 4))
    with pytest.raises(ValueError, match=r"blocks\.3\.resid_post.*blocks\.5\.mlp_out"):
        ActivationCache.create_or_resume(tmp_path, **{**HEADER, "sites": ["blocks.5.mlp_out"]})
    with pytest.raises(ValueError, match="gemma3-270m.*gemma3-1b"):
        ActivationCache.create_or_resume(tmp_path, **{**HEADER, "model_name": "gemma3-1b"})
    with pytest.raises(ValueError, match="tail='pad'.*tail='drop'"):
        ActivationCache.create_or_resume(tmp_path, **{**HEADER, "tail": "drop"})
    with ActivationCache.create_or_resume(tmp_path, **HEADER) as cache:
        with pytest.raises(ValueError, match=r"shape \(4, 3\)"):
            cache.append(np.zeros((4, 3)))
    with pytest.raises(RuntimeError, match="not open for writing"):
        ActivationCache.open(tmp_path).append(_rows(0, 4))


def test_cache_identity_is_the_weights_fingerprint_not_the_name(tmp_path):
    keyed = {**HEADER, "model_fingerprint": "0123456789abcdef"}
    with ActivationCache.create_or_resume(tmp_path, **keyed) as cache:
        cache.append(_rows(0, 4))
    # the same weights under another name: the same data
    with ActivationCache.create_or_resume(tmp_path, **{**keyed, "model_name": "renamed"}) as again:
        assert again.n_rows == 4
    with pytest.raises(
        ValueError, match="model_fingerprint='0123456789abcdef'.*'fedcba9876543210'"
    ):
        ActivationCache.create_or_resume(
            tmp_path, **{**keyed, "model_fingerprint": "fedcba9876543210"}
        )


def test_two_site_cache_gives_pairs(tmp_path):
    header = {**HEADER, "sites": ["blocks.1.mlp_in", "blocks.1.mlp_out"], "widths": [4, 2]}
    cache = ActivationCache.create_or_resume(tmp_path, **header)
    cache.append(_rows(0, 5), _rows(100, 5, width=2))
    cache.close()
    x_in, x_out = cache.batches(4, seed=0).batch_at(2)
    np.testing.assert_array_equal(x_out[:, 0] - 100, x_in[:, 0])
    # a subset of sites, in the order asked for, gives the same rows
    out_only = cache.batches(4, seed=0, sites=["blocks.1.mlp_out"]).batch_at(2)
    np.testing.assert_array_equal(out_only, x_out)
    swapped = cache.batches(4, seed=0, sites=["blocks.1.mlp_out", "blocks.1.mlp_in"]).batch_at(2)
    np.testing.assert_array_equal(swapped[1], x_in)
    with pytest.raises(ValueError, match=r"holds sites .*not \['blocks\.2\.mlp_in'\]"):
        cache.batches(4, sites=["blocks.2.mlp_in"])


def test_array_batches_and_shuffle_buffer():
    x = _rows(0, 30)
    batches = ArraySource(x, x * 2, batch_size=8, seed=0)
    a, b = batches.batch_at(4)
    np.testing.assert_array_equal(b, 2 * a)
    stream = (_rows(i * 10, 10) for i in range(10))
    out = np.concatenate(list(ShuffleBuffer(stream, capacity=20, batch_size=5, seed=0)))
    assert len(np.unique(out[:, 0])) == len(out)  # no row emitted twice
    assert not np.array_equal(out[:, 0], np.sort(out[:, 0]))  # order was mixed
