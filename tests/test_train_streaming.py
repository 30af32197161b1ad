"""Streaming training on a tiny random model, against the cached path rebuilt in numpy."""

import jax
import numpy as np
import pytest
from penzai import pz

from gemma_scope_pz.data.corpus import Corpus
from gemma_scope_pz.data.packing import pack_contexts, real_token_mask
from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.gemma3 import Gemma3LM, random_params
from gemma_scope_pz.scope.interventions import capture
from gemma_scope_pz.train import buffer as buffer_lib
from gemma_scope_pz.train.config import TrainConfig
from gemma_scope_pz.train.sources import CallableSource
from gemma_scope_pz.train.stream_data import forward_rows, refill_at
from gemma_scope_pz.train.streaming import StreamConfig, train_streaming
from gemma_scope_pz.train.trainer import train

CONTEXT_LEN = 8
BATCH = 32
STEPS = 12
STREAM = StreamConfig(context_len=CONTEXT_LEN, contexts_per_refill=6, refill_every=2,
                      buffer_refills=3, seed=5, log_every=1, progress_bar=False)  # fmt: skip
SAE_SITE = "blocks.2.resid_post"
TC_IN, TC_OUT = "blocks.1.mlp_in", "blocks.1.mlp_out"


class Tok:
    """One token per character, ids 3..63 (the tiny vocabulary is 64); "z" is id 63."""

    bos_id, eos_id, pad_id = 2, 1, 0

    def encode(self, text, add_bos=True, add_eos=False):
        ids = [63 if c == "z" else 3 + (ord(c) - ord("a")) % 60 for c in text]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos


def _docs(n=40, seed=0, letters=25):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 20, n)
    return ["".join(chr(97 + int(c)) for c in rng.integers(0, letters, int(k))) for k in lengths]


@pytest.fixture(scope="module")
def model():
    config = Gemma3Config.tiny()
    return Gemma3LM.from_params(config, random_params(config, seed=1))


def _sae(sae=(), **run):
    return TrainConfig(
        sae={
            "d_in": 32,
            "d_sae": 48,
            "site_in": SAE_SITE,
            "norm_estimation_batches": 3,
            **dict(sae),
        },
        loss={"l0_coeff": 0.01},
        run={"batch_size": BATCH, "total_steps": STEPS, "progress_bar": False, **run},
    )


def _transcoder(**run):
    return TrainConfig(
        sae={"d_in": 32, "d_sae": 40, "site_in": TC_IN, "site_out": TC_OUT,
             "architecture": "topk", "k": 4, "norm_estimation_batches": 2},
        run={"batch_size": BATCH, "total_steps": STEPS, "progress_bar": False, **run},
    )  # fmt: skip


def _stream(model, configs, docs, **kwargs):
    return train_streaming(model, configs, Corpus.from_texts(docs), tokenizer=Tok(),
                           stream=kwargs.pop("stream", STREAM), **kwargs)  # fmt: skip


