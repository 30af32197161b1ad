"""Capture, splice, clamp, steer, evaluate and logit lens on a tiny random Gemma 3, against numpy.

The oracle is ``tests/reference_gemma3.py`` (a plain numpy decoder that records every site). Where an
intervention changes an activation, the expected downstream values are computed in numpy from the
oracle's clean activations (upstream of the site nothing changes), and the model's own activation
after the intervention is read with a capture at a later site.
"""

import math

import numpy as np
import pytest
from penzai.toolshed.save_intermediates import SaveIntermediate

from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.gemma3 import Gemma3LM, forward
from gemma_scope_pz.models.sampling import generate
from gemma_scope_pz.scope import metrics
from gemma_scope_pz.scope.evaluate import evaluate_sae, top_features
from gemma_scope_pz.scope.interventions import capture, splice, steer
from gemma_scope_pz.scope.layers import AutoEncoder, AutoEncoderSkip, SaeMeta
from gemma_scope_pz.scope.lens import logit_lens
from gemma_scope_pz.scope.sites import attach
from tests import reference_gemma3 as ref

# Four blocks (1 and 3 global, 0 and 2 sliding-window) keep compiles short.
CONFIG = Gemma3Config.tiny(n_layers=4, sliding_window_pattern=2)
KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_out")
LAYER = 2  # where interventions go


def _tokens(batch=2, seq=9, seed=0):
    toks = np.random.default_rng(seed).integers(3, CONFIG.vocab_size, size=(batch, seq))
    toks[:, 0] = 2
    return toks.astype(np.int32)


TOKENS = _tokens()


@pytest.fixture(scope="module")
def setup():
    """(params, model, oracle logits, oracle sites) for TOKENS."""
    params = ref.random_params(CONFIG, seed=1)
    model = Gemma3LM.from_params(CONFIG, params)
    logits, sites = ref.forward_with_sites(CONFIG, params, TOKENS, dtype=np.float64)
    return params, model, logits, sites


def _random_sae(
    d_in, d_sae, activation, seed=0, *, d_out=None, skip=False, site_in="", site_out=""
):
    rng = np.random.default_rng(seed)
    d_out = d_out or d_in
    arrays = dict(
        w_enc=rng.standard_normal((d_in, d_sae)) / math.sqrt(d_in),
        b_enc=0.1 * rng.standard_normal(d_sae),
        w_dec=rng.standard_normal((d_sae, d_out)) / math.sqrt(d_sae),
        b_dec=0.1 * rng.standard_normal(d_out),
        threshold=np.abs(0.2 * rng.standard_normal(d_sae)) if activation == "jumprelu" else None,
        w_skip=rng.standard_normal((d_in, d_out)) / math.sqrt(d_in) if skip else None,
    )
    arrays = {k: (None if v is None else v.astype(np.float32)) for k, v in arrays.items()}
    meta = SaeMeta(
        d_in=d_in, d_sae=d_sae, d_out=d_out, site_in=site_in, site_out=site_out or site_in
    )
    sae = AutoEncoder.from_arrays(
        arrays.pop("w_enc"),
        arrays.pop("b_enc"),
        arrays.pop("w_dec"),
        arrays.pop("b_dec"),
        arrays.pop("threshold"),
        activation=activation,
        k=4 if activation == "topk" else None,
        w_skip=arrays.pop("w_skip"),
        meta=meta,
    )
    return sae


def _np_encode(sae, x):
    """Numpy latents of ``x`` [..., d_in] from ``sae.to_arrays()``."""
    a = {k: v.astype(np.float64) for k, v in sae.to_arrays().items()}
    pre = x @ a["w_enc"] + a["b_enc"]
    if sae.meta.activation == "jumprelu":
        return pre * (pre > a["threshold"])
    if sae.meta.activation == "relu":
        return np.maximum(pre, 0)
    # exactly k per token, ties to the lowest index (a stable sort of -pre), ReLU'd
    top = np.argsort(-pre, axis=-1, kind="stable")[..., : sae.meta.k]
    kept = np.zeros(pre.shape, bool)
    np.put_along_axis(kept, top, True, axis=-1)
    return np.maximum(np.where(kept, pre, 0), 0)


