"""The Penzai Gemma 3 against the numpy oracle, on tiny random configs (fast)."""

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz
from penzai.models.transformer.model_parts import TransformerBlock

from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.gemma3 import Gemma3LM, forward
from gemma_scope_pz.models.sampling import SamplingConfig, filter_logits, generate
from gemma_scope_pz.scope.interventions import capture
from tests import reference_gemma3 as ref

CONFIGS = {
    "gqa": Gemma3Config.tiny(),
    "mqa": Gemma3Config.tiny(n_kv_heads=1),
    "mha": Gemma3Config.tiny(n_kv_heads=4),
    "scaled_rope": Gemma3Config.tiny(global_rope_scale=8.0, query_pre_attn_scalar=12.0),
}


def _tokens(batch=2, seq=11, vocab=64, seed=0):
    toks = np.random.default_rng(seed).integers(3, vocab, size=(batch, seq)).astype(np.int32)
    toks[:, 0] = 2
    return toks


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_sites_match_numpy_oracle(name):
    config = CONFIGS[name]
    params = ref.random_params(config, seed=1)
    model = Gemma3LM.from_params(config, params)
    tokens = _tokens(seq=13)  # longer than the window of 4: local layers are really local
    logits = np.asarray(forward(model, tokens))
    expected, sites = ref.forward_with_sites(config, params, tokens, dtype=np.float64)
    np.testing.assert_allclose(logits, expected, atol=2e-4 * np.abs(expected).max(), rtol=0)
    names = [
        f"blocks.{L}.{k}"
        for L in (0, 3, 5)
        for k in ("resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_out")
    ]
    got = capture(model, tokens, names)
    for site in names:
        np.testing.assert_allclose(
            got[site], sites[site], atol=1e-4 * np.abs(sites[site]).max(), err_msg=site
        )


def test_sliding_window_restricts_attention():
    # Two local layers with window 4: position p depends on tokens p-6..p only.
    config = Gemma3Config.tiny(n_layers=2, sliding_window_pattern=1000)
    model = Gemma3LM.random(config, seed=3)
    tokens = _tokens(batch=1, seq=12)
    changed = tokens.copy()
    changed[0, 1] = (changed[0, 1] + 7) % 60 + 3
    diff = np.abs(np.asarray(forward(model, tokens)) - np.asarray(forward(model, changed))).max(-1)[
        0
    ]
    assert np.all(diff[8:] == 0), diff
    assert np.all(diff[1:8] > 0), diff
    # A global model sees everything.
    glob = Gemma3LM.random(Gemma3Config.tiny(n_layers=2, sliding_window_pattern=1), seed=3)
    diff = np.abs(np.asarray(forward(glob, tokens)) - np.asarray(forward(glob, changed))).max(-1)[0]
    assert np.all(diff[1:] > 0)


def test_blocks_selectable_like_the_tutorial():
    model = Gemma3LM.random(Gemma3Config.tiny())
    sel = pz.select(model).at_instances_of(TransformerBlock)
    assert sel.count() == model.config.n_layers
    marker = pz.nn.Identity()
    patched = sel.pick_nth_selected(2).insert_after(marker)
    assert len(patched.body.sublayers) == len(model.body.sublayers) + 1


def test_bfloat16_parameters_with_float32_activations():
    config = CONFIGS["gqa"]
    params = ref.random_params(config, seed=2)
    tokens = _tokens()
    f32 = np.asarray(forward(Gemma3LM.from_params(config, params), tokens))
    bf16 = Gemma3LM.from_params(config, params, dtype=jnp.bfloat16, activation_dtype=jnp.float32)
    weights = pz.select(bf16).at_instances_of(pz.Parameter).get_sequence()
    assert all(p.value.dtype == jnp.bfloat16 for p in weights)
    out = np.asarray(forward(bf16, tokens))
    assert out.dtype == np.float32
    assert np.abs(out - f32).max() < 0.05 * np.abs(f32).max()


def test_bad_parameters_are_named():
    config = Gemma3Config.tiny()
    params = ref.random_params(config)
    params["blocks.1.mlp.up"] = params["blocks.1.mlp.up"][:, :5]
    del params["final_norm"]
    with pytest.raises(ValueError, match=r"missing final_norm.*blocks\.1\.mlp\.up: expected shape"):
        Gemma3LM.from_params(config, params)


