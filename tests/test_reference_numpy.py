"""Self-checks of the numpy Gemma 3 oracle (tests/reference_gemma3.py), without torch.

Each test checks a structural property the architecture must have (causality, the sliding
window's receptive field, RoPE's relative-position invariance, the grouped-query head mapping)
or compares against a second, differently written implementation of one block.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from gemma_scope_pz.models.config import Gemma3Config
from tests.reference_gemma3 import (
    check_params,
    forward,
    forward_with_sites,
    gelu_tanh,
    random_params,
    rms_norm,
)

LOCAL_ONLY = 1000  # a sliding_window_pattern no layer index reaches: every layer is local
REPO = Path(__file__).resolve().parents[1]


def tokens_for(config: Gemma3Config, batch: int, seq: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, config.vocab_size, (batch, seq)).astype(np.int32)


def hidden_after(config, params, tokens, layer):
    _, sites = forward_with_sites(config, params, tokens, dtype=np.float64, compute_logits=False)
    return sites[f"blocks.{layer}.resid_post"]


def test_shapes_and_hidden_states():
    config = Gemma3Config.tiny()
    params = random_params(config)
    tokens = tokens_for(config, 2, 7)
    logits, hidden = forward(config, params, tokens, return_hidden=True)
    assert logits.shape == (2, 7, config.vocab_size) and logits.dtype == np.float32
    assert len(hidden) == config.n_layers
    assert all(h.shape == (2, 7, config.d_model) for h in hidden)
    assert np.all(np.isfinite(logits))
    np.testing.assert_array_equal(forward(config, params, tokens), logits)


def test_causal():
    config = Gemma3Config.tiny()
    params = random_params(config)
    tokens = tokens_for(config, 1, 10)
    changed = tokens.copy()
    changed[0, 6] = (tokens[0, 6] + 1) % config.vocab_size
    a = forward(config, params, tokens, dtype=np.float64)
    b = forward(config, params, changed, dtype=np.float64)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.all(np.abs(a[:, 6:] - b[:, 6:]).max(axis=-1) > 1e-6)


def test_batch_rows_independent():
    config = Gemma3Config.tiny()
    params = random_params(config)
    tokens = tokens_for(config, 3, 8)
    together = forward(config, params, tokens, dtype=np.float64)
    for row in range(3):
        alone = forward(config, params, tokens[row : row + 1], dtype=np.float64)
        np.testing.assert_allclose(together[row], alone[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_layers", [1, 2])
def test_sliding_window_receptive_field(n_layers):
    # With only local layers of window w, position i after L blocks sees tokens j with
    # i - j <= L * (w - 1), and no earlier ones.
    window, seq = 4, 12
    config = Gemma3Config.tiny(
        n_layers=n_layers, sliding_window=window, sliding_window_pattern=LOCAL_ONLY
    )
    assert not any(config.is_global(i) for i in range(n_layers))
    params = random_params(config, seed=3)
    tokens = tokens_for(config, 1, seq)
    base = hidden_after(config, params, tokens, n_layers - 1)
    first_visible = seq - 1 - n_layers * (window - 1)
    for position, expect_change in [(first_visible - 1, False), (first_visible, True)]:
        changed = tokens.copy()
        changed[0, position] = (tokens[0, position] + 7) % config.vocab_size
        delta = np.abs(hidden_after(config, params, changed, n_layers - 1) - base)[0, seq - 1]
        assert (delta.max() > 1e-9) == expect_change, (position, delta.max())


def test_window_is_inclusive_of_self():
    # One local layer, window 4: query 11 sees keys 8..11, so token 8 matters and 7 does not.
    config = Gemma3Config.tiny(n_layers=1, sliding_window=4, sliding_window_pattern=LOCAL_ONLY)
    params = random_params(config, seed=4)
    tokens = tokens_for(config, 1, 12)
    base = hidden_after(config, params, tokens, 0)[0, 11]
    deltas = {}
    for position in (7, 8):
        changed = tokens.copy()
        changed[0, position] = (tokens[0, position] + 5) % config.vocab_size
        deltas[position] = np.abs(hidden_after(config, params, changed, 0)[0, 11] - base).max()
    assert deltas[7] == 0.0 and deltas[8] > 1e-9


def test_global_layer_sees_everything():
    config = Gemma3Config.tiny(n_layers=1, sliding_window=4, sliding_window_pattern=1)
    assert config.is_global(0)
    params = random_params(config, seed=5)
    tokens = tokens_for(config, 1, 12)
    changed = tokens.copy()
    changed[0, 0] = (tokens[0, 0] + 3) % config.vocab_size
    delta = np.abs(
        hidden_after(config, params, changed, 0) - hidden_after(config, params, tokens, 0)
    )
    assert delta[0, 11].max() > 1e-9


@pytest.mark.parametrize("pattern,rope_scale", [(LOCAL_ONLY, 1.0), (2, 8.0)])
def test_rope_relative_position_invariance(pattern, rope_scale):
    # Shifting every position by a constant must not change anything: attention depends on
    # relative positions only (for global layers after dividing by the RoPE scale).
    config = Gemma3Config.tiny(
        n_layers=4, sliding_window_pattern=pattern, global_rope_scale=rope_scale
    )
    params = random_params(config, seed=6)
    tokens = tokens_for(config, 2, 9)
    positions = np.broadcast_to(np.arange(9), (2, 9))
    a = forward(config, params, tokens, positions=positions, dtype=np.float64)
    b = forward(config, params, tokens, positions=positions + 37, dtype=np.float64)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * np.abs(a).max())
    # ... while a non-uniform change of positions does change the output.
    c = forward(config, params, tokens, positions=positions * 2, dtype=np.float64)
    assert np.abs(a - c).max() > 1e-6


def test_global_rope_scale_only_affects_global_layers():
    tokens = tokens_for(Gemma3Config.tiny(), 1, 9)
    outputs = {}
    for pattern in (LOCAL_ONLY, 2):
        for scale in (1.0, 8.0):
            config = Gemma3Config.tiny(
                n_layers=2, sliding_window_pattern=pattern, global_rope_scale=scale
            )
            outputs[pattern, scale] = forward(
                config, random_params(config, seed=7), tokens, dtype=np.float64
            )
    np.testing.assert_array_equal(outputs[LOCAL_ONLY, 1.0], outputs[LOCAL_ONLY, 8.0])
    assert np.abs(outputs[2, 1.0] - outputs[2, 8.0]).max() > 1e-6


def test_global_rope_scale_divides_positions():
    # Linear RoPE scaling: a global layer with scale s at positions p equals scale 1 at p / s.
    scaled = Gemma3Config.tiny(n_layers=1, sliding_window_pattern=1, global_rope_scale=8.0)
    plain = Gemma3Config.tiny(n_layers=1, sliding_window_pattern=1)
    params = random_params(scaled, seed=11)
    tokens = tokens_for(scaled, 1, 9)
    positions = np.arange(9)[None] * 3
    np.testing.assert_allclose(
        forward(scaled, params, tokens, positions=positions, dtype=np.float64),
        forward(plain, params, tokens, positions=positions / 8.0, dtype=np.float64),
        rtol=0,
        atol=1e-12,
    )


def test_grouped_query_head_mapping():
    # A GQA model equals the multi-head model whose key/value heads are copies: query head h
    # reads kv head h // (n_heads // n_kv_heads).
    gqa = Gemma3Config.tiny(n_heads=4, n_kv_heads=2)
    mha = Gemma3Config.tiny(n_heads=4, n_kv_heads=4)
    params = random_params(gqa, seed=8)
    expanded = dict(params)
    for layer in range(gqa.n_layers):
        for kind in ("key", "value"):
            name = f"blocks.{layer}.attn.{kind}"
            expanded[name] = params[name][:, [h // 2 for h in range(4)], :]
    tokens = tokens_for(gqa, 2, 8)
    np.testing.assert_allclose(
        forward(gqa, params, tokens, dtype=np.float64),
        forward(mha, expanded, tokens, dtype=np.float64),
        rtol=0,
        atol=1e-12,
    )
    # The other plausible mapping (h % n_kv_heads) gives a different model.
    for layer in range(gqa.n_layers):
        for kind in ("key", "value"):
            name = f"blocks.{layer}.attn.{kind}"
            expanded[name] = params[name][:, [h % 2 for h in range(4)], :]
    assert np.abs(forward(gqa, params, tokens) - forward(mha, expanded, tokens)).max() > 1e-4


def second_implementation_block0(config, params, tokens):
    """One decoder block written differently: complex-number RoPE, explicit per-query loops."""
    c = config
    p = "blocks.0."
    x = params["embedding"][tokens[0]] * math.sqrt(c.d_model)  # [T, d]
    seq = x.shape[0]

    def norm(v, scale):
        return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + c.norm_eps) * scale

    def rotate(v, base):  # v: [T, head_dim]; pair i with i + half as a complex number
        half = c.head_dim // 2
        z = v[:, :half] + 1j * v[:, half:]
        theta = np.arange(seq)[:, None] * np.power(float(base), -2.0 * np.arange(half) / c.head_dim)
        z = z * np.exp(1j * theta)
        return np.concatenate([z.real, z.imag], axis=-1)

    base = c.global_rope_base if c.is_global(0) else c.local_rope_base
    window = seq if c.is_global(0) else c.sliding_window
    h_in = norm(x, params[p + "pre_attention_norm"])
    w_q = params[p + "attn.query"].reshape(c.d_model, -1)
    w_k = params[p + "attn.key"].reshape(c.d_model, -1)
    w_v = params[p + "attn.value"].reshape(c.d_model, -1)
    q_all = (h_in @ w_q).reshape(seq, c.n_heads, c.head_dim)
    k_all = (h_in @ w_k).reshape(seq, c.n_kv_heads, c.head_dim)
    v_all = (h_in @ w_v).reshape(seq, c.n_kv_heads, c.head_dim)
    heads = np.zeros((seq, c.n_heads, c.head_dim))
    per_kv = c.n_heads // c.n_kv_heads
    for h in range(c.n_heads):
        q = rotate(norm(q_all[:, h], params[p + "attn.query_norm"]), base)
        k = rotate(norm(k_all[:, h // per_kv], params[p + "attn.key_norm"]), base)
        v = v_all[:, h // per_kv]
        for i in range(seq):
            keys = range(max(0, i - window + 1), i + 1)
            s = np.array([q[i] @ k[j] / math.sqrt(c.query_pre_attn_scalar) for j in keys])
            w = np.exp(s - s.max())
            heads[i, h] = sum(wj * v[j] for wj, j in zip(w / w.sum(), keys, strict=True))
    attn = heads.reshape(seq, -1) @ params[p + "attn.output"].reshape(-1, c.d_model)
    x = x + norm(attn, params[p + "post_attention_norm"])
    m = norm(x, params[p + "pre_ffw_norm"])
    gate = m @ params[p + "mlp.gate"]
    gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
    return x + norm(
        (gelu * (m @ params[p + "mlp.up"])) @ params[p + "mlp.down"], params[p + "post_ffw_norm"]
    )


@pytest.mark.parametrize("pattern", [LOCAL_ONLY, 1])
def test_block_matches_second_implementation(pattern):
    config = Gemma3Config.tiny(n_layers=1, sliding_window=3, sliding_window_pattern=pattern)
    params = {k: v.astype(np.float64) for k, v in random_params(config, seed=9).items()}
    tokens = tokens_for(config, 1, 10)
    ours = hidden_after(config, params, tokens, 0)[0]
    np.testing.assert_allclose(
        ours, second_implementation_block0(config, params, tokens), atol=1e-10
    )


def test_sites_are_consistent():
    config = Gemma3Config.tiny(n_layers=2)
    params = random_params(config, seed=10)
    tokens = tokens_for(config, 1, 5)
    _, s = forward_with_sites(config, params, tokens, dtype=np.float64)
    np.testing.assert_allclose(s["embed"], params["embedding"][tokens] * math.sqrt(config.d_model))
    np.testing.assert_array_equal(s["blocks.1.resid_pre"], s["blocks.0.resid_post"])
    np.testing.assert_allclose(
        s["blocks.0.resid_mid"] + s["blocks.0.mlp_out"], s["blocks.0.resid_post"]
    )
    np.testing.assert_allclose(
        s["blocks.0.mlp_in"],
        rms_norm(s["blocks.0.resid_mid"], params["blocks.0.pre_ffw_norm"], 1e-6),
    )
    assert s["blocks.0.attn_out"].shape == (1, 5, config.n_heads * config.head_dim)


def test_elementwise_helpers():
    x = np.linspace(-4, 4, 101)
    exact_gelu = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    assert np.abs(gelu_tanh(x) - exact_gelu).max() < 1e-3
    y = rms_norm(np.array([[3.0, -4.0]]), np.array([2.0, 1.0]), eps=0.0)
    np.testing.assert_allclose(y, [[3 / math.sqrt(12.5) * 2, -4 / math.sqrt(12.5)]])


def test_bad_params_and_tokens_raise():
    config = Gemma3Config.tiny()
    params = random_params(config)
    bad = dict(params)
    bad["blocks.2.mlp.up"] = bad["blocks.2.mlp.up"][:, :-1]
    with pytest.raises(ValueError, match="blocks.2.mlp.up"):
        check_params(config, bad)
    del bad["blocks.2.mlp.up"]
    with pytest.raises(ValueError, match="missing"):
        forward(config, bad, tokens_for(config, 1, 3))
    with pytest.raises(ValueError, match="token ids"):
        forward(config, params, np.array([[0, config.vocab_size]]))


# ------------------------------------------------------------------ real 270M vs transformers

REFERENCE = REPO / "tests" / "data" / "reference_270m.json"


@pytest.mark.slow
def test_oracle_matches_transformers_270m():
    """The oracle on the dequantized 270M GGUF reproduces the numbers transformers recorded,
    including positions beyond the 512-token sliding window."""
    spec = importlib.util.spec_from_file_location(
        "reference_transformers", REPO / "scripts" / "reference_transformers.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from gemma_scope_pz.models.sources import resolve_default_gguf

    config, params = module.gguf_to_canonical(resolve_default_gguf())  # assembled on first use
    reference = json.loads(REFERENCE.read_text())
    assert max(reference["long_context"]["positions"]) >= config.sliding_window
    entries = {**reference["prompts"], "long": reference["long_context"]}
    for name, entry in entries.items():
        _, sites = forward_with_sites(
            config, params, np.array([entry["input_ids"]]), compute_logits=False
        )
        logits = sites["final_norm"][0, entry["positions"]] @ params["embedding"].T
        scale = np.array(entry["max_abs_logit"])[:, None]
        delta = np.abs(logits[:, entry["subset_ids"]] - np.array(entry["subset_logits"])) / scale
        assert delta.max() < 1e-3, name
        np.testing.assert_array_equal(np.argmax(logits, -1), np.array(entry["top_ids"])[:, 0])
        if "mean_nll" in entry:
            assert abs(module.mean_nll(logits, entry["input_ids"]) - entry["mean_nll"]) < 1e-3
