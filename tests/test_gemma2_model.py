"""Gemma 2 in the Gemma 3 model family: presets, transformers parity, the runners.

Reference data: ``tests/data/gemma2_tiny/<case>/`` are tiny random checkpoints written by
``Gemma2ForCausalLM.save_pretrained`` and ``tests/data/reference_gemma2.json`` holds transformers'
logits on them (eager attention), both from ``scripts/reference_gemma2.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

import gemma_scope_pz as gs
from gemma_scope_pz.models.checkpoints.hf import config_from_hf, load_hf_dir
from gemma_scope_pz.models.config import Gemma3Config, param_shapes
from gemma_scope_pz.models.gemma3 import Gemma3LM, forward
from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta
from gemma_scope_pz.scope.lens import direction_logits

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "reference_gemma2.json").read_text())
TOKENS = np.array(REFERENCE["tokens"])
CASES = sorted(REFERENCE["cases"])


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple[Gemma3Config, dict]]:
    return {case: load_hf_dir(DATA / "gemma2_tiny" / case) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers(case):
    model = gs.load_model(DATA / "gemma2_tiny" / case)
    expected = np.array(REFERENCE["cases"][case]["logits"])
    got = np.asarray(forward(model, TOKENS))
    assert got.shape == expected.shape
    assert _relative_error(got, expected) < 1e-4
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_config_read_from_transformers(loaded):
    config, params = loaded["small_caps"]
    assert (config.family, config.qk_norm) == ("gemma2", False)
    assert (config.attn_logit_softcap, config.final_logit_softcap) == (2.0, 3.0)
    assert (config.sliding_window, config.query_pre_attn_scalar) == (5, 24)
    assert [config.is_global(i) for i in range(4)] == [False, True, False, True]
    assert config.local_rope_base == config.global_rope_base == 10_000.0
    assert not any("query_norm" in key or "key_norm" in key for key in params)
    assert set(params) == set(param_shapes(config))


@pytest.mark.parametrize(
    "change",
    [
        dict(sliding_window=64),  # the window is shorter than the 12 tokens: it must matter
        dict(attn_logit_softcap=None),
        dict(final_logit_softcap=None),
        dict(query_pre_attn_scalar=16),  # = head_dim, the usual scale; the checkpoint uses 24
    ],
)
def test_each_gemma2_difference_changes_the_logits(loaded, change):
    """The reference exercises every Gemma 2 feature: dropping one breaks parity."""
    config, params = loaded["small_caps"]
    model = Gemma3LM.from_params(dataclasses.replace(config, **change), params)
    expected = np.array(REFERENCE["cases"]["small_caps"]["logits"])
    assert _relative_error(np.asarray(forward(model, TOKENS)), expected) > 1e-3


def test_presets_are_the_published_configs():
    two, nine, big = (Gemma3Config.preset(f"gemma2-{s}") for s in ("2b", "9b", "27b"))
    for c in (two, nine, big):
        assert (c.family, c.vocab_size, c.sliding_window) == ("gemma2", 256_000, 4096)
        assert (c.attn_logit_softcap, c.final_logit_softcap, c.qk_norm) == (50.0, 30.0, False)
        assert [c.is_global(i) for i in range(4)] == [False, True, False, True]
    assert (two.d_model, two.n_layers, two.n_heads, two.n_kv_heads, two.d_ff) == (
        2304,
        26,
        8,
        4,
        9216,
    )
    assert (nine.d_model, nine.n_layers, nine.d_ff) == (3584, 42, 14336)
    assert (big.d_model, big.n_layers, big.head_dim, big.d_ff) == (4608, 46, 128, 36864)
    assert math.isclose(big.query_scale, (4608 / 32) ** -0.5)
    assert math.isclose(two.query_scale, 256**-0.5)
    assert Gemma3Config.preset("google/gemma-2-9b-it") == nine
    assert Gemma3Config.preset("270m").family == "gemma3"
    assert "blocks.0.attn.query_norm" not in param_shapes(two)
    with pytest.raises(ValueError, match="gemma2-2b"):
        Gemma3Config.preset("gemma2-7b")


def test_released_style_config_json():
    """google/gemma-2-2b's config.json has no layer_types; every other layer is still global."""
    released = dict(
        architectures=["Gemma2ForCausalLM"],
        model_type="gemma2",
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        head_dim=256,
        hidden_size=2304,
        intermediate_size=9216,
        num_attention_heads=8,
        num_hidden_layers=26,
        num_key_value_heads=4,
        query_pre_attn_scalar=256,
        rope_theta=10000.0,
        sliding_window=4096,
        vocab_size=256000,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
    )
    assert config_from_hf(released) == Gemma3Config.preset("gemma2-2b")
    with pytest.raises(ValueError, match="config.json: unsupported rope scaling"):
        config_from_hf({**released, "rope_scaling": {"rope_type": "linear", "factor": 8.0}})


@pytest.fixture(scope="module")
def model() -> Gemma3LM:
    return gs.load_model(DATA / "gemma2_tiny" / "small_caps")