def test_kv_cached_generation_matches_uncached_greedy_for_ragged_batch():
    model = Gemma3LM.random(Gemma3Config.tiny(n_kv_heads=1), seed=5)
    rng = np.random.default_rng(1)
    prompts = [[2, *rng.integers(3, 64, size=n).tolist()] for n in (9, 3, 6)]
    out = generate(model, prompts, 10, stop_token=None)
    for prompt, new in zip(prompts, out):
        seq = list(prompt)
        for _ in range(10):
            seq.append(int(np.argmax(np.asarray(forward(model, np.array([seq])))[0, -1])))
        assert seq[len(prompt) :] == new


def test_generation_stops_at_stop_token():
    model = Gemma3LM.random(Gemma3Config.tiny(), seed=5)
    first = generate(model, [[2, 5, 6]], 6, stop_token=None)[0]
    stop = first[2]
    out = generate(model, [[2, 5, 6]], 6, stop_token=stop)[0]
    assert out == first[: first.index(stop) + 1]


def test_top_p_keeps_smallest_set_reaching_p():
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = jnp.log(jnp.asarray(probs))[None]
    for p, kept in [(0.5, 1), (0.51, 2), (0.7, 2), (0.71, 3), (0.95, 4), (0.951, 5), (1.0, 5)]:
        out = filter_logits(logits, SamplingConfig(temperature=1.0, top_p=p))
        assert int(np.isfinite(np.asarray(out)).sum()) == kept, (p, out)
    # The kept tokens are the most likely ones, whatever their order in the vocabulary.
    shuffled = jnp.log(jnp.asarray(probs[[3, 0, 4, 2, 1]]))[None]
    out = np.asarray(filter_logits(shuffled, SamplingConfig(temperature=1.0, top_p=0.7)))
    assert np.isfinite(out[0]).tolist() == [False, True, False, False, True]
    top2 = np.asarray(filter_logits(logits, SamplingConfig(temperature=1.0, top_k=2)))
    assert np.isfinite(top2[0]).tolist() == [True, True, False, False, False]


def test_sampling_distribution_follows_top_p():
    model = Gemma3LM.random(Gemma3Config.tiny(vocab_size=16), seed=0)
    outs = [
        generate(model, [[2, 3]], 1, temperature=1.0, top_p=0.3, seed=s, stop_token=None)[0][0]
        for s in range(8)
    ]
    logits = np.asarray(forward(model, np.array([[2, 3]])))[0, -1]
    allowed = np.isfinite(
        np.asarray(filter_logits(jnp.asarray(logits)[None], SamplingConfig(1.0, None, 0.3)))
    )[0]
    assert all(allowed[t] for t in outs)


def test_bfloat16_model_runs_interventions_and_generation():
    from gemma_scope_pz.scope.interventions import splice, steer
    from gemma_scope_pz.scope.layers import AutoEncoder

    config = CONFIGS["gqa"]
    model = Gemma3LM.from_params(config, ref.random_params(config, seed=4), dtype=jnp.bfloat16)
    tokens = _tokens()
    clean = np.asarray(forward(model, tokens).astype(jnp.float32))
    rng = np.random.default_rng(0)
    d, m = config.d_model, 64
    sae = AutoEncoder.from_arrays(
        rng.standard_normal((d, m)).astype(np.float32) / np.sqrt(d),
        np.zeros(m, np.float32),
        rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(m),
        np.zeros(d, np.float32),
        activation="relu",
    )
    exact = np.asarray(
        forward(splice(model, sae, "blocks.2.resid_post", include_error=True), tokens).astype(
            jnp.float32
        )
    )
    # The error term is computed in float32 and cast back to bfloat16: equal up to bf16 rounding.
    assert np.abs(exact - clean).max() <= 0.02 * np.abs(clean).max()
    zero = np.asarray(
        forward(steer(model, "blocks.2.resid_post", np.ones(d), 0.0), tokens).astype(jnp.float32)
    )
    np.testing.assert_array_equal(zero, clean)
    out = generate(model, [[2, 5, 6]], 4, stop_token=None)[0]
    assert len(out) == 4 and all(0 <= t < config.vocab_size for t in out)


def test_named_accessors_return_the_loaded_arrays():
    config = CONFIGS["gqa"]
    params = ref.random_params(config, seed=7)
    model = Gemma3LM.from_params(config, params)
    for m in (model, pz.freeze_params(model)):
        np.testing.assert_array_equal(np.asarray(m.final_norm_scale()), params["final_norm"])
        np.testing.assert_array_equal(np.asarray(m.embedding_table()), params["embedding"])
        assert len(m.blocks) == config.n_layers
        assert all(isinstance(b, TransformerBlock) for b in m.blocks)
    assert isinstance(model.final_norm(), pz.nn.RMSLayerNorm)
