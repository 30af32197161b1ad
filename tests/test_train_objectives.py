"""Unit tests of the SAE training objectives (gemma_scope_pz.train.objectives / step)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_scope_pz.train import loss, objectives, selected, sparse_jumprelu
from gemma_scope_pz.train import step as step_lib
from gemma_scope_pz.train.config import TrainConfig, apply_overrides


def _cfg(**sections):
    """The tests' base config with fields changed per section: ``_cfg(sae=dict(k=8))``."""
    base = dict(sae=dict(d_in=8, d_sae=16), run=dict(total_steps=100, batch_size=32))
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return TrainConfig.from_dict(base)


def test_jumprelu_ste_gradient_matches_formula():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 16)).astype(np.float32)
    theta = rng.uniform(0.05, 0.5, size=16).astype(np.float32)
    g = rng.normal(size=z.shape).astype(np.float32)
    eps = 0.1
    out, vjp = jax.vjp(lambda z, t: objectives.jumprelu(z, t, eps), z, theta)
    dz, dtheta = vjp(g)
    np.testing.assert_array_equal(np.asarray(out), np.where(z > theta, z, 0))
    kernel = (np.abs(z - theta) < eps / 2) / eps
    np.testing.assert_allclose(np.asarray(dz), np.where(z > theta, g, 0), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(dtheta), (-theta * kernel * g).sum(0), rtol=1e-5, atol=1e-5
    )
    assert np.abs(dtheta).sum() > 0  # the test data does hit the kernel window


def test_step_ste_gradient_matches_formula():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(64, 16)).astype(np.float32)
    theta = rng.uniform(0.05, 0.5, size=16).astype(np.float32)
    eps = 0.2
    grad_z, grad_t = jax.grad(lambda z, t: objectives.step(z, t, eps).sum(), argnums=(0, 1))(
        z, theta
    )
    np.testing.assert_array_equal(np.asarray(grad_z), 0)
    expected = -((np.abs(z - theta) < eps / 2) / eps).sum(0)
    np.testing.assert_allclose(np.asarray(grad_t), expected, rtol=1e-5)


def test_topk_and_batchtopk_counts():
    z = jax.random.normal(jax.random.PRNGKey(0), (32, 64)) + 3.0  # all positive
    f = objectives.topk_activation(z, 5)
    np.testing.assert_array_equal(np.sum(np.asarray(f) != 0, axis=1), 5)
    kept = np.sort(np.asarray(z), axis=1)[:, -5:]
    np.testing.assert_allclose(np.sort(np.asarray(f), axis=1)[:, -5:], kept)
    fb, thr = objectives.batchtopk_activation(z, 5)
    fb = np.asarray(fb)
    assert np.sum(fb != 0) == 5 * 32
    assert np.sum(fb != 0, axis=1).std() > 0  # per-row counts vary, total is fixed
    np.testing.assert_allclose(float(thr), np.sort(np.asarray(z).ravel())[-5 * 32])


def _auxk(*args):
    """The AuxK term of :func:`objectives.dead_latent_losses`."""
    return objectives.dead_latent_losses(*args)[0]


def test_auxk_nonzero_only_with_dead_latents():
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)
    residual = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    w_dec = jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    none_dead = jnp.zeros(32, bool)
    some_dead = none_dead.at[:6].set(True)
    assert float(_auxk(z, residual, w_dec, none_dead, 4, "float32")) == 0.0
    loss = float(_auxk(z, residual, w_dec, some_dead, 4, "float32"))
    assert loss > 0
    # gradient reaches only dead latents' decoder rows
    g = jax.grad(lambda w: _auxk(z, residual, w, some_dead, 4, "float32"))(w_dec)
    assert np.abs(np.asarray(g)[6:]).sum() == 0 and np.abs(np.asarray(g)[:6]).sum() > 0


