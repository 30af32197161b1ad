"""AutoEncoder / AutoEncoderSkip / activations against numpy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import treescope
from penzai import pz

from gemma_scope_pz.scope import layers
from gemma_scope_pz.scope.layers import (
    AutoEncoder,
    AutoEncoderSkip,
    SaeMeta,
    decode_arrays,
    encode_arrays,
    reconstruct_arrays,
)

D_IN, D_SAE, D_OUT = 6, 16, 4


def random_params(seed=0, d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, skip=False):
    rng = np.random.default_rng(seed)
    params = {
        "w_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "b_enc": rng.normal(size=d_sae).astype(np.float32) * 0.3,
        "w_dec": rng.normal(size=(d_sae, d_out)).astype(np.float32),
        "b_dec": rng.normal(size=d_out).astype(np.float32),
        "threshold": np.abs(rng.normal(size=d_sae)).astype(np.float32),
    }
    if skip:
        params["w_skip"] = rng.normal(size=(d_in, d_out)).astype(np.float32)
    return params


def numpy_encode(p, x, activation, k=None):
    pre = x.astype(np.float64) @ p["w_enc"] + p["b_enc"]
    if activation == "jumprelu":
        return np.where(pre > p["threshold"], pre, 0.0)
    if activation == "relu":
        return np.maximum(pre, 0.0)
    # topk: keep the k largest per row, relu'd
    out = np.zeros_like(pre)
    flat, flat_out = pre.reshape(-1, pre.shape[-1]), out.reshape(-1, pre.shape[-1])
    for row in range(flat.shape[0]):
        idx = np.argsort(-flat[row])[:k]
        flat_out[row, idx] = np.maximum(flat[row, idx], 0.0)
    return out


def numpy_forward(p, x, activation, k=None):
    y = numpy_encode(p, x, activation, k) @ p["w_dec"] + p["b_dec"]
    if "w_skip" in p:
        y = y + x.astype(np.float64) @ p["w_skip"]
    return y


def named_input(x):
    return pz.nx.wrap(jnp.asarray(x), "batch", "seq", "embedding")


@pytest.mark.parametrize("activation,k", [("jumprelu", None), ("relu", None), ("topk", 3)])
@pytest.mark.parametrize("skip", [False, True])
def test_matches_numpy(activation, k, skip):
    p = random_params(1, skip=skip)
    x = np.random.default_rng(2).normal(size=(2, 5, D_IN)).astype(np.float32)
    sae = AutoEncoder.from_arrays(**p, activation=activation, k=k)
    assert isinstance(sae, AutoEncoderSkip) == skip
    f = sae.encode(named_input(x))
    assert dict(f.named_shape) == {"batch": 2, "seq": 5, "latents": D_SAE}
    want_f = numpy_encode(p, x, activation, k)
    np.testing.assert_allclose(f.unwrap("batch", "seq", "latents"), want_f, rtol=1e-5, atol=1e-5)
    y = sae(named_input(x))
    assert dict(y.named_shape) == {"batch": 2, "seq": 5, "embedding": D_OUT}
    want_y = numpy_forward(p, x, activation, k)
    np.testing.assert_allclose(y.unwrap("batch", "seq", "embedding"), want_y, rtol=1e-5, atol=1e-4)
    decoded = sae.decode(f).unwrap("batch", "seq", "embedding")
    np.testing.assert_allclose(decoded, want_f @ p["w_dec"] + p["b_dec"], rtol=1e-5, atol=1e-4)
    # plain arrays in, plain arrays out
    np.testing.assert_allclose(sae(x), want_y, rtol=1e-5, atol=1e-4)
    # the plain-array twins agree with the layer
    jp = {key: jnp.asarray(v) for key, v in p.items()}
    np.testing.assert_allclose(encode_arrays(jp, x, activation, k), want_f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        decode_arrays(jp, want_f.astype(np.float32)), decoded, rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(
        reconstruct_arrays(jp, x, activation, k), want_y, rtol=1e-5, atol=1e-4
    )


def test_topk_keeps_exactly_k_per_token():
    p = random_params(3)
    p["b_enc"] += 10.0  # every pre-activation positive: exactly k survive
    x = np.random.default_rng(4).normal(size=(3, 7, D_IN)).astype(np.float32)
    f = AutoEncoder.from_arrays(**p, activation="topk", k=5).encode(x)
    np.testing.assert_array_equal(np.count_nonzero(np.asarray(f), axis=-1), 5)


def test_jumprelu_threshold_is_strict():
    d = 4
    threshold = np.array([0.5, 1.0, 1.5, 2.0], np.float32)
    sae = AutoEncoder.from_arrays(
        np.eye(d, dtype=np.float32), np.zeros(d), np.eye(d), np.zeros(d), threshold
    )
    at = np.asarray(sae.encode(threshold[None]))
    np.testing.assert_array_equal(at, 0.0)  # z == threshold is not kept
    above = threshold + 1e-3
    np.testing.assert_allclose(np.asarray(sae.encode(above[None]))[0], above, rtol=1e-6)


def test_skip_direction_is_x_at_w():
    p = random_params(5, skip=True)  # d_in != d_out, so x @ W.T would not even type-check
    sae = AutoEncoder.from_arrays(**p)
    x = np.random.default_rng(6).normal(size=(3, D_IN)).astype(np.float32)
    assert not layers.SKIP_TRANSPOSED
    np.testing.assert_allclose(sae.skip_connection(x), x @ p["w_skip"], rtol=1e-5, atol=1e-5)


def test_to_arrays_round_trip_and_error():
    p = random_params(7, d_out=D_IN, skip=True)
    sae = AutoEncoder.from_arrays(**p)
    back = sae.to_arrays()
    assert set(back) == set(p)
    for key in p:
        np.testing.assert_array_equal(back[key], p[key])
    x = np.random.default_rng(8).normal(size=(2, D_IN)).astype(np.float32)
    np.testing.assert_allclose(sae.error(x), x - np.asarray(sae(x)), rtol=1e-6, atol=1e-6)


def test_dtype_option():
    p = random_params(9)
    sae = AutoEncoder.from_arrays(**p, dtype=jnp.bfloat16)
    assert sae.to_arrays()["w_enc"].dtype == jnp.bfloat16
    x = np.random.default_rng(10).normal(size=(2, D_IN)).astype(np.float32)
    y = np.asarray(sae(x.astype(jnp.bfloat16)), np.float32)
    want = numpy_forward(p, x, "jumprelu")
    # bf16 has ~3 significant digits; compare loosely and only where no latent sits at its threshold
    assert np.mean(np.abs(y - want)) < 0.1 * np.mean(np.abs(want)) + 0.1


def test_meta_is_static_and_checked():
    p = random_params(11)
    sae = AutoEncoder.from_arrays(
        **p, meta=SaeMeta(1, 1, 1, site_in="blocks.3.resid_post", extra={"l0": 7})
    )
    assert (sae.meta.d_in, sae.meta.d_sae, sae.meta.d_out) == (D_IN, D_SAE, D_OUT)
    assert sae.meta.site_in == "blocks.3.resid_post" and sae.meta.extra["l0"] == 7
    leaves = jax.tree_util.tree_leaves(pz.freeze_params(sae))
    assert len(leaves) == 5  # w_enc, b_enc, threshold, w_dec, b_dec; meta is static
    hash(sae.meta)
    with pytest.raises(ValueError, match="topk needs"):
        SaeMeta(4, 8, 4, activation="topk", k=None)


def test_bad_arrays_name_the_key():
    p = random_params(12)
    bad = dict(p, b_enc=np.zeros(D_SAE + 1))
    with pytest.raises(ValueError, match=r"b_enc has shape \(17,\), expected \(16,\)"):
        AutoEncoder.from_arrays(**bad)
    with pytest.raises(ValueError, match="threshold"):
        AutoEncoder.from_arrays(**dict(p, threshold=None))
    with pytest.raises(ValueError, match="w_skip"):
        AutoEncoder.from_arrays(**p, w_skip=np.zeros((D_OUT, D_IN)))


def test_jit_and_treescope():
    p = random_params(13, skip=True)
    sae = AutoEncoder.from_arrays(**p, name="tc")
    text = treescope.render_to_text(sae)
    assert "AutoEncoderSkip" in text and "tc/w_enc" in text and "tc/w_skip" in text
    x = named_input(np.random.default_rng(14).normal(size=(1, 3, D_IN)).astype(np.float32))
    frozen = pz.freeze_params(sae)
    y = jax.jit(lambda model, v: model(v))(frozen, x)
    np.testing.assert_allclose(
        y.unwrap("batch", "seq", "embedding"),
        sae(x).unwrap("batch", "seq", "embedding"),
        rtol=1e-5,
        atol=1e-5,
    )


def test_skip_connection_is_zero_without_skip_and_named_axes_kept():
    p = random_params(15)  # d_out = 4 != d_in = 6
    sae = AutoEncoder.from_arrays(**p)
    x = np.random.default_rng(16).normal(size=(2, 3, D_IN)).astype(np.float32)
    np.testing.assert_array_equal(sae.skip_connection(x), np.zeros((2, 3, D_OUT)))
    named = sae.skip_connection(named_input(x))
    assert dict(named.named_shape) == {"batch": 2, "seq": 3, "embedding": D_OUT}
    # decode(encode(x)) + skip_connection(x) is the layer's output for both classes
    for s in (sae, AutoEncoder.from_arrays(**random_params(15, skip=True))):
        np.testing.assert_allclose(s.decode(s.encode(x)) + s.skip_connection(x), s(x), rtol=1e-6)


def test_activation_layer_found_by_type_after_insertion():
    p = random_params(17)
    sae = AutoEncoder.from_arrays(**p, activation="topk", k=4)
    assert isinstance(sae.activation_layer, layers.TopK) and sae.activation_layer.k == 4
    # a layer inserted in front of the activation does not change what the accessors find
    edited = pz.select(sae).at_instances_of(layers.TopK).insert_before(pz.nn.Identity())
    assert isinstance(edited.activation_layer, layers.TopK)
    back = edited.to_arrays()
    for key in ("w_enc", "b_enc", "w_dec", "b_dec"):
        np.testing.assert_array_equal(back[key], p[key])
    x = np.random.default_rng(18).normal(size=(3, D_IN)).astype(np.float32)
    np.testing.assert_allclose(edited(x), sae(x), rtol=1e-6)


def test_layer_activations_equal_the_sae_math():
    from gemma_scope_pz.scope import sae as sae_math

    z = np.random.default_rng(19).normal(size=(2, 3, D_SAE)).astype(np.float32)
    z[0, 0, :4] = 5.0  # ties: the lowest indices win in both
    named = pz.nx.wrap(jnp.asarray(z), "batch", "seq", "latents")
    topk = layers.TopK(k=3)(named).unwrap("batch", "seq", "latents")
    np.testing.assert_array_equal(topk, sae_math.topk(z, 3))
    np.testing.assert_array_equal(topk[0, 0, :4], [5.0, 5.0, 5.0, 0.0])
    threshold = np.abs(z[0, 0]) * 0.5
    jump = layers.JumpReLU(
        pz.Parameter(value=pz.nx.wrap(jnp.asarray(threshold), "latents"), label="t")
    )
    np.testing.assert_array_equal(
        jump(named).unwrap("batch", "seq", "latents"), sae_math.jumprelu(z, threshold)
    )
