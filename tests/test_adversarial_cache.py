"""The activation cache under attack: two writers, killed writers, foreign files, other weights, a
full disk. Each test asserts the error text and that nothing was written or lost."""

import errno
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from penzai import pz

from gemma_scope_pz import backend as gs_backend
from gemma_scope_pz.io import LockHeld
from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.fingerprint import weights_fingerprint
from gemma_scope_pz.models.gemma3 import Gemma3LM, random_params
from gemma_scope_pz.train import store
from gemma_scope_pz.train.pipeline import harvest_to_cache
from gemma_scope_pz.train.store import ActivationCache

HEADER = dict(model_name="m", sites=["blocks.0.resid_post"], widths=[3], corpus="c@1")


def _rows(start, n):
    return np.arange(start, start + n, dtype=np.float32)[:, None] * np.ones(3, np.float32)


def _listing(path):
    return sorted(os.listdir(path))


def _all_rows(path):
    reader = ActivationCache.open(path)
    for shard in range(len(reader.shards)):  # every listed shard file exists and has its rows
        assert os.path.exists(os.path.join(path, f"shard_{shard:06d}.s0.npy"))
    return reader.read_rows(np.arange(reader.n_rows))[0][:, 0]


def _child(code: str) -> subprocess.Popen:
    """A Python process running ``code`` (with ``store``, ``np`` and ``HEADER`` defined)."""
    prelude = (
        "import os, sys, numpy as np\n"
        "from gemma_scope_pz.train import store\n"
        f"HEADER = {HEADER!r}\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_second_writer_is_refused_naming_the_holders_pid(tmp_path):
    path = tmp_path / "cache"
    holder = _child(f"""
        cache = store.ActivationCache.create_or_resume({str(path)!r}, **HEADER)
        cache.append(np.zeros((4, 3), np.float32))
        print("ready", flush=True)
        sys.stdin.readline()  # hold the cache until told to go on
        cache.append(np.ones((2, 3), np.float32))
        cache.close()
    """)
    try:
        assert holder.stdout.readline().strip() == "ready", holder.stderr.read()
        with pytest.raises(
            LockHeld, match=rf"activation cache .*cache is in use .*pid {holder.pid}\)"
        ):
            ActivationCache.create_or_resume(path, **HEADER)
        assert ActivationCache.open(path).n_rows == 4  # reading needs no lock
    finally:
        holder.communicate("go\n", timeout=60)
    assert holder.returncode == 0
    # the refused writer deleted nothing; once the holder is done, writing goes on where it ended
    with ActivationCache.create_or_resume(path, **HEADER) as cache:
        cache.append(_rows(6, 3))
    np.testing.assert_array_equal(_all_rows(path), [0, 0, 0, 0, 1, 1, 6, 7, 8])


def test_a_writer_killed_mid_shard_leaves_only_files_the_next_writer_removes(tmp_path):
    path = tmp_path / "cache"
    path.mkdir()
    (path / "notes.tmp.txt").write_text("mine")  # a user's file that looks like a temp file
    killed = _child(f"""
        import signal
        cache = store.ActivationCache.create_or_resume({str(path)!r}, **HEADER)
        cache.append(np.zeros((4, 3), np.float32))
        def die(file, array, allow_pickle=False):  # the shard's temp file is half written
            file.write(b"half a shard")
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        np.save = die
        cache.append(np.ones((4, 3), np.float32))
    """)
    killed.communicate(timeout=60)
    assert killed.returncode == -9
    assert "shard_000001.s0.npy.tmp" in _listing(path)
    with ActivationCache.create_or_resume(
        path, **HEADER
    ) as cache:  # the dead writer's lock is free
        assert cache.n_rows == 4
    assert _listing(path) == [".lock", "manifest.json", "notes.tmp.txt", "shard_000000.s0.npy"]
    assert (path / "notes.tmp.txt").read_text() == "mine"


def test_foreign_shard_files_are_never_deleted_or_overwritten(tmp_path):
    foreign = tmp_path / "someone_elses"
    foreign.mkdir()
    np.save(foreign / "shard_000000.s0.npy", np.full((2, 3), 7, np.float32))
    (foreign / "shard_000000.s0.npy.tmp.123.npy").write_bytes(b"theirs")
    before = {n: (foreign / n).read_bytes() for n in _listing(foreign)}
    with pytest.raises(ValueError, match=r"holds shard_000000\.s0\.npy but no manifest\.json"):
        ActivationCache.create_or_resume(foreign, **HEADER)
    assert {n: (foreign / n).read_bytes() for n in _listing(foreign) if n != ".lock"} == before
    assert "manifest.json" not in _listing(foreign)

    # in a cache folder, files the manifest never listed survive a resume, and are not overwritten
    path = tmp_path / "cache"
    with ActivationCache.create_or_resume(path, **HEADER) as cache:
        cache.append(_rows(0, 2))
    np.save(path / "shard_000001.s0.npy", np.full((5, 3), 7, np.float32))
    (path / "shard_000009.s0.npy.tmp").write_bytes(b"theirs")
    with ActivationCache.create_or_resume(path, **HEADER) as cache:
        with pytest.raises(FileExistsError, match=r"shard_000001\.s0\.npy exists but no manifest"):
            cache.append(_rows(2, 2))
    assert np.load(path / "shard_000001.s0.npy")[0, 0] == 7
    assert (path / "shard_000009.s0.npy.tmp").read_bytes() == b"theirs"
    np.testing.assert_array_equal(_all_rows(path), [0, 1])


def test_a_full_disk_is_one_clear_error_and_the_cache_stays_consistent(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    cache = ActivationCache.create_or_resume(path, **HEADER)
    cache.append(_rows(0, 3))
    real_save = np.save

    def disk_full(file, array, allow_pickle=False):
        file.write(b"\x93NUMPY partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.np, "save", disk_full)
    with pytest.raises(
        OSError,
        match=r"^\[Errno 28\] no space left on device while writing .*shard_000001\.s0\.npy$",
    ):
        cache.append(_rows(3, 3))
    monkeypatch.setattr(store.np, "save", real_save)
    assert _listing(path) == [".lock", "manifest.json", "shard_000000.s0.npy"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["pending"] == [] and [s["rows"] for s in manifest["shards"]] == [3]

    # the manifest itself cannot be written: the shard's files go, the old manifest stays
    def manifest_full(target, data):
        raise OSError(errno.ENOSPC, f"no space left on device while writing {target}")

    calls = []
    real_write = store.write_atomically
    monkeypatch.setattr(
        store,
        "write_atomically",
        lambda target, data: (
            calls.append(1),
            (real_write if len(calls) == 1 else manifest_full)(target, data),
        )[1],
    )
    with pytest.raises(OSError, match="no space left on device while writing .*manifest.json"):
        cache.append(_rows(3, 3))
    monkeypatch.setattr(store, "write_atomically", real_write)
    assert cache.n_rows == 3 and _listing(path) == [".lock", "manifest.json", "shard_000000.s0.npy"]
    cache.append(_rows(3, 3))  # space again: appending goes on at the right row
    cache.close()
    np.testing.assert_array_equal(_all_rows(path), np.arange(6))


class _Tokenizer:
    bos_id, eos_id, pad_id = 2, 1, 0

    def encode(self, text, add_bos=True, add_eos=False):
        return [self.bos_id] * add_bos + [3 + ord(c) % 50 for c in text]


def test_a_fine_tuned_model_does_not_reuse_the_base_models_cache(tmp_path):
    config = Gemma3Config.tiny()
    params = random_params(config, seed=3)
    base = Gemma3LM.from_params(config, params)
    rng = np.random.default_rng(0)
    tuned_params = {
        k: np.asarray(v) + 1e-3 * rng.standard_normal(np.shape(v)).astype(np.float32)
        for k, v in params.items()
    }
    tuned = Gemma3LM.from_params(config, tuned_params)  # same architecture, name and config
    one_weight = dict(params)
    key = sorted(params)[0]
    one_weight[key] = np.array(params[key], copy=True)
    one_weight[key].reshape(-1)[1] += 0.5  # a single element, between the strided samples
    fingerprints = {
        weights_fingerprint(m) for m in (base, tuned, Gemma3LM.from_params(config, one_weight))
    }
    assert len(fingerprints) == 3
    assert weights_fingerprint(Gemma3LM.from_params(config, params)) == weights_fingerprint(base)
    # remembered per model, but a parameter given a new value in place changes it
    edited = Gemma3LM.from_params(config, params)
    before = weights_fingerprint(edited)
    param = next(p for p in jax.tree_util.tree_leaves(edited) if isinstance(p, pz.Parameter))
    param.value = param.value + 1.0
    assert weights_fingerprint(edited) not in (before, weights_fingerprint(base))

    docs = ["some text to harvest", "and another document"]
    kw = dict(n_tokens=20, context_len=8, batch_size=2, progress=False)
    site = ["blocks.1.resid_post"]
    cache = harvest_to_cache(base, _Tokenizer(), docs, site, tmp_path / "c", **kw)
    assert cache.header["model_name"] == config.name and cache.n_rows == 20
    listing = _listing(tmp_path / "c")
    with pytest.raises(
        ValueError, match=r"model_fingerprint='[0-9a-f]{16}'.*but model_fingerprint='[0-9a-f]{16}'"
    ):
        harvest_to_cache(tuned, _Tokenizer(), docs, site, tmp_path / "c", **kw)
    assert _listing(tmp_path / "c") == listing
    again = harvest_to_cache(base, _Tokenizer(), docs, site, tmp_path / "c", **kw)
    assert again.n_rows == 20  # the same weights reuse it


def test_cache_written_before_packing_keys_means_document_float32(tmp_path):
    """A header without ``packing``/``model_dtype`` (caches made before they were recorded) reads
    as the defaults: a default request resumes it, a concat or bfloat16 request is refused."""
    path = tmp_path / "old"
    with ActivationCache.create_or_resume(path, **HEADER) as cache:
        cache.append(_rows(0, 4))
    manifest = json.loads((path / "manifest.json").read_text())
    for key in ("packing", "model_dtype", "cpu_matmul"):
        del manifest["header"][key]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with ActivationCache.create_or_resume(path, **HEADER) as cache:
        assert cache.n_rows == 4
    with pytest.raises(ValueError, match=r"packing='document'.*but packing='concat'"):
        ActivationCache.create_or_resume(path, **HEADER, packing="concat")
    with pytest.raises(ValueError, match=r"model_dtype='float32'.*but model_dtype='bfloat16'"):
        ActivationCache.create_or_resume(path, **HEADER, model_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"cpu_matmul='float32'.*but cpu_matmul='bfloat16'"):
        ActivationCache.create_or_resume(path, **HEADER, cpu_matmul="bfloat16")


def test_harvest_to_cache_packing_and_dtype_are_the_harvests(tmp_path):
    """``harvest_to_cache(packing=, model_dtype=)`` stores what ``harvest_array`` gives with the
    same settings, records them, and a cache made with other settings is not reused."""
    from gemma_scope_pz.train.harvest import harvest_array

    config = Gemma3Config.tiny()
    model = Gemma3LM.from_params(config, random_params(config, seed=0))
    docs = ["some text to harvest", "and another document", "a third one here"]
    kw = dict(n_tokens=24, context_len=8, batch_size=2, progress=False)
    site = ["blocks.1.resid_post"]
    settings = dict(packing="concat", model_dtype="bfloat16")
    cache = harvest_to_cache(model, _Tokenizer(), docs, site, tmp_path / "c", **kw, **settings)
    assert {k: cache.header[k] for k in settings} == settings
    assert cache.header["cpu_matmul"] == gs_backend.cpu_matmul()  # this process's mode
    rows, _ = harvest_array(model, _Tokenizer(), docs, site, **kw, **settings)
    stored = cache.read_rows(np.arange(cache.n_rows))[0]
    np.testing.assert_array_equal(stored, rows[site[0]])
    with pytest.raises(ValueError, match="packing='concat'.*but packing='document'"):
        harvest_to_cache(model, _Tokenizer(), docs, site, tmp_path / "c", **kw)