def test_auxk_matches_numpy_and_revives_latents_negative_everywhere():
    """AuxK uses dead latents' raw pre-activations: one negative on every token still learns."""
    rng = np.random.default_rng(5)
    z = rng.normal(size=(12, 10)).astype(np.float32)
    z[:, 0] = -np.abs(z[:, 0]) - 1.0  # latent 0: dead and negative on every token
    residual = rng.normal(size=(12, 6)).astype(np.float32)
    w_dec = rng.normal(size=(10, 6)).astype(np.float32)
    dead = np.zeros(10, bool)
    dead[[0, 3, 7]] = True
    aux_k = 2
    masked = np.where(dead, z, -np.inf)
    idx = np.argsort(-masked, axis=1, kind="stable")[:, :aux_k]
    acts = np.zeros_like(z)
    np.put_along_axis(acts, idx, np.take_along_axis(z, idx, axis=1), axis=1)
    estimate = acts @ w_dec
    variance = np.sum((residual - residual.mean(0)) ** 2)
    expected = np.sum((residual - estimate) ** 2) / variance
    got = _auxk(
        jnp.asarray(z),
        jnp.asarray(residual),
        jnp.asarray(w_dec),
        jnp.asarray(dead),
        aux_k,
        "float32",
    )
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    assert (idx == 0).any(), "the case needs latent 0 among the selected"
    g = jax.grad(lambda zz: _auxk(zz, residual, w_dec, jnp.asarray(dead), aux_k, "float32"))(
        jnp.asarray(z)
    )
    assert np.abs(np.asarray(g)[:, 0]).sum() > 0  # a ReLU here would give exactly 0


def test_jumprelu_preactivation_loss_on_selected_dead_latents():
    """The pre-activation term: relu(threshold - z) * ||w_dec_j|| summed over each row's aux_k
    selected dead latents, averaged over rows; its gradient raises those pre-activations."""
    rng = np.random.default_rng(6)
    z = rng.normal(size=(9, 12)).astype(np.float32)
    residual = rng.normal(size=(9, 5)).astype(np.float32)
    w_dec = rng.normal(size=(12, 5)).astype(np.float32)
    threshold = rng.uniform(0.5, 2.0, 12).astype(np.float32)
    dead = np.zeros(12, bool)
    dead[[1, 4, 5, 9]] = True
    aux_k = 3
    idx = np.argsort(-np.where(dead, z, -np.inf), axis=1, kind="stable")[:, :aux_k]
    gap = np.maximum(threshold[idx] - np.take_along_axis(z, idx, axis=1), 0)
    expected = np.mean(np.sum(gap * np.linalg.norm(w_dec, axis=1)[idx], axis=1))
    args = (jnp.asarray(residual), jnp.asarray(w_dec), jnp.asarray(dead), aux_k, "float32")

    def preact(zz):
        return objectives.dead_latent_losses(zz, *args, threshold=jnp.asarray(threshold))[1]

    np.testing.assert_allclose(float(preact(jnp.asarray(z))), expected, rtol=1e-5)
    g = np.asarray(jax.grad(preact)(jnp.asarray(z)))
    assert (g[:, ~dead] == 0).all() and (g <= 0).all() and (g < 0).any()
    nothing_dead = objectives.dead_latent_losses(
        jnp.asarray(z), *args[:2], jnp.zeros(12, bool), aux_k, "float32",
        threshold=jnp.asarray(threshold),
    )  # fmt: skip
    assert [float(v) for v in nothing_dead] == [0.0, 0.0]


def test_l1_weighted_by_decoder_norm():
    rng = np.random.default_rng(3)
    f = rng.uniform(0, 1, size=(10, 6)).astype(np.float32)
    w_dec = rng.normal(size=(6, 4)).astype(np.float32)
    expected = np.mean(np.sum(f * np.linalg.norm(w_dec, axis=1), axis=1))
    np.testing.assert_allclose(float(objectives.weighted_l1(f, w_dec)), expected, rtol=1e-5)


def test_matryoshka_loss_is_sum_of_prefix_losses():
    cfg = _cfg(
        sae=dict(
            architecture="matryoshka", matryoshka_activation="relu", matryoshka_prefixes=(4, 10)
        )
    )
    assert cfg.sae.matryoshka_prefixes == (4, 10, 16)
    params = objectives.init_params(cfg, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 8))
    _, (metrics, _, _) = objectives.loss_fn(params, x, x, jnp.zeros(16, bool), 0.0, cfg)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xn = np.asarray(x, np.float64)
    f = np.maximum(xn @ p["w_enc"] + p["b_enc"], 0)
    expected = sum(
        np.mean(np.sum((f[:, :m] @ p["w_dec"][:m] + p["b_dec"] - xn) ** 2, axis=1))
        for m in (4, 10, 16)
    )
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-4)


