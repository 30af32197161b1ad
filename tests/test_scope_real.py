"""Interventions on the real offline Gemma 3 270M with dictionaries fitted inside the tests (slow).

No Gemma Scope download is needed: a closed-form "PCA dictionary" is fitted at blocks.9.resid_post
(encoder ``[U, -U]`` with ReLU on centred activations, decoder ``[U^T; -U^T]``, ``b_dec`` the mean,
so the reconstruction is the projection on the top principal directions ``U``), and a linear
mlp_in -> mlp_out map fitted by least squares is saved and reloaded as a Gemma Scope 2 transcoder
whose ``affine_skip_connection`` carries all of its output.
"""

import itertools

import numpy as np
import pytest

import gemma_scope_pz as gs
from gemma_scope_pz.analysis.html import highlight_tokens
from gemma_scope_pz.data.corpus import default_corpus
from gemma_scope_pz.data.packing import pack_contexts, real_token_mask
from gemma_scope_pz.scope.formats import save_gemma_scope_2
from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta

pytestmark = pytest.mark.slow
SITE = "blocks.9.resid_post"
N_COMPONENTS = 32


@pytest.fixture(scope="module")
def contexts(real_tokenizer):
    """12 contexts of 64 tokens from the offline default corpus (English documentation)."""
    rows = itertools.islice(pack_contexts(default_corpus(), real_tokenizer, 64, tail="drop"), 12)
    return np.stack(list(rows))


@pytest.fixture(scope="module")
def pca_sae(real_model, contexts):
    """The PCA dictionary fitted on the first 8 contexts (the last 4 are held out)."""
    train = contexts[:8]
    x = np.asarray(gs.capture(real_model, train, SITE)[SITE], np.float64)[real_token_mask(train, 0)]
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    u = vt[:N_COMPONENTS].T  # [d_model, m], orthonormal columns
    w_enc = np.concatenate([u, -u], axis=1)
    return AutoEncoder.from_arrays(
        w_enc.astype(np.float32),
        (-mean @ w_enc).astype(np.float32),
        w_enc.T.copy().astype(np.float32),
        mean.astype(np.float32),
        activation="relu",
        meta=SaeMeta(d_in=640, d_sae=2 * N_COMPONENTS, d_out=640, site_in=SITE, site_out=SITE),
    )


def test_pca_dictionary_evaluation(real_model, contexts, pca_sae):
    held_out = contexts[8:]
    result = gs.evaluate_sae(real_model, pca_sae, held_out, progress=False)
    print(f"\nPCA dictionary ({N_COMPONENTS} directions) at {SITE} on held-out text: {result}")
    assert result.n_tokens == real_token_mask(held_out, 0).sum()
    assert 0 < result.fvu < 1
    assert 0 < result.l0 <= N_COMPONENTS  # at most one of each +/- pair fires
    for key in ("ce_clean", "ce_spliced", "ce_ablated", "delta_loss", "kl"):
        assert np.isfinite(getattr(result, key)), key
    assert result.ce_clean < result.ce_spliced < result.ce_ablated
    assert 0 < result.ce_recovered < 1

    # The numbers of the exact projection, from captured activations in numpy.
    x = np.asarray(gs.capture(real_model, held_out, SITE)[SITE], np.float64)[
        real_token_mask(held_out, 0)
    ]
    a = pca_sae.to_arrays()
    u = a["w_enc"][:, :N_COMPONENTS].astype(np.float64)
    x_hat = a["b_dec"] + (x - a["b_dec"]) @ u @ u.T
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert result.fvu == pytest.approx(fvu, rel=1e-3)


def test_steering_changes_the_greedy_continuation(real_model, real_tokenizer, pca_sae):
    prompt = real_tokenizer.encode("The capital of France is")
    direction = pca_sae.to_arrays()["w_dec"][0]
    clean = gs.generate(real_model, [prompt], 8, stop_token=None)
    zero = gs.generate(gs.steer(real_model, SITE, direction, 0.0), [prompt], 8, stop_token=None)
    strong = gs.generate(gs.steer(real_model, SITE, direction, 2.0), [prompt], 8, stop_token=None)
    print(
        f"\nclean: {real_tokenizer.decode(clean[0])!r}\nsteered: {real_tokenizer.decode(strong[0])!r}"
    )
    assert zero == clean
    assert strong != clean