def _cached_batches(model, docs, sites, n_steps):
    """The documented data order, rebuilt on the host: packed contexts (corpus restarting), one
    capture() over them, a numpy ring buffer, and the draw of buffer.draw_slots."""
    once = list(pack_contexts(docs, Tok(), CONTEXT_LEN))
    n_refills = STREAM.buffer_refills + n_steps // STREAM.refill_every
    n = STREAM.contexts_per_refill
    contexts = np.stack([once[i % len(once)] for i in range(n_refills * n)])
    acts = {
        s: np.asarray(a).reshape(-1, a.shape[-1])
        for s, a in capture(model, contexts, sites).items()
    }
    valid_all = real_token_mask(contexts, Tok.pad_id).reshape(-1)
    chunk = n * CONTEXT_LEN
    rows = {
        s: np.zeros((STREAM.buffer_refills * chunk, a.shape[1]), np.float32)
        for s, a in acts.items()
    }
    valid = np.zeros(STREAM.buffer_refills * chunk, bool)

    def refill(r):
        at = slice((r % STREAM.buffer_refills) * chunk, (r % STREAM.buffer_refills + 1) * chunk)
        for s in sites:
            rows[s][at] = acts[s][r * chunk : (r + 1) * chunk]
        valid[at] = valid_all[r * chunk : (r + 1) * chunk]

    for r in range(STREAM.buffer_refills):
        refill(r)
    batches = []
    last = -(-n_steps // STREAM.refill_every) - 1  # drain: no refill after this one
    for step in range(n_steps):
        r = STREAM.buffer_refills - 1 + step // STREAM.refill_every
        if step and step % STREAM.refill_every == 0 and r <= last:
            refill(r)
        slots = np.asarray(buffer_lib.draw_slots(valid, STREAM.seed, step, BATCH))
        assert valid[slots].all()
        batches.append({s: rows[s][slots].copy() for s in sites})
    return batches


def test_refills_stop_once_they_cover_the_run_unless_drain_is_off():
    # 12 steps of 2 per refill need refills 0..5: 0..2 fill the buffer, 3..5 come at steps 2, 4, 6
    at = {s: refill_at(s, STREAM, STEPS) for s in range(STEPS)}
    assert {s: r for s, r in at.items() if r is not None} == {2: 3, 4: 4, 6: 5}
    endless = StreamConfig(**{**STREAM.__dict__, "drain": False})
    at = {s: refill_at(s, endless, STEPS) for s in range(STEPS)}
    assert {s: r for s, r in at.items() if r is not None} == {2: 3, 4: 4, 6: 5, 8: 6, 10: 7}
    # a run shorter than the buffer never refills
    assert all(refill_at(s, STREAM, 5) is None for s in range(5))


def test_a_refill_forward_in_groups_gives_the_rows_of_one_forward(model):
    rng = np.random.default_rng(4)
    tokens = rng.integers(3, 63, size=(7, CONTEXT_LEN)).astype(np.int32)
    positions = np.broadcast_to(np.arange(CONTEXT_LEN, dtype=np.int32), tokens.shape)
    frozen = pz.freeze_params(model)
    sites = (SAE_SITE, TC_OUT)

    def rows(group):
        return jax.jit(lambda m, t, p: forward_rows(m, t, p, sites, group))(
            frozen, tokens, positions
        )

    whole = rows(None)
    assert whole[SAE_SITE].shape == (7 * CONTEXT_LEN, 32)
    for group in (1, 3, 7, 9):  # 3: two groups of 3 and a remainder of 1
        grouped = rows(group)
        for site in sites:
            np.testing.assert_allclose(grouped[site], whole[site], rtol=1e-5, atol=1e-6)
    assert StreamConfig(forward_contexts=3).forward_group(7) == 3
    cpu = jax.default_backend() == "cpu"
    assert StreamConfig().forward_group(130) == (8 if cpu else 130)
    assert StreamConfig().forward_group(5) == 5
    with pytest.raises(ValueError, match="stream.forward_contexts cannot split a refill on a mesh"):
        StreamConfig(forward_contexts=3).forward_group(7, mesh=object())
    with pytest.raises(ValueError, match="stream.forward_contexts must be >= 1, got 0"):
        StreamConfig(forward_contexts=0)


@pytest.fixture(scope="module")
def together(model):
    """An SAE and a transcoder streamed together from one forward (shared by two tests)."""
    return _stream(model, {"sae": _sae(), "tc": _transcoder()}, _docs())


def test_streaming_equals_cached_path_on_the_same_data_order(model, together):
    docs = _docs()
    assert sum(len(d) for d in docs) < 20 * BATCH  # the corpus restarts during the run
    result = together
    batches = _cached_batches(model, docs, [SAE_SITE, TC_IN, TC_OUT], STEPS)
    for name, config, batch_of in (
        ("sae", _sae(log_every=1), lambda i: batches[i][SAE_SITE]),
        ("tc", _transcoder(log_every=1), lambda i: (batches[i][TC_IN], batches[i][TC_OUT])),
    ):
        cached = train(config, CallableSource(batch_of))
        streamed = result.dictionaries[name]
        assert [m["step"] for m in streamed.metrics] == list(range(STEPS))
        for key in ("loss", "fvu", "l0", "dead_fraction", "grad_norm"):
            np.testing.assert_allclose([m[key] for m in streamed.metrics],
                                       [m[key] for m in cached.metrics], rtol=2e-4, atol=1e-6)  # fmt: skip
        np.testing.assert_allclose(
            streamed.normaliser.in_scale, cached.normaliser.in_scale, rtol=1e-6
        )
        for k, v in cached.params.items():
            np.testing.assert_allclose(streamed.params[k], v, rtol=1e-3, atol=1e-5, err_msg=k)
    assert result.n_nonfinite_rows == 0 and result.step == STEPS
    # the first step (compiling the step program) is timed apart from the rate
    assert 0 < result.first_step_seconds < result.seconds
    steady = (STEPS - 1) * BATCH / (result.seconds - result.first_step_seconds)
    assert result.tokens_per_second == pytest.approx(steady)
    assert result.tokens_per_second > STEPS * BATCH / result.seconds


def test_kill_and_resume_gives_bit_identical_weights(model, tmp_path):
    docs = _docs(seed=1)
    configs = {"sae": _sae(), "tc": _transcoder()}
    whole = _stream(model, configs, docs, checkpoint_dir=tmp_path / "a")
    first = _stream(model, configs, docs, checkpoint_dir=tmp_path / "b", stop_at=5)
    assert first.step == 5
    again = _stream(model, configs, docs, checkpoint_dir=tmp_path / "b")
    assert again.step == STEPS and again.tokens == (STEPS - 5) * BATCH
    for name in configs:
        for k, v in whole.dictionaries[name].params.items():
            np.testing.assert_array_equal(again.dictionaries[name].params[k], v, err_msg=k)
        assert [m["step"] for m in again.dictionaries[name].metrics] == list(range(5, STEPS))
    with pytest.raises(ValueError, match="stream.seed: checkpoint 5 vs 6"):
        _stream(model, configs, docs, checkpoint_dir=tmp_path / "b",
                stream=StreamConfig(**{**STREAM.__dict__, "seed": 6}))  # fmt: skip
    with pytest.raises(ValueError, match=r"trains \['sae', 'tc'\], not \['sae'\]"):
        _stream(model, {"sae": _sae()}, docs, checkpoint_dir=tmp_path / "b")


def test_two_dictionaries_from_one_forward_equal_one_by_one(model, together):
    for name, config in (("sae", _sae()), ("tc", _transcoder())):
        alone = _stream(model, {name: config}, _docs()).dictionaries[name]
        for k, v in alone.params.items():
            np.testing.assert_allclose(together.dictionaries[name].params[k], v, rtol=1e-6,
                                       atol=1e-7, err_msg=f"{name}.{k}")  # fmt: skip


def test_bad_dictionaries_are_refused_naming_them(model):
    docs = _docs()
    wide = _sae({"d_in": 64})
    with pytest.raises(ValueError, match=r"'w' has width 64 for sae.site_in=blocks.2.resid_post, "
                       r"but the model's blocks.2.resid_post has width 32"):  # fmt: skip
        _stream(model, {"w": wide}, docs)
    deep = _sae({"site_in": "blocks.9.resid_post"})
    with pytest.raises(
        ValueError, match=r"'deep': Site blocks.9.resid_post: the model has blocks 0..5"
    ):
        _stream(model, {"deep": deep}, docs)
    with pytest.raises(ValueError, match="batch_size must agree"):
        _stream(model, {"a": _sae(), "b": _sae(batch_size=16)}, docs)
    with pytest.raises(ValueError, match="has no sae.site_in"):
        _stream(model, {"a": _sae({"site_in": ""})}, docs)
    with pytest.raises(ValueError, match=r"needs 4097.00 GiB; about .* at most \d+ rows fit"):
        buffer_lib.check_fits({"s": 1024}, 2**30)


def test_nan_activations_are_counted_and_never_trained_on(model):
    params = random_params(model.config, seed=1)
    params["embedding"] = np.asarray(params["embedding"]).copy()
    params["embedding"][63] = np.nan  # the letter "z": non-finite from its position on
    poisoned = Gemma3LM.from_params(model.config, params)
    docs = _docs(seed=3, letters=26)
    once = np.stack(list(pack_contexts(docs, Tok(), CONTEXT_LEN)))
    n_refills = max(STREAM.buffer_refills, -(-STEPS // STREAM.refill_every))  # drained
    n_contexts = n_refills * STREAM.contexts_per_refill
    contexts = np.stack([once[i % len(once)] for i in range(n_contexts)])
    acts = np.asarray(capture(poisoned, contexts, SAE_SITE)[SAE_SITE])
    bad = real_token_mask(contexts, Tok.pad_id) & ~np.isfinite(acts).all(-1)
    assert 0 < bad.sum() < bad.size // 4
    with pytest.warns(UserWarning, match=f"{int(bad.sum())} activation rows had non-finite values"):
        result = _stream(poisoned, {"sae": _sae()}, docs)
    assert result.n_nonfinite_rows == int(bad.sum())
    trained = result.dictionaries["sae"]
    assert trained.n_skipped == 0
    assert all(np.isfinite(v).all() for v in trained.params.values())
    with pytest.raises(FloatingPointError, match="non-finite values by step 0; nan_policy='error'"):
        _stream(poisoned, {"sae": _sae(nan_policy="error")}, docs)


def _cli_inputs(model, tmp_path, monkeypatch, *, seed: int, steps: int):
    """The CLI on the tiny model: ``gs.load_model``/``load_tokenizer`` patched, a corpus file
    and a 32 → 48 SAE config file written; returns (config path, corpus path)."""
    import gemma_scope_pz as gs

    monkeypatch.setattr(gs, "load_model", lambda source=None: model)
    monkeypatch.setattr(gs, "load_tokenizer", lambda source=None: Tok())
    docs = tmp_path / "docs.txt"
    docs.write_text("\n\n".join(_docs(seed=seed)), encoding="utf-8")
    config = tmp_path / "sae.yaml"
    config.write_text(
        f"sae: {{d_in: 32, d_sae: 48, site_in: {SAE_SITE}, norm_estimation_batches: 2}}\n"
        f"run: {{batch_size: 32, total_steps: {steps}, progress_bar: false, "
        "model_name: gemma-3-270m}\n",
        encoding="utf-8",
    )
    return config, docs


def test_cli_train_stream_exports_a_loadable_dictionary(model, tmp_path, monkeypatch, capsys):
    import gemma_scope_pz as gs
    from gemma_scope_pz.app import cli

    config, docs = _cli_inputs(model, tmp_path, monkeypatch, seed=4, steps=6)
    out = tmp_path / "out"
    argv = ["train", "--stream", "--config", str(config), "--corpus", str(docs),
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "streamed 192 tokens" in printed and "non-finite activation rows dropped: 0" in printed
    sae = gs.load_sae(str(out / "gemma_scope_2"))
    assert sae.meta.d_in == 32 and sae.meta.d_sae == 48 and sae.meta.site_in == SAE_SITE
    assert (out / "saelens").is_dir() and (out / "stream_checkpoints" / "6").is_dir()


def test_cli_train_packing_and_model_dtype_reach_the_harvest(model, tmp_path, monkeypatch):
    """``train --packing concat --model-dtype bfloat16``: the cached path records both in the
    activation cache it harvests (and is refused by a cache made otherwise); --stream takes them."""
    from gemma_scope_pz.app import cli
    from gemma_scope_pz.train.store import ActivationCache

    config, docs = _cli_inputs(model, tmp_path, monkeypatch, seed=5, steps=4)
    flags = ["--packing", "concat", "--model-dtype", "bfloat16"]
    common = ["--config", str(config), "--corpus", str(docs)]
    assert cli.main(["train", *common, "--out", str(tmp_path / "c"), *flags]) == 0
    header = ActivationCache.open(tmp_path / "c" / "activations").header
    assert (header["packing"], header["model_dtype"]) == ("concat", "bfloat16")
    assert cli.main(["train", *common, "--out", str(tmp_path / "c")]) == 2  # document ≠ concat
    assert cli.main(["train", "--stream", *common, "--out", str(tmp_path / "s"), *flags]) == 0


@pytest.mark.slow
def test_real_270m_streaming_fvu_and_l0_fall(real_model, real_tokenizer):
    site = "blocks.5.resid_post"
    config = TrainConfig(
        sae={"d_in": 640, "d_sae": 512, "site_in": site},
        loss={"l0_coeff": 8.0, "sparsity_warmup_steps": 40},
        optim={"warmup_steps": 20, "lr": 2e-3},
        run={"batch_size": 256, "total_steps": 200, "progress_bar": False},
    )
    stream = StreamConfig(context_len=64, buffer_refills=4, log_every=20, progress_bar=False)
    result = train_streaming(real_model, {"res5": config}, None, tokenizer=real_tokenizer,
                             stream=stream)  # fmt: skip
    metrics = result.dictionaries["res5"].metrics
    early, late = metrics[:2], metrics[-2:]
    fvu = [np.mean([m["fvu"] for m in part]) for part in (early, late)]
    l0 = [np.mean([m["l0"] for m in part]) for part in (early, late)]
    print(f"fvu {fvu[0]:.3f} -> {fvu[1]:.3f}; l0 {l0[0]:.1f} -> {l0[1]:.1f}; "
          f"{result.tokens_per_second:.0f} tok/s")  # fmt: skip
    assert fvu[1] < 0.8 * fvu[0] and fvu[1] < 0.5
    assert l0[1] < 0.8 * l0[0]
    assert result.n_nonfinite_rows == 0 and result.dictionaries["res5"].n_skipped == 0