def test_transcoder_skip_in_decode():
    cfg = _cfg(sae=dict(d_out=5, affine_skip=True))
    params = objectives.init_params(cfg, jax.random.PRNGKey(0))
    params["w_skip"] = jnp.ones((8, 5))
    x = jnp.ones((2, 8))
    f = jnp.zeros((2, 16))
    np.testing.assert_allclose(np.asarray(objectives.decode(params, f, x)), 8.0)


def test_learning_rate_schedule_values():
    cfg = _cfg(
        optim=dict(lr=1e-3, warmup_steps=10, lr_final_fraction=0.1), run=dict(total_steps=110)
    )
    for s in (0, 5, 9, 10, 35, 60, 109, 200):
        if s < 10:
            want = 1e-3 * (s + 1) / 10
        else:
            progress = min(1.0, (s - 10) / 100)
            want = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        assert float(step_lib.learning_rate(cfg, s)) == pytest.approx(want, rel=1e-5)
    const = apply_overrides(cfg, {"optim.lr_decay": "constant"})
    assert float(step_lib.learning_rate(const, 80)) == pytest.approx(1e-3)
    assert (
        float(step_lib.sparsity_scale(apply_overrides(cfg, {"loss.sparsity_warmup_steps": 4}), 1))
        == 0.5
    )


def test_bfloat16_loss_close_to_float32():
    cfg = _cfg(sae=dict(architecture="topk", k=4))
    params = objectives.init_params(cfg, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 8))
    dead = jnp.zeros(16, bool)
    l32 = objectives.loss_fn(params, x, x, dead, 1.0, cfg)[0]
    l16 = objectives.loss_fn(
        params, x, x, dead, 1.0, apply_overrides(cfg, {"run.dtype": "bfloat16"})
    )[0]
    assert l16.dtype == jnp.float32
    assert float(l16) == pytest.approx(float(l32), rel=3e-2)


def test_sparse_topk_matches_dense_loss_and_gradients():
    cfg = _cfg(sae=dict(architecture="topk", k=3, d_sae=32), loss=dict(aux_k=4))
    params = objectives.init_params(cfg, jax.random.PRNGKey(0))
    params["b_enc"] = jax.random.normal(jax.random.PRNGKey(2), (32,)) * 0.1
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 8))
    dead = jnp.zeros(32, bool).at[::3].set(True)

    def run(c):
        return jax.value_and_grad(objectives.loss_fn, has_aux=True)(params, x, x, dead, 1.0, c)

    (l_dense, (m_dense, fired_dense, _)), g_dense = run(cfg)
    (l_sparse, (m_sparse, fired_sparse, _)), g_sparse = run(
        apply_overrides(cfg, {"sae.sparse_topk": True})
    )
    assert float(m_dense["aux_loss"]) > 0
    np.testing.assert_allclose(float(l_sparse), float(l_dense), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(fired_sparse), np.asarray(fired_dense))
    for key in g_dense:
        np.testing.assert_allclose(
            np.asarray(g_sparse[key]), np.asarray(g_dense[key]), rtol=1e-4, atol=1e-5, err_msg=key
        )


def test_dense_and_sparse_topk_share_one_tie_rule():
    # Duplicated encoder columns make pre-activations tie exactly: both paths keep exactly k
    # latents per row, the lowest-index ones among equals (scope/sae.py's rule).
    cfg = _cfg(sae=dict(architecture="topk", k=2, d_sae=16), loss=dict(aux_k=0))
    params = objectives.init_params(cfg, jax.random.PRNGKey(0))
    w_enc = np.zeros((8, 16), np.float32)
    w_enc[:, :4] = 1.0  # latents 0..3 all equal x.sum(); the others 0
    params["w_enc"], params["b_enc"] = jnp.asarray(w_enc), jnp.zeros(16)
    x = jnp.abs(jax.random.normal(jax.random.PRNGKey(1), (6, 8))) + 0.1
    f = objectives.activate(params, objectives.pre_activations(params, x), cfg)[0]
    kept = np.asarray(f) != 0
    np.testing.assert_array_equal(kept.sum(axis=1), 2)
    assert kept[:, :2].all() and not kept[:, 2:].any()
    dead = jnp.zeros(16, bool)
    dense = objectives.loss_fn(params, x, x, dead, 1.0, cfg)[1]
    sparse = objectives.loss_fn(
        params, x, x, dead, 1.0, apply_overrides(cfg, {"sae.sparse_topk": True})
    )[1]
    assert float(dense[0]["l0"]) == float(sparse[0]["l0"]) == 2.0
    np.testing.assert_array_equal(np.asarray(dense[1]), np.asarray(sparse[1]))
    np.testing.assert_allclose(float(dense[0]["mse"]), float(sparse[0]["mse"]), rtol=1e-6)


