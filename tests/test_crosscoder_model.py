"""A Gemma Scope 2 crosscoder inside a tiny random Gemma 3: latents, layer-by-layer splice, steering.

The crosscoders are random, written by the tests in the released layout
(``crosscoder/layer_A_B_C_width_W_l0_*/params_layer_{i}.safetensors``) and read with
``load_crosscoder``. References are NumPy formulas on activations captured with the generic
``capture``/``attach`` machinery, independent of ``scope/multisite.py``.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz
from safetensors.numpy import load_file, save_file

import gemma_scope_pz as gs
from gemma_scope_pz.models.gemma3 import forward
from gemma_scope_pz.scope.evaluate import latents, top_features
from gemma_scope_pz.scope.formats import CheckpointError, load_crosscoder
from gemma_scope_pz.scope.interventions import capture
from gemma_scope_pz.scope.multisite import (
    crosscoder_latents,
    crosscoder_logits,
    evaluate_crosscoder,
    steer_crosscoder,
)
from gemma_scope_pz.scope.sites import attach

LAYERS = (0, 2, 3)
W = 24


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return make_tiny_model(seed=3, n_layers=5)


def write_crosscoder(root, d_model: int, *, causal: bool, seed: int = 0):
    """A random crosscoder folder and its weights as one latent space (the NumPy reference).

    ``causal``: the released layout (Gemma Scope 2, see ``scope/formats/crosscoder.py``): file ``i``
    holds the W / n latents that read layer ``i`` (``w_enc`` [d, m], ``b_enc``/``threshold`` [m]),
    their decoder to every layer (``w_dec`` [m, n, d], of which only layers >= i count) and layer
    ``i``'s ``b_dec``. Otherwise the shared-latent layout: every file holds ``w_enc`` [d, W],
    ``w_dec`` [W, d] and ``b_dec``; file 0 the shared ``b_enc``/``threshold``.
    """
    rng = np.random.default_rng(seed)
    n, m = len(LAYERS), W // len(LAYERS)
    folder = root / "crosscoder" / f"layer_{'_'.join(map(str, LAYERS))}_width_{W}_l0_small"
    folder.mkdir(parents=True)
    hooks = "model.layers.{" + ",".join(map(str, LAYERS)) + "}.output" if causal else "model.layers.{all}.output"  # fmt: skip
    config = {"type": "crosscoder", "architecture": "jump_relu", "width": W, "affine_connection": False,
              "hf_hook_point_in": hooks, "hf_hook_point_out": hooks}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    b_enc = (rng.normal(size=W) * 0.2).astype(np.float32)
    threshold = (np.abs(rng.normal(size=W)) * 0.3).astype(np.float32)
    owner = np.repeat(np.arange(n), m)  # the file (read layer) of each latent when causal
    files = []
    for pos in range(n):
        w_enc = rng.normal(size=(d_model, W)).astype(np.float32) * 0.3
        w_dec = rng.normal(size=(W, d_model)).astype(np.float32) * 0.3
        b_dec = (rng.normal(size=d_model) * 0.1).astype(np.float32)
        if causal:
            w_enc[:, owner != pos] = 0.0
            w_dec[owner > pos] = 0.0
        files.append({"w_enc": w_enc, "w_dec": w_dec, "b_dec": b_dec})
    for pos in range(n):
        if causal:
            own = owner == pos
            w_dec = np.stack([f["w_dec"][own] for f in files], axis=1)  # [m, n, d]
            w_dec[:, :pos] = rng.normal(size=w_dec[:, :pos].shape)  # earlier layers: ignored
            t = {"w_enc": files[pos]["w_enc"][:, own], "w_dec": w_dec, "b_dec": files[pos]["b_dec"],
                 "b_enc": b_enc[own], "threshold": threshold[own]}  # fmt: skip
        else:
            t = dict(files[pos])
            if pos == 0:
                t.update(b_enc=b_enc, threshold=threshold)
        t = {k: np.ascontiguousarray(v) for k, v in t.items()}  # save_file writes raw memory
        save_file(t, str(folder / f"params_layer_{pos}.safetensors"))
    return load_crosscoder(folder), files, b_enc, threshold


def jumprelu(z, threshold):
    return np.where(z > threshold, z, 0.0)


@pz.pytree_dataclass
class SetTo(pz.nn.Layer):
    """Test helper: replaces the activation by a fixed array after BOS.

    Attributes:
      value: [batch, seq, embedding] float32.
    """

    value: jnp.ndarray

    def __call__(self, x, **side_inputs):
        keep = side_inputs["token_positions"] > 0
        new = pz.nx.wrap(self.value.astype(x.dtype)).tag("batch", "seq", "embedding")
        return pz.nx.nmap(jnp.where)(keep, new, x)


TOKENS = np.array([[2, 7, 11, 5, 9, 13, 4, 8], [2, 30, 3, 17, 22, 6, 41, 12]], np.int32)


def test_read_positions_and_causality(tmp_path, model):
    d = model.config.d_model
    causal, *_ = write_crosscoder(tmp_path / "a", d, causal=True)
    dense, *_ = write_crosscoder(tmp_path / "b", d, causal=False)
    np.testing.assert_array_equal(causal.read_positions(), np.repeat(np.arange(3), W // 3))
    assert causal.meta.extra["latents_per_layer"] == [W // 3] * 3
    np.testing.assert_array_equal(dense.read_positions(), np.full(W, len(LAYERS) - 1))
    assert causal.is_weakly_causal() and not dense.is_weakly_causal()
    # The same answers from the weights alone (what the released layout's files also tell).
    extra = {k: v for k, v in causal.meta.extra.items() if k != "latents_per_layer"}
    plain = dataclasses.replace(causal, meta=dataclasses.replace(causal.meta, extra=extra))
    np.testing.assert_array_equal(plain.read_positions(), causal.read_positions())
    assert plain.is_weakly_causal()


def test_latents_from_one_capture_match_numpy(tmp_path, model):
    cc, files, b_enc, threshold = write_crosscoder(tmp_path, model.config.d_model, causal=False)
    acts = capture(model, TOKENS, cc.sites())
    xs = [np.asarray(acts[s], np.float64) for s in cc.sites()]
    expected = jumprelu(sum(x @ t["w_enc"] for x, t in zip(xs, files)) + b_enc, threshold)
    got = crosscoder_latents(model, cc, TOKENS)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # The generic entry points dispatch on the dictionary type.
    np.testing.assert_allclose(latents(model, cc, TOKENS), got, rtol=1e-6, atol=1e-6)
    top = top_features(model, cc, TOKENS[0], k=3)
    np.testing.assert_allclose(top["latents"][1:], np.asarray(got)[0, 1:], rtol=1e-4, atol=1e-4)
    assert not top["latents"][0].any()


@pytest.mark.parametrize("causal", [True, False])
def test_splice_with_error_leaves_logits_unchanged(tmp_path, model, causal):
    cc, *_ = write_crosscoder(tmp_path, model.config.d_model, causal=causal)
    clean = np.asarray(forward(model, TOKENS))
    spliced = np.asarray(crosscoder_logits(model, cc, TOKENS, include_error=True))
    np.testing.assert_allclose(spliced, clean, rtol=1e-4, atol=1e-4)
    ablated = np.asarray(crosscoder_logits(model, cc, TOKENS, include_error=True, clamp={0: 0.0, 5: 3.0}))  # fmt: skip
    assert np.abs(ablated - clean).max() > 1e-3


def reference_splice(model, files, b_enc, threshold, read, sites, clamp=None):
    """Layer-by-layer patching with fixed-value layers: numpy latents, generic attach/capture."""
    acts = capture(model, TOKENS, sites)
    xs_clean = [np.asarray(acts[s], np.float64) for s in sites]
    f_clean = jumprelu(sum(x @ t["w_enc"] for x, t in zip(xs_clean, files)) + b_enc, threshold)
    patched, z, not_bos = model, b_enc.astype(np.float64), (np.arange(TOKENS.shape[1]) > 0)[:, None]
    for k, (site, t) in enumerate(zip(sites, files)):
        x = np.asarray(capture(patched, TOKENS, site)[site], np.float64)
        z = z + x @ t["w_enc"]
        f = np.where(read <= k, jumprelu(z, threshold), f_clean)
        for i, v in (clamp or {}).items():
            f[..., i] = v
        y = np.where(not_bos, f @ t["w_dec"] + t["b_dec"], x)
        patched = attach(patched, site, SetTo(jnp.asarray(y, jnp.float32)))
    return np.asarray(forward(patched, TOKENS, bucket=False))


@pytest.mark.parametrize("causal,clamp", [(True, None), (False, {1: 0.0, 4: 2.5})])
def test_splice_without_error_matches_layer_by_layer_reference(tmp_path, model, causal, clamp):
    cc, files, b_enc, threshold = write_crosscoder(tmp_path, model.config.d_model, causal=causal)
    expected = reference_splice(model, files, b_enc, threshold, cc.read_positions(), cc.sites(), clamp)  # fmt: skip
    got = np.asarray(crosscoder_logits(model, cc, TOKENS, clamp=clamp))
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=2e-3)
    assert np.abs(got - np.asarray(forward(model, TOKENS, bucket=False))).max() > 1e-2


def nll(logits, tokens):
    """Next-token NLL [batch, seq - 1] in float64."""
    z = logits[:, :-1].astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


def test_evaluate_crosscoder(tmp_path, model):
    cc, files, b_enc, threshold = write_crosscoder(tmp_path, model.config.d_model, causal=False)
    result = evaluate_crosscoder(model, cc, TOKENS, pad_id=0, progress=False)
    # CE over the predictions made at positions 1..seq-2 (BOS excluded, no padding in TOKENS).
    clean = np.asarray(forward(model, TOKENS, bucket=False))
    spliced = np.asarray(crosscoder_logits(model, cc, TOKENS))
    ce_clean, ce_spliced = nll(clean, TOKENS)[:, 1:].mean(), nll(spliced, TOKENS)[:, 1:].mean()
    assert result["ce_clean"] == pytest.approx(ce_clean, rel=1e-4)
    assert result["ce_spliced"] == pytest.approx(ce_spliced, rel=1e-4)
    assert result["delta_loss"] == pytest.approx(ce_spliced - ce_clean, rel=1e-3)
    assert abs(result["delta_loss"]) > 1e-2 and result["kl"] > 1e-3
    # FVU and L0 on the clean activations, BOS excluded (no padding in TOKENS).
    acts = capture(model, TOKENS, cc.sites())
    xs = [np.asarray(acts[s], np.float64)[:, 1:] for s in cc.sites()]
    f = jumprelu(sum(x @ t["w_enc"] for x, t in zip(xs, files)) + b_enc, threshold)
    errs, vars_ = [], []
    for x, t in zip(xs, files):
        errs.append(np.sum((x - (f @ t["w_dec"] + t["b_dec"])) ** 2))
        vars_.append(np.sum((x - x.reshape(-1, x.shape[-1]).mean(0)) ** 2))
    np.testing.assert_allclose(result["fvu_per_layer"], np.array(errs) / vars_, rtol=1e-3)
    assert result["fvu"] == pytest.approx(sum(errs) / sum(vars_), rel=1e-3)
    assert result["l0"] == pytest.approx(np.count_nonzero(f, axis=-1).mean(), rel=1e-5)
    assert result["n_tokens"] == TOKENS[:, 1:].size
    generic = gs.evaluate_sae(model, cc, TOKENS, pad_id=0, progress=False)
    assert generic.delta_loss == pytest.approx(result["delta_loss"], rel=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_steering_adds_the_decoder_row_at_each_layer(tmp_path, model, causal):
    cc, files, *_ = write_crosscoder(tmp_path, model.config.d_model, causal=causal)
    latent, c = 10, 1.7  # read position 1 when causal: no write at layer 0
    steered = steer_crosscoder(model, cc, latent, c)
    pairs = [(f"blocks.{n}.resid_post", f"blocks.{n + 1}.resid_pre") for n in cc.layers]
    acts = capture(steered, TOKENS, [s for pair in pairs for s in pair])  # one forward
    for (before, after), t in zip(pairs, files):
        delta = np.asarray(acts[after], np.float64) - np.asarray(acts[before], np.float64)
        np.testing.assert_allclose(delta[:, 1:], np.broadcast_to(c * t["w_dec"][latent], delta[:, 1:].shape), atol=1e-4)  # fmt: skip
        np.testing.assert_array_equal(delta[:, 0], 0.0)


def test_refusals(tmp_path, model, make_tiny_model):
    cc, *_ = write_crosscoder(tmp_path, model.config.d_model, causal=True)
    with pytest.raises(ValueError, match=r"clamp: latent indices \[24\] are outside 0..23"):
        crosscoder_logits(model, cc, TOKENS, clamp={24: 1.0})
    with pytest.raises(TypeError, match=r"a Crosscoder spans several layers: use .*crosscoder_logits"):  # fmt: skip
        gs.splice(model, cc)
    with pytest.raises(ValueError, match=r"latent 99 is outside 0..23"):
        steer_crosscoder(model, cc, 99, 1.0)
    short = make_tiny_model(seed=3, n_layers=3)
    with pytest.raises(ValueError, match=r"Site blocks.3.resid_post: the model has blocks 0..2"):
        crosscoder_latents(short, cc, TOKENS)
    wide = make_tiny_model(seed=3, n_layers=5, d_model=48)
    with pytest.raises(ValueError, match=r"crosscoder d_model=32 does not match the model's d_model=48"):  # fmt: skip
        crosscoder_logits(wide, cc, TOKENS)
    other = dataclasses.replace(cc, meta=dataclasses.replace(cc.meta, extra={**cc.meta.extra, "site_kind": "mlp_out"}))  # fmt: skip
    with pytest.raises(ValueError, match=r"only resid_post is supported"):
        crosscoder_latents(model, other, TOKENS)


def test_released_layout_per_file_formula(tmp_path):
    """File i's latents read layer i only and write layers >= i; earlier decoder entries unused."""
    cc, *_ = write_crosscoder(tmp_path, 16, causal=True, seed=4)
    folder = next((tmp_path / "crosscoder").iterdir())
    raw = [load_file(str(folder / f"params_layer_{i}.safetensors")) for i in range(3)]
    xs = [np.random.default_rng(20 + i).normal(size=(2, 5, 16)) for i in range(3)]
    fs = [jumprelu(x @ r["w_enc"] + r["b_enc"], r["threshold"]) for x, r in zip(xs, raw)]
    np.testing.assert_allclose(cc.encode(xs), np.concatenate(fs, -1), rtol=1e-5, atol=1e-5)
    for k, y in enumerate(cc(xs)):
        expected = sum(fs[i] @ raw[i]["w_dec"][:, k] for i in range(k + 1)) + raw[k]["b_dec"]
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_released_layout_refusals(tmp_path):
    cc, *_ = write_crosscoder(tmp_path, 16, causal=True)
    folder = next((tmp_path / "crosscoder").iterdir())
    config = json.loads((folder / "config.json").read_text())
    bad = {
        "hf_hook_point_in": "model.layers.{0,2,4}.output",
        "affine_connection": True,
        "width": 30,
    }
    messages = [
        r"lists layers \[0, 2, 4\], the folder name \[0, 2, 3\]",
        r"affine_connection=True: crosscoders with a skip connection are not supported",
        r"the files hold 24 latents but config width is 30",
    ]
    for (key, value), message in zip(bad.items(), messages):
        (folder / "config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(CheckpointError, match=message):
            load_crosscoder(folder)
    (folder / "config.json").write_text(json.dumps(config))
    t = load_file(str(folder / "params_layer_1.safetensors"))
    save_file({**t, "w_dec": np.ascontiguousarray(t["w_dec"][:, :2])}, str(folder / "params_layer_1.safetensors"))  # fmt: skip
    with pytest.raises(CheckpointError, match=r"params_layer_1.safetensors: tensor 'w_dec' has shape \(8, 2, 16\), expected \(8, 3, 16\)"):  # fmt: skip
        load_crosscoder(folder)
