"""latents(), top_features() BOS handling and token_losses() on a tiny random Gemma 3, against numpy."""

import math

import numpy as np
import pytest

from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.gemma3 import Gemma3LM, forward
from gemma_scope_pz.scope.evaluate import evaluate_sae, latents, token_losses, top_features
from gemma_scope_pz.scope.interventions import splice
from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta
from gemma_scope_pz.scope.tokens import token_mask
from tests import reference_gemma3 as ref

CONFIG = Gemma3Config.tiny(n_layers=2, sliding_window_pattern=2)
SITE = "blocks.0.resid_post"
D_SAE = 16


@pytest.fixture(scope="module")
def setup():
    params = ref.random_params(CONFIG, seed=3)
    model = Gemma3LM.from_params(CONFIG, params)
    rng = np.random.default_rng(5)
    d = CONFIG.d_model
    arrays = {
        "w_enc": rng.standard_normal((d, D_SAE)) / math.sqrt(d),
        "b_enc": 0.1 * rng.standard_normal(D_SAE),
        "w_dec": rng.standard_normal((D_SAE, d)) / math.sqrt(D_SAE),
        "b_dec": 0.1 * rng.standard_normal(d),
    }
    arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
    meta = SaeMeta(d_in=d, d_sae=D_SAE, d_out=d, site_in=SITE, site_out=SITE)
    sae = AutoEncoder.from_arrays(
        arrays["w_enc"],
        arrays["b_enc"],
        arrays["w_dec"],
        arrays["b_dec"],
        None,
        activation="relu",
        meta=meta,
    )
    tokens = np.random.default_rng(7).integers(3, CONFIG.vocab_size, size=(2, 7)).astype(np.int32)
    tokens[:, 0] = 2
    _, sites = ref.forward_with_sites(CONFIG, params, tokens, dtype=np.float64)
    want = np.maximum(sites[SITE] @ arrays["w_enc"] + arrays["b_enc"], 0.0)
    return model, sae, tokens, want


def test_latents_of_a_batch(setup):
    model, sae, tokens, want = setup
    got = np.asarray(latents(model, sae, tokens))
    assert got.shape == (2, 7, D_SAE)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    one = np.asarray(latents(model, sae, tokens[1].tolist()))  # a plain list is one sequence
    np.testing.assert_allclose(one[0], got[1], rtol=1e-5, atol=1e-6)
    ragged = np.asarray(latents(model, sae, [tokens[0, :4].tolist(), tokens[1].tolist()]))
    np.testing.assert_allclose(ragged[0, :4], got[0, :4], rtol=1e-5, atol=1e-6)  # right-padded
    with pytest.raises(TypeError, match="token ids must be integers"):
        latents(model, sae, np.zeros((2, 3), np.float32))


def test_top_features_excludes_bos_by_default(setup):
    model, sae, tokens, want = setup
    f = want[0].copy()
    assert f[0].max() > 0  # BOS does fire, so excluding it matters
    out = top_features(model, sae, tokens[0], k=3)
    f[0] = 0.0
    np.testing.assert_allclose(out["latents"], f, rtol=1e-4, atol=1e-4 * np.abs(f).max())
    np.testing.assert_allclose(out["mean"], f[1:].mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["values"][1:], -np.sort(-f[1:], -1)[:, :3], rtol=1e-4, atol=1e-6)
    assert (out["values"][0] == 0).all() and out["mask"].tolist() == [False] + [True] * 6
    with pytest.raises(ValueError, match=r"one sequence \[seq\], got shape \(2, 7\)"):
        top_features(model, sae, tokens)


def _np_nll(logits, tokens):
    z = logits[:, :-1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]


def test_token_losses_clean_and_spliced(setup):
    model, sae, tokens, _ = setup
    out = token_losses(model, sae, tokens[0])
    row = tokens[:1]
    clean = _np_nll(np.asarray(forward(model, row)), row)[0]
    spliced = _np_nll(np.asarray(forward(splice(model, sae, SITE), row)), row)[0]
    np.testing.assert_allclose(out["clean"], clean, rtol=1e-4)
    np.testing.assert_allclose(out["spliced"], spliced, rtol=1e-4)
    assert not np.allclose(out["clean"][1:], out["spliced"][1:])  # the splice changes the loss
    np.testing.assert_allclose(out["clean"][0], out["spliced"][0], rtol=1e-5)  # BOS untouched
    with pytest.raises(ValueError, match=">= 2 tokens"):
        token_losses(model, sae, [2])


def test_evaluate_counts_the_token_mask(setup):
    """evaluate_sae counts exactly token_mask's positions, special ids included."""
    model, sae, tokens, want = setup
    special = (int(tokens[0, 3]), int(tokens[1, 5]))
    result = evaluate_sae(model, sae, tokens, special_ids=special, progress=False)
    mask = token_mask(tokens, special_ids=special)
    assert 0 < mask.sum() < tokens.size - 2
    assert result.n_tokens == mask.sum()
    assert result.l0 == pytest.approx((want[mask] > 0).sum(-1).mean(), rel=1e-5)
    plain = evaluate_sae(model, sae, tokens, progress=False)
    assert plain.n_tokens == token_mask(tokens).sum() == tokens.size - 2


def test_an_array_is_evaluated_in_batches_with_the_same_result(setup):
    """One array is split into ``batch_size`` contexts per forward; the metrics do not change."""
    model, sae, _, _ = setup
    tokens = np.random.default_rng(9).integers(3, CONFIG.vocab_size, size=(5, 7)).astype(np.int32)
    tokens[:, 0] = 2
    whole = evaluate_sae(model, sae, [tokens], progress=False).to_dict()  # one batch of 5
    split = evaluate_sae(model, sae, tokens, batch_size=2, progress=False).to_dict()  # 2 + 2 + 1
    assert split.keys() == whole.keys()
    # Batch shapes change the matmuls' summation order (AVX2 and AVX-512 kernels differ): float32
    # noise, amplified up to ~1e-4 in ce_recovered's ratio of loss differences.
    for key, value in whole.items():
        np.testing.assert_allclose(split[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        evaluate_sae(model, sae, tokens, batch_size=0, progress=False)