def test_frequency_penalty_matches_formula_and_only_pushes_frequent_latents():
    rng = np.random.default_rng(3)
    f = np.maximum(rng.normal(size=(64, 8)), 0).astype(np.float32)
    f[:, 3] = np.abs(f[:, 3]) + 0.1  # fires on every row
    w_dec = rng.normal(size=(8, 5)).astype(np.float32)
    fraction = (f != 0).mean(axis=0)
    expected = np.sum(
        np.maximum(fraction - 0.5, 0) * np.abs(f).mean(axis=0) * np.linalg.norm(w_dec, axis=1)
    )
    value, grad = jax.value_and_grad(objectives.frequency_penalty)(
        jnp.asarray(f), jnp.asarray(w_dec), 0.5
    )
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)
    over = fraction > 0.5
    assert over[3] and not over.all()
    assert np.all(np.asarray(grad)[:, ~over] == 0)
    assert np.all(np.asarray(grad)[:, 3] > 0)
    assert float(objectives.frequency_penalty(jnp.asarray(f), jnp.asarray(w_dec), 1.0)) == 0.0


def test_frequency_penalty_enters_the_loss_and_refuses_the_sparse_path():
    cfg = _cfg(sae=dict(architecture="batchtopk", k=4), loss=dict(aux_k=0))
    with_penalty = apply_overrides(
        cfg, {"loss.frequency_coeff": 10.0, "loss.max_firing_fraction": 0.01}
    )
    params = objectives.init_params(cfg, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (32, cfg.sae.d_in))
    dead = jnp.zeros(cfg.sae.d_sae, bool)
    base, (m0, *_) = objectives.loss_fn(params, x, x, dead, jnp.ones(()), cfg)
    pen, (m1, *_) = objectives.loss_fn(params, x, x, dead, jnp.ones(()), with_penalty)
    assert float(pen) > float(base) and float(m1["sparsity_loss"]) > 0 == float(m0["sparsity_loss"])
    with pytest.raises(ValueError, match="loss.frequency_coeff needs the dense path"):
        _cfg(sae=dict(architecture="topk", k=4, sparse_topk=True), loss=dict(frequency_coeff=1.0))


@pytest.mark.parametrize("cap, expect_sparse", [(12, 1.0), (2, 0.0)])
def test_sparse_jumprelu_matches_dense_loss_and_gradients(cap, expect_sparse):
    # cap 12 holds every row's candidates (sparse branch); cap 2 does not (dense fallback).
    base = _cfg(
        sae=dict(architecture="jumprelu", d_sae=64, sparse_jumprelu="off"),
        loss=dict(
            jumprelu_bandwidth=0.5,
            target_l0=2.0,
            target_l0_coeff=0.3,
            frequency_coeff=2.0,
            max_firing_fraction=0.05,
        ),
    )
    sparse_cfg = apply_overrides(base, {"sae.sparse_jumprelu": "on", "sae.sparse_cap": cap})
    assert sparse_cfg.jumprelu_sparse_cap == cap and base.jumprelu_sparse_cap == 0
    params = objectives.init_params(base, jax.random.PRNGKey(0))
    rng = np.random.default_rng(4)
    params["threshold"] = jnp.asarray(rng.uniform(1.2, 2.4, 64), jnp.float32)
    params["b_enc"] = jnp.asarray(rng.normal(size=64) * 0.2, jnp.float32)
    params["w_dec"] = params["w_dec"] * jnp.asarray(rng.uniform(0.5, 1.5, (64, 1)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(48, 8)) * 0.8, jnp.float32)
    dead = jnp.zeros(64, bool).at[::5].set(True)  # AuxK and the pre-activation loss take part
    z = np.asarray(objectives.pre_activations(params, x))
    counts = (z > np.asarray(params["threshold"]) - 0.25).sum(axis=1)
    assert (counts.max() <= cap) == bool(expect_sparse) and counts.max() >= 3

    def run(c, params, x):
        return loss.value_and_grad(params, x, x, dead, 0.7, c)

    (l_dense, (m_dense, fired_dense, _)), g_dense = run(base, params, x)
    (l_sparse, (m_sparse, fired_sparse, _)), g_sparse = jax.jit(run, static_argnums=0)(
        sparse_cfg, params, x
    )
    assert float(m_sparse["sparse"]) == expect_sparse
    assert float(m_dense["l0"]) > 0.5 and float(m_dense["sparsity_loss"]) > 0
    np.testing.assert_allclose(float(l_sparse), float(l_dense), rtol=1e-5)
    assert float(m_dense["aux_loss"]) > 0
    for key in ("l0", "mse", "fvu", "sparsity_loss", "aux_loss"):
        np.testing.assert_allclose(float(m_sparse[key]), float(m_dense[key]), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(fired_sparse), np.asarray(fired_dense))
    assert np.abs(np.asarray(g_dense["threshold"])).sum() > 0
    for key in g_dense:
        np.testing.assert_allclose(
            np.asarray(g_sparse[key]), np.asarray(g_dense[key]), rtol=1e-4, atol=1e-5, err_msg=key
        )