def test_last_resid_post_gives_the_soft_capped_logits(model):
    """Final RMSNorm, tied unembedding, then cap·tanh(·/cap), computed here in numpy."""
    resid = np.asarray(gs.capture(model, TOKENS, "blocks.3.resid_post")["blocks.3.resid_post"])
    normed = resid / np.sqrt((resid**2).mean(-1, keepdims=True) + 1e-6)
    raw = (normed * np.asarray(model.final_norm_scale())) @ np.asarray(model.embedding_table()).T
    cap = model.config.final_logit_softcap
    logits = np.asarray(forward(model, TOKENS))
    np.testing.assert_allclose(logits, cap * np.tanh(raw / cap), rtol=1e-4, atol=1e-5)
    # The logit lens reads a direction out the same way, soft-cap included.
    lens = np.asarray(direction_logits(model, resid[0]))
    np.testing.assert_allclose(lens, logits[0], rtol=1e-4, atol=1e-5)


def _sae(config: Gemma3Config, site: str, seed: int = 0) -> AutoEncoder:
    rng = np.random.default_rng(seed)
    d, w = config.d_model, 32
    meta = SaeMeta(d_in=d, d_sae=w, d_out=d, site_in=site, site_out=site)
    return AutoEncoder.from_arrays(
        w_enc=rng.normal(size=(d, w)).astype(np.float32) / np.sqrt(d),
        b_enc=np.zeros(w, np.float32),
        w_dec=rng.normal(size=(w, d)).astype(np.float32) / np.sqrt(w),
        b_dec=np.zeros(d, np.float32),
        threshold=np.full(w, 0.05, np.float32),
        meta=meta,
    )


def test_splice_and_steer_run_on_gemma2(model):
    clean = np.asarray(forward(model, TOKENS))
    sae = _sae(model.config, "blocks.2.resid_post")
    exact = np.asarray(forward(gs.splice(model, sae, include_error=True), TOKENS))
    np.testing.assert_allclose(exact, clean, atol=1e-5)
    spliced = np.asarray(forward(gs.splice(model, sae), TOKENS))
    assert np.abs(spliced - clean).max() > 1e-3
    direction = np.ones(model.config.d_model, np.float32)
    zero = np.asarray(forward(gs.steer(model, "blocks.1.resid_post", direction, 0.0), TOKENS))
    np.testing.assert_allclose(zero, clean, atol=1e-5)
    steered = np.asarray(forward(gs.steer(model, "blocks.1.resid_post", direction, 4.0), TOKENS))
    assert np.abs(steered - clean).max() > 1e-3
    # BOS is never steered: its logits stay exactly those of the clean model.
    np.testing.assert_allclose(steered[:, 0], clean[:, 0], atol=1e-5)


def test_generate_equals_greedy_full_forward_past_the_window():
    model = gs.load_model(DATA / "gemma2_tiny" / "float32")
    prompt = [2, 100, 200, 300]
    new = gs.generate(model, [prompt], max_new_tokens=6, stop_token=None)[0]
    seq = list(prompt)
    for _ in range(6):  # 10 tokens in all, the window is 5
        logits = np.asarray(forward(model, np.array([seq])))
        seq.append(int(logits[0, -1].argmax()))
    assert new == seq[len(prompt) :]
    assert len(set(new)) > 1


def test_orbax_gemma_library_layout(tmp_path):
    """Gemma 2 orbax trees are Gemma 3's without query/key norms; both layouts load."""
    from gemma_scope_pz.models.checkpoints import load_params
    from tests.fixtures_checkpoints import orbax_tree, write_checkpoint, write_orbax_dir

    config = Gemma3Config.tiny(family="gemma2", n_layers=4)
    path, _, params = write_checkpoint("orbax", tmp_path, config)
    got_config, got = load_params(path)
    assert got_config == config
    assert set(got) == set(params)
    for key in params:
        np.testing.assert_allclose(got[key], params[key], rtol=1e-6, atol=1e-6)
    # Without the config sidecar the missing query norms select the Gemma 2 presets.
    bare = write_orbax_dir(tmp_path / "bare" / "ckpt", orbax_tree(config, params, layout="nested"))
    with pytest.raises(ValueError, match="no Gemma 2 preset has n_layers=4, d_model=32"):
        load_params(bare)


def test_gemma2_vocabulary_turn_markers(tmp_path):
    """Gemma 2's vocabulary has one more "<unusedN>" piece: the turn markers are 106 and 107."""
    from gemma_scope_pz.models.tokenizer import Gemma3Tokenizer
    from tests.test_tokenizer import _tiny_vocab, _write_gguf

    tokens, scores, types_ = _tiny_vocab()
    tokens.insert(105, "<unused100>")
    scores.insert(105, -1000.0)
    types_.insert(105, 3)
    path = _write_gguf(tmp_path / "gemma2.gguf", vocab=(tokens, scores, types_))
    tok = Gemma3Tokenizer.from_gguf(path, cache_dir=tmp_path / "cache")
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (106, 107)
    assert tok.encode("<start_of_turn>ab<end_of_turn>", add_bos=False)[::2] == [106, 107]
    tokens[107] = (
        "<unused101>"  # a vocabulary with <start_of_turn> at 106 but no <end_of_turn> at 107
    )
    bad = _write_gguf(tmp_path / "bad.gguf", vocab=(tokens, scores, types_))
    with pytest.raises(ValueError, match=r"id 107 is '<unused101>', expected '<end_of_turn>'"):
        Gemma3Tokenizer.from_gguf(bad, cache_dir=tmp_path / "cache2")