def _np_reconstruct(sae, x):
    a = {k: v.astype(np.float64) for k, v in sae.to_arrays().items()}
    out = _np_encode(sae, x) @ a["w_dec"] + a["b_dec"]
    if "w_skip" in a:
        out = out + x @ a["w_skip"]
    return out


def _logits(model, tokens=TOKENS):
    return np.asarray(forward(model, tokens), np.float64)


def _rel(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()


def _assert_close(got, want, rtol=2e-5, msg=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape, msg)
    rel = _rel(got, want)
    assert rel <= rtol, f"{msg}: relative max error {rel:.2e} > {rtol:.0e}"


def _after_resid_post(model, layer, tokens=TOKENS):
    """The residual stream right after block ``layer`` and anything attached there."""
    site = f"blocks.{layer + 1}.resid_pre"
    return np.asarray(capture(model, tokens, [site])[site], np.float64)


# ---------------------------------------------------------------------------------------------
# capture


def test_capture_every_kind_matches_oracle(setup):
    _, model, _, sites = setup
    names = [f"blocks.{L}.{k}" for L in (0, LAYER, CONFIG.n_layers - 1) for k in KINDS]
    early = capture(model, TOKENS, names)  # ONE call, many sites, stops after the last block
    full = capture(model, TOKENS, names, stop_early=False)
    assert list(early) == names
    for name in names:
        width = CONFIG.attn_width if name.endswith("attn_out") else CONFIG.d_model
        assert early[name].shape == (*TOKENS.shape, width), name
        _assert_close(early[name], sites[name], 1e-4, name)
        np.testing.assert_allclose(early[name], full[name], rtol=1e-6, atol=1e-6, err_msg=name)
    # resid_post of L is resid_pre of L+1 (the same array).
    both = capture(model, TOKENS, ["blocks.1.resid_post", "blocks.2.resid_pre"])
    np.testing.assert_array_equal(both["blocks.1.resid_post"], both["blocks.2.resid_pre"])
    # A single site name and a site needing only the embedding.
    single = capture(model, TOKENS, "blocks.0.resid_pre")["blocks.0.resid_pre"]
    _assert_close(single, sites["embed"], 1e-6, "embedding")


def test_capture_rejects_bad_sites(setup):
    model = setup[1]
    with pytest.raises(ValueError, match="blocks.4.resid_post"):
        capture(model, TOKENS, ["blocks.4.resid_post"])
    with pytest.raises(ValueError, match="Unknown site"):
        capture(model, TOKENS, ["blocks.1.resid_mid"])


# ---------------------------------------------------------------------------------------------
# splice


@pytest.mark.parametrize("activation", ["jumprelu", "topk", "relu"])
def test_splice_error_term_is_exact_and_bos_untouched(setup, activation):
    _, model, _, sites = setup
    site = f"blocks.{LAYER}.resid_post"
    sae = _random_sae(CONFIG.d_model, 48, activation, seed=3, site_in=site)
    clean = _logits(model)
    with_error = _logits(splice(model, sae, include_error=True))  # site from sae.meta
    _assert_close(with_error, clean, 1e-5, "spliced with error term")

    spliced = splice(model, sae, site)
    logits = _logits(spliced)
    assert _rel(logits, clean) > 1e-2, "splicing without the error term should change the logits"
    # BOS: position 0 only sees position 0, which splicing leaves alone.
    np.testing.assert_allclose(logits[:, 0], clean[:, 0], rtol=1e-6, atol=1e-6)
    after = _after_resid_post(spliced, LAYER)
    x = sites[site]
    np.testing.assert_array_equal(after[:, 0], np.asarray(capture(model, TOKENS, site)[site])[:, 0])
    _assert_close(after[:, 1:], _np_reconstruct(sae, x[:, 1:]), 1e-4, "reconstruction after BOS")


def test_identity_dictionary_spliced_without_error_changes_nothing(setup):
    _, model, _, _ = setup
    d = CONFIG.d_model
    eye = np.eye(d, dtype=np.float32)
    sae = AutoEncoder.from_arrays(
        np.concatenate([eye, -eye], axis=1),
        np.zeros(2 * d, np.float32),
        np.concatenate([eye, -eye], axis=0),
        np.zeros(d, np.float32),
        activation="relu",
    )
    for kind in ("resid_pre", "mlp_out"):
        logits = _logits(splice(model, sae, f"blocks.{LAYER}.{kind}"))
        _assert_close(logits, _logits(model), 1e-5, kind)


def test_clamp_to_current_value_and_ablation(setup):
    _, model, _, sites = setup
    site = f"blocks.{LAYER}.resid_post"
    sae = _random_sae(CONFIG.d_model, 40, "relu", seed=5, site_in=site)
    arrays = {key: np.array(value) for key, value in sae.to_arrays().items()}
    # Latent 7 is made constant (zero encoder column, bias 0.7): clamping it to 0.7 is a no-op.
    arrays["w_enc"][:, 7] = 0.0
    arrays["b_enc"][7] = 0.7
    sae = AutoEncoder.from_arrays(**arrays, activation="relu", meta=sae.meta)
    clean = _logits(model)
    same = _logits(splice(model, sae, include_error=True, clamp={7: 0.7}))
    _assert_close(same, clean, 1e-5, "clamp to the current value")

    x = sites[site]
    f = _np_encode(sae, x)
    feature = int(np.argmax((f[:, 1:] > 0).sum(axis=(0, 1))))  # the most often active latent
    assert (f[:, 1:, feature] > 0).sum() >= 4
    ablated = splice(model, sae, include_error=True, clamp={feature: 0.0})
    after = _after_resid_post(ablated, LAYER)
    w_dec = arrays["w_dec"].astype(np.float64)
    expected = x - f[..., feature : feature + 1] * w_dec[feature]
    expected[:, 0] = x[:, 0]
    _assert_close(after, expected, 1e-4, "ablated activation")
    assert _rel(_logits(ablated), clean) > 1e-3

    boosted = splice(model, sae, include_error=True, clamp={feature: 5.0})
    expected = x + (5.0 - f[..., feature : feature + 1]) * w_dec[feature]
    expected[:, 0] = x[:, 0]
    _assert_close(_after_resid_post(boosted, LAYER), expected, 1e-4, "clamped activation")


def test_clamp_rejects_out_of_range_latents(setup):
    sae = _random_sae(CONFIG.d_model, 40, "relu", site_in="blocks.1.resid_post")
    for bad in (40, -1):
        with pytest.raises(ValueError, match=str(bad)):
            splice(setup[1], sae, clamp={bad: 0.0})


# ---------------------------------------------------------------------------------------------
# steering


def test_steering_adds_the_vector_after_bos(setup):
    _, model, _, sites = setup
    site = f"blocks.{LAYER}.resid_post"
    direction = np.random.default_rng(7).standard_normal(CONFIG.d_model)
    unit = direction / np.linalg.norm(direction)
    clean = _logits(model)
    np.testing.assert_array_equal(_logits(steer(model, site, direction, 0.0)), clean)

    x = sites[site]
    for norm_scaled, coeff in ((True, 0.5), (False, 3.0)):
        steered = steer(model, site, direction, coeff, norm_scaled=norm_scaled)
        scale = coeff * np.linalg.norm(x, axis=-1, keepdims=True) if norm_scaled else coeff
        expected = x + scale * unit
        expected[:, 0] = x[:, 0]
        _assert_close(
            _after_resid_post(steered, LAYER), expected, 1e-4, f"norm_scaled={norm_scaled}"
        )
    logits = _logits(steered)
    np.testing.assert_allclose(logits[:, 0], clean[:, 0], rtol=1e-6, atol=1e-6)
    assert _rel(logits, clean) > 1e-3

    # Capturing the next block's input stops early but keeps the layer attached after block L.
    site_next = f"blocks.{LAYER + 1}.resid_pre"
    full = capture(steered, TOKENS, site_next, stop_early=False)[site_next]
    np.testing.assert_allclose(_after_resid_post(steered, LAYER), full, rtol=1e-6, atol=1e-5)

    # At mlp_out the steered vector enters the residual stream of the same block.
    steered = steer(model, f"blocks.{LAYER}.mlp_out", direction, 2.0, norm_scaled=False)
    expected = x + 2.0 * unit
    expected[:, 0] = x[:, 0]
    _assert_close(_after_resid_post(steered, LAYER), expected, 1e-4, "mlp_out steering")

    with pytest.raises(ValueError, match="nonzero"):
        steer(model, site, np.zeros(CONFIG.d_model), 1.0)
    with pytest.raises(ValueError, match="width"):
        steer(model, site, np.ones(CONFIG.d_model + 1), 1.0)


def test_steered_generation_matches_uncached_greedy(setup):
    model = setup[1]
    direction = np.random.default_rng(11).standard_normal(CONFIG.d_model)
    steered = steer(model, f"blocks.{LAYER}.resid_post", direction, 4.0)
    # A spliced SAE (ablating a latent) at another site also runs inside the KV-cached sampler.
    sae = _random_sae(CONFIG.d_model, 24, "topk", seed=31, site_in="blocks.1.mlp_out")
    steered = splice(steered, sae, include_error=True, clamp={3: 0.0})
    prompts = [TOKENS[0, :6].tolist(), TOKENS[1, :4].tolist()]  # left-padded together
    n_new = 5
    got = generate(steered, prompts, n_new, stop_token=None)

    def uncached_greedy(m, prompt):
        # A fixed-length buffer compiles once; the zeros after the current position cannot
        # influence it (causal attention).
        buffer = np.zeros((1, len(prompt) + n_new), np.int32)
        buffer[0, : len(prompt)] = prompt
        for t in range(len(prompt), len(prompt) + n_new):
            buffer[0, t] = np.argmax(_logits(m, buffer)[0, t - 1])
        return buffer[0, len(prompt) :].tolist()

    assert got == [uncached_greedy(steered, p) for p in prompts]
    assert got != [uncached_greedy(model, p) for p in prompts], "steering had no effect"


# ---------------------------------------------------------------------------------------------
# transcoders and attn_out


def test_transcoder_replaces_the_mlp(setup):
    _, model, _, sites = setup
    site_in, site_out = f"blocks.{LAYER}.mlp_in", f"blocks.{LAYER}.mlp_out"
    tc = _random_sae(
        CONFIG.d_model, 48, "jumprelu", seed=9, skip=True, site_in=site_in, site_out=site_out
    )
    assert isinstance(tc, AutoEncoderSkip)
    clean = _logits(model)
    _assert_close(_logits(splice(model, tc, include_error=True)), clean, 1e-5, "transcoder + error")

    replaced = splice(model, tc)
    mid = sites[f"blocks.{LAYER}.resid_post"] - sites[site_out]
    expected = mid + _np_reconstruct(tc, sites[site_in])
    expected[:, 0] = sites[f"blocks.{LAYER}.resid_post"][:, 0]
    _assert_close(_after_resid_post(replaced, LAYER), expected, 1e-4, "resid_post with transcoder")
    assert _rel(_logits(replaced), clean) > 1e-2
    across = _random_sae(CONFIG.d_model, 8, "relu", site_in=site_in, site_out="blocks.3.mlp_out")
    with pytest.raises(ValueError, match="spans blocks"):
        splice(model, across)


def test_transcoder_splice_keeps_layers_attached_at_mlp_in_and_mlp_out(setup):
    """The MLP branch is rewritten by name: layers already at mlp_in / mlp_out stay around it."""
    _, model, _, sites = setup
    site_in, site_out = f"blocks.{LAYER}.mlp_in", f"blocks.{LAYER}.mlp_out"
    tc = _random_sae(
        CONFIG.d_model, 48, "relu", seed=10, skip=True, site_in=site_in, site_out=site_out
    )
    probe = SaveIntermediate()
    direction = np.zeros(CONFIG.d_model, np.float32)
    direction[3] = 1.0
    edited = steer(attach(model, site_in, probe), site_out, direction, 2.5, norm_scaled=False)
    replaced = splice(edited, tc)
    mid = sites[f"blocks.{LAYER}.resid_post"] - sites[site_out]
    expected = mid + _np_reconstruct(tc, sites[site_in]) + 2.5 * direction
    expected[:, 0] = sites[f"blocks.{LAYER}.resid_post"][:, 0]
    _assert_close(_after_resid_post(replaced, LAYER), expected, 1e-4, "probe + transcoder + steer")
    forward(replaced, TOKENS)
    _assert_close(probe.saved.value.unwrap("batch", "seq", "embedding"), sites[site_in], 1e-5)


def test_attn_out_dictionary(setup):
    params, model, _, sites = setup
    site = f"blocks.{LAYER}.attn_out"
    sae = _random_sae(CONFIG.attn_width, 80, "jumprelu", seed=13, site_in=site)
    clean = _logits(model)
    _assert_close(_logits(splice(model, sae, include_error=True)), clean, 1e-5, "attn_out + error")

    # Without the error term: the projected reconstruction enters the residual stream.
    spliced = splice(model, sae)
    x_hat = _np_reconstruct(sae, sites[site])
    x_hat[:, 0] = sites[site][:, 0]
    p = {k: v.astype(np.float64) for k, v in params.items()}
    w_out = p[f"blocks.{LAYER}.attn.output"].reshape(CONFIG.attn_width, CONFIG.d_model)
    attn = ref.rms_norm(x_hat @ w_out, p[f"blocks.{LAYER}.post_attention_norm"], CONFIG.norm_eps)
    mid = sites[f"blocks.{LAYER}.resid_pre"] + attn
    expected_mlp_in = ref.rms_norm(mid, p[f"blocks.{LAYER}.pre_ffw_norm"], CONFIG.norm_eps)
    got = capture(spliced, TOKENS, f"blocks.{LAYER}.mlp_in")[f"blocks.{LAYER}.mlp_in"]
    _assert_close(got, expected_mlp_in, 1e-4, "mlp_in after attn_out splice")

    wrong = _random_sae(CONFIG.d_model, 16, "relu")
    with pytest.raises(ValueError, match=rf"d_in={CONFIG.d_model}.*{site}.*{CONFIG.attn_width}"):
        splice(model, wrong, site)


# ---------------------------------------------------------------------------------------------
# evaluation and lens


def _np_continue(params, x, start, config=CONFIG):
    """Numpy logits of the decoder run from residual stream ``x`` entering block ``start``."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    positions = np.broadcast_to(np.arange(x.shape[1]), x.shape[:2]).astype(np.float64)
    for layer in range(start, config.n_layers):
        b = f"blocks.{layer}."
        _, projected = ref.attention(
            config,
            p,
            layer,
            ref.rms_norm(x, p[b + "pre_attention_norm"], config.norm_eps),
            positions,
        )
        x = x + ref.rms_norm(projected, p[b + "post_attention_norm"], config.norm_eps)
        mlp_in = ref.rms_norm(x, p[b + "pre_ffw_norm"], config.norm_eps)
        x = x + ref.rms_norm(
            ref.mlp(config, p, layer, mlp_in), p[b + "post_ffw_norm"], config.norm_eps
        )
    return ref.rms_norm(x, p["final_norm"], config.norm_eps) @ p["embedding"].T


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_evaluate_sae_matches_numpy(setup):
    params, model, _, _ = setup
    site = f"blocks.{LAYER}.resid_post"
    sae = _random_sae(CONFIG.d_model, 40, "jumprelu", seed=17, site_in=site)
    batches = [_tokens(2, 9, seed=21), _tokens(2, 9, seed=22)]
    batches[1][1, 6:] = 0  # right padding
    result = evaluate_sae(model, sae, batches, progress=False)

    tokens = np.concatenate(batches)
    clean, sites = ref.forward_with_sites(CONFIG, params, tokens, dtype=np.float64)
    x = sites[site]
    counted = tokens != 0
    counted[:, 0] = False
    f = _np_encode(sae, x)
    x_hat = _np_reconstruct(sae, x)
    spliced = _np_continue(params, np.where(counted[..., None], x_hat, x), LAYER + 1)
    ablated = _np_continue(params, np.where(counted[..., None], 0.0, x), LAYER + 1)

    xs, hs = x[counted], x_hat[counted]
    fvu = ((xs - hs) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum()
    l0 = (f[counted] != 0).sum(-1).mean()
    pred = counted[:, :-1] & (tokens[:, 1:] != 0)

    def ce(logits):
        nll = -np.take_along_axis(_np_log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1)[..., 0]
        return nll[pred].mean()

    lp_clean, lp_spliced = _np_log_softmax(clean[:, :-1]), _np_log_softmax(spliced[:, :-1])
    kl = (np.exp(lp_clean) * (lp_clean - lp_spliced)).sum(-1)[pred].mean()
    ce_clean, ce_spliced, ce_ablated = ce(clean), ce(spliced), ce(ablated)
    expected = dict(
        fvu=fvu,
        l0=l0,
        ce_clean=ce_clean,
        ce_spliced=ce_spliced,
        ce_ablated=ce_ablated,
        kl=kl,
        delta_loss=ce_spliced - ce_clean,
        ce_recovered=(ce_ablated - ce_spliced) / (ce_ablated - ce_clean),
        dead_fraction=np.mean(~(f[counted] != 0).any(0)),
    )
    got = result.to_dict()
    assert got["n_tokens"] == counted.sum()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=2e-4, abs=1e-6), key
    assert 0 < result.l0 < 40 and result.kl > 0 and result.delta_loss != 0
    # Another pad id: the padded position's token is not a prediction target either.
    other_pad = [b.copy() for b in batches]
    other_pad[1][1, 6:] = 1
    again = evaluate_sae(model, sae, other_pad, pad_id=1, progress=False).to_dict()
    for key, value in got.items():
        assert again[key] == pytest.approx(value, rel=1e-6), key

    # The same numbers from the metrics module's functions on the concatenated batch.
    model_logits = _logits(model, tokens)
    assert result.fvu == pytest.approx(float(metrics.fvu(x, x_hat, counted)), rel=1e-4)
    assert result.l0 == pytest.approx(float(metrics.l0(f, counted)), rel=1e-5)
    assert result.ce_clean == pytest.approx(
        float(metrics.cross_entropy(model_logits, tokens, pred_mask(pred))), rel=1e-4
    )
    assert result.ce_spliced == pytest.approx(
        float(metrics.cross_entropy(spliced, tokens, pred_mask(pred))), rel=1e-4
    )
    assert result.kl == pytest.approx(
        float(metrics.kl_divergence(clean[:, :-1], spliced[:, :-1], pred)), rel=1e-3
    )
    assert result.ce_recovered == pytest.approx(
        float(metrics.ce_recovered(ce_clean, ce_spliced, ce_ablated)), rel=1e-4
    )


def pred_mask(pred):
    """[batch, seq-1] predicting-position mask padded to [batch, seq] (last column unused)."""
    return np.concatenate([pred, np.zeros((pred.shape[0], 1), bool)], axis=1)


def test_evaluate_transcoder_matches_numpy(setup):
    params, model, _, _ = setup
    site_in, site_out = f"blocks.{LAYER}.mlp_in", f"blocks.{LAYER}.mlp_out"
    tc = _random_sae(
        CONFIG.d_model, 48, "relu", seed=19, skip=True, site_in=site_in, site_out=site_out
    )
    result = evaluate_sae(model, tc, TOKENS, progress=False)
    _, sites = ref.forward_with_sites(CONFIG, params, TOKENS, dtype=np.float64)
    y, y_hat = sites[site_out][:, 1:], _np_reconstruct(tc, sites[site_in][:, 1:])
    fvu = ((y - y_hat) ** 2).sum() / ((y - y.reshape(-1, y.shape[-1]).mean(0)) ** 2).sum()
    assert result.fvu == pytest.approx(fvu, rel=1e-4)
    mid = sites[f"blocks.{LAYER}.resid_post"] - sites[site_out]
    ablated = _np_continue(
        params,
        np.concatenate([sites[f"blocks.{LAYER}.resid_post"][:, :1], mid[:, 1:]], 1),
        LAYER + 1,
    )
    pred = np.ones((TOKENS.shape[0], TOKENS.shape[1] - 1), bool)
    pred[:, 0] = False  # the prediction made at BOS does not count
    nll = -np.take_along_axis(_np_log_softmax(ablated[:, :-1]), TOKENS[:, 1:, None], -1)[..., 0]
    assert result.ce_ablated == pytest.approx(nll[pred].mean(), rel=1e-4)


def test_logit_lens_matches_numpy(setup):
    params, model, _, _ = setup
    sae = _random_sae(CONFIG.d_model, 24, "relu", seed=23)
    features, k = [0, 5, 23], 6
    results = logit_lens(model, sae, features, k=k)
    w_dec = sae.to_arrays()["w_dec"].astype(np.float64)
    for res, feature in zip(results, features, strict=True):
        d = w_dec[feature]
        d = d / np.sqrt(np.mean(d**2) + CONFIG.norm_eps) * params["final_norm"]
        logits = d @ params["embedding"].astype(np.float64).T
        order = np.argsort(-logits)
        assert res.feature == feature
        assert [i for i, _ in res.top] == order[:k].tolist()
        assert [i for i, _ in res.bottom] == order[::-1][:k].tolist()
        np.testing.assert_allclose([v for _, v in res.top], logits[order[:k]], rtol=1e-5)
        np.testing.assert_allclose([v for _, v in res.bottom], logits[order[::-1][:k]], rtol=1e-5)
    assert logit_lens(model, sae, 3, k=2)[0].feature == 3
    attn_sae = _random_sae(CONFIG.attn_width, 8, "relu")
    with pytest.raises(ValueError, match="d_model"):
        logit_lens(model, attn_sae, 0)
    for bad in (24, -1):
        with pytest.raises(ValueError, match=rf"\[{bad}\]"):
            logit_lens(model, sae, [0, bad])


def test_top_features_matches_numpy(setup):
    _, model, _, sites = setup
    site = f"blocks.{LAYER}.resid_post"
    sae = _random_sae(CONFIG.d_model, 24, "relu", seed=29, site_in=site)
    out = top_features(model, sae, TOKENS[0], k=3)
    f = _np_encode(sae, sites[site][0])
    raw = top_features(model, sae, TOKENS[0], k=3, exclude_bos=False)
    _assert_close(raw["latents"], f, 1e-4, "latents with BOS")
    _assert_close(raw["mean"], f.mean(0), 1e-4, "mean with BOS")
    f[0] = 0.0  # BOS does not count by default: its latents are zeroed
    np.testing.assert_array_equal(out["mask"], np.arange(TOKENS.shape[1]) > 0)
    assert out["ids"].shape == (TOKENS.shape[1], 3) and out["latents"].shape == (
        TOKENS.shape[1],
        24,
    )
    _assert_close(out["latents"], f, 1e-4, "latents")
    np.testing.assert_array_equal(out["ids"], np.argsort(-f, axis=-1)[:, :3])
    _assert_close(out["mean"], f[1:].mean(0), 1e-4, "mean after BOS")


def test_save_activation_is_a_deprecated_alias_of_penzais_save_intermediate():
    from gemma_scope_pz.scope import interventions

    with pytest.warns(DeprecationWarning, match="SaveIntermediate"):
        assert interventions.SaveActivation is SaveIntermediate
    with pytest.raises(AttributeError, match="no attribute 'SaveNothing'"):
        interventions.SaveNothing  # noqa: B018