def test_top_features_lens_and_highlight(real_model, real_tokenizer, pca_sae):
    tokens = real_tokenizer.encode("Paris is a <b>city</b> & the capital of France.")
    k = 4
    top = gs.top_features(real_model, pca_sae, tokens, k=k)
    assert top["ids"].shape == top["values"].shape == (len(tokens), k)
    assert top["latents"].shape == (len(tokens), 2 * N_COMPONENTS)
    assert np.all(np.diff(top["values"], axis=-1) <= 0) and np.all(top["values"] >= 0)
    assert not top["mask"][0] and not top["latents"][0].any()  # BOS never counted
    lens = gs.logit_lens(real_model, pca_sae, [0, 1], k=5)
    assert [r.feature for r in lens] == [0, 1]
    for r in lens:
        assert len(r.top) == len(r.bottom) == 5
        assert all(0 <= i < real_model.config.vocab_size for i, _ in r.top + r.bottom)
        assert r.top[0][1] >= r.top[-1][1] > r.bottom[-1][1] >= r.bottom[0][1]
    strings = real_tokenizer.token_strings(tokens)
    html = highlight_tokens(strings, top["latents"][:, top["ids"][-1, 0]], title="<feature>")
    assert "<b>city" not in html and "&lt;b&gt;" in html and "&lt;feature&gt;" in html
    assert html.count('<span class="gs-tok"') == len(tokens)


def test_reloaded_transcoder_applies_the_skip_as_x_at_w(real_model, contexts, tmp_path):
    """A least-squares mlp_in -> mlp_out map, saved as ``affine_skip_connection`` and reloaded."""
    layer = 5
    site_in, site_out = f"blocks.{layer}.mlp_in", f"blocks.{layer}.mlp_out"
    acts = gs.capture(real_model, contexts[:8], [site_in, site_out])
    mask = real_token_mask(contexts[:8], 0)
    x, y = (np.asarray(acts[s], np.float64)[mask] for s in (site_in, site_out))
    x_mean, y_mean = x.mean(0), y.mean(0)
    ridge = 1e-3 * np.trace((x - x_mean).T @ (x - x_mean)) / x.shape[1]
    w = np.linalg.solve(
        (x - x_mean).T @ (x - x_mean) + ridge * np.eye(x.shape[1]), (x - x_mean).T @ (y - y_mean)
    )
    b = y_mean - x_mean @ w
    d, n = x.shape[1], 16
    transcoder = AutoEncoder.from_arrays(
        np.zeros((d, n), np.float32),
        np.zeros(n, np.float32),
        np.zeros((n, d), np.float32),
        b.astype(np.float32),
        np.ones(n, np.float32),  # latents never fire: the output is x @ W + b
        activation="jumprelu",
        w_skip=w.astype(np.float32),
        meta=SaeMeta(d_in=d, d_sae=n, d_out=d, site_in=site_in, site_out=site_out),
    )
    folder = save_gemma_scope_2(
        transcoder, tmp_path / f"transcoder/layer_{layer}_width_16_l0_0", model_name="270m"
    )
    loaded = gs.load_sae(folder)
    assert isinstance(loaded, gs.AutoEncoderSkip)
    assert (loaded.meta.site_in, loaded.meta.site_out) == (site_in, site_out)

    held_out = contexts[8:]
    acts = gs.capture(real_model, held_out, [site_in, site_out])
    hmask = real_token_mask(held_out, 0)
    xh, yh = (np.asarray(acts[s], np.float64)[hmask] for s in (site_in, site_out))

    def fvu(pred):
        return ((yh - pred) ** 2).sum() / ((yh - yh.mean(0)) ** 2).sum()

    fvu_ls, fvu_transposed = fvu(xh @ w + b), fvu(xh @ w.T + b)
    result = gs.evaluate_sae(real_model, loaded, held_out, progress=False)
    print(
        f"\nlayer {layer} linear transcoder: FVU {result.fvu:.4f} (numpy x@W {fvu_ls:.4f}, x@W.T {fvu_transposed:.4f})"
    )
    assert result.l0 == 0
    assert result.fvu == pytest.approx(fvu_ls, rel=1e-3)
    assert fvu_ls < 1 and fvu_transposed > fvu_ls + 0.2