def test_sparse_jumprelu_auto_choice_and_refusal():
    assert _cfg(sae=dict(architecture="jumprelu", d_sae=4096)).jumprelu_sparse_cap == 0  # no L0
    wide = _cfg(sae=dict(architecture="jumprelu", d_sae=8192), loss=dict(target_l0=10))
    assert wide.jumprelu_sparse_cap == 64  # max(64, 4 * target_l0), 128 * 64 <= 8192
    assert apply_overrides(wide, {"sae.d_sae": 8191}).jumprelu_sparse_cap == 0  # too narrow
    assert (
        apply_overrides(wide, {"sae.sparse_jumprelu": "on", "sae.d_sae": 256}).jumprelu_sparse_cap
        == 64
    )
    target = {"loss.target_l0": 40}  # cap 160: sparse from d_sae 20480 on
    assert apply_overrides(wide, {**target, "sae.d_sae": 20480}).jumprelu_sparse_cap == 160
    assert apply_overrides(wide, target).jumprelu_sparse_cap == 0
    assert apply_overrides(wide, {"sae.sparse_cap": 65}).jumprelu_sparse_cap == 0
    assert apply_overrides(wide, {"sae.sparse_cap": 60}).jumprelu_sparse_cap == 60
    assert apply_overrides(wide, {"sae.sparse_jumprelu": "off"}).jumprelu_sparse_cap == 0
    assert _cfg(sae=dict(architecture="jumprelu", d_sae=256)).jumprelu_sparse_cap == 0
    with pytest.raises(ValueError, match="sae.sparse_jumprelu='on' needs architecture"):
        _cfg(sae=dict(architecture="topk", d_sae=256, sparse_jumprelu="on"))


def test_selected_pre_activations_carry_the_dense_gradient():
    # values from z at idx; gradients to w_enc, b_enc and x_in as autodiff of the dense formula
    rng = np.random.default_rng(7)
    params = {
        "w_enc": jnp.asarray(rng.normal(size=(6, 20)), jnp.float32),
        "b_enc": jnp.asarray(rng.normal(size=20), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.choice(20, 4, replace=False) for _ in range(5)]))
    weights = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)

    def dense(params, x):
        z = x @ params["w_enc"] + params["b_enc"]
        return jnp.sum(weights * jnp.take_along_axis(z, idx, axis=-1))

    def sparse(params, x):
        z = objectives.pre_activations(params, x)
        return jnp.sum(weights * selected.pre_activations_at(params, x, idx, z))

    value, grads = jax.jit(jax.value_and_grad(sparse, argnums=(0, 1)))(params, x)
    want_value, want = jax.value_and_grad(dense, argnums=(0, 1))(params, x)
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("margin_of_fifth, fits", [(-0.3, True), (-0.2, False)])
def test_sparse_jumprelu_selection_fits_exactly_cap_candidates(margin_of_fifth, fits):
    # bandwidth 0.5: a candidate has margin > -0.25; four candidates and a cap of 4 fit
    z = jnp.asarray([[1.0, 0.5, 0.1, -0.1, margin_of_fifth, -2.0, -3.0, -4.0]])
    idx, ok = sparse_jumprelu.select(z, jnp.zeros(8), 4, 0.5)
    assert bool(ok) == fits
    assert sorted(np.asarray(idx)[0].tolist()) == [0, 1, 2, 3, 4]
    assert bool(sparse_jumprelu.select(z, jnp.zeros(8), 8, 0.5)[1])  # cap >= d_sae always fits
