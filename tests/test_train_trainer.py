"""Training loop: constraints, NaN policy, exact resume, normaliser folding, transcoders."""

import json

import numpy as np
import pytest

from gemma_scope_pz.train.config import TrainConfig, apply_overrides
from gemma_scope_pz.train.normalize import fold_normaliser
from gemma_scope_pz.train.sources import ArraySource
from gemma_scope_pz.train.trainer import initial_state, train


def _data(n=2048, d=16, n_feat=48, seed=0, offset=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n_feat, d))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    act = (rng.random((n, n_feat)) < 0.08) * rng.uniform(0.5, 1.5, (n, n_feat))
    return ((act @ feats) * scale + offset).astype(np.float32)


def _cfg(**sections):
    """The tests' base config with fields changed per section: ``_cfg(sae=dict(k=8))``."""
    base = dict(
        sae=dict(d_in=16, d_sae=64, architecture="topk", k=4, norm_estimation_batches=2),
        loss=dict(sparsity_warmup_steps=2),
        optim=dict(warmup_steps=2, lr=1e-2),
        run=dict(batch_size=64, total_steps=8, log_every=2, progress_bar=False),
    )
    for name, values in sections.items():
        base[name] = {**base[name], **values}
    return TrainConfig.from_dict(base)


def _np_forward(p, x, activation, k=None):
    z = x @ p["w_enc"] + p["b_enc"]
    if activation == "jumprelu":
        f = np.where(z > p["threshold"], z, 0)
    elif activation == "topk":
        kth = np.sort(z, axis=1)[:, -k][:, None]
        f = np.where(z >= kth, np.maximum(z, 0), 0)
    else:
        f = np.maximum(z, 0)
    y = f @ p["w_dec"] + p["b_dec"]
    if "w_skip" in p:
        y = y + x @ p["w_skip"]
    return y


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_decoder_rows_stay_unit_norm(arch):
    result = train(_cfg(sae=dict(architecture=arch), loss=dict(l1_coeff=0.1)), _data())
    norms = np.linalg.norm(result.params["w_dec"], axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    assert result.metrics[-1]["step"] == 7 and len(result.metrics) == 4


def test_nan_policy_skip_and_error():
    x = _data()

    def batch_at(step):
        batch = x[step * 64 : (step + 1) * 64].copy()
        if step == 3:
            batch[5, 2] = np.nan
        return batch

    result = train(_cfg(), batch_at)
    assert result.n_skipped == 1
    assert all(np.all(np.isfinite(v)) for v in result.params.values())
    with pytest.raises(FloatingPointError, match="step 3"):
        train(_cfg(run=dict(nan_policy="error")), batch_at)


def test_resume_after_kill_is_bit_identical(tmp_path):
    x = _data()
    cfg = _cfg(
        run=dict(total_steps=8, checkpoint_every=2, keep_checkpoints=2),
        sae=dict(d_sae=256),
        loss=dict(dead_window_tokens=64, aux_k=8),
    )

    class Killed(Exception):
        pass

    def killed_at_5(step):
        if step == 5:
            raise Killed
        return x[np.random.default_rng([0, step]).permutation(len(x))[:64]]

    def batches(step):
        return x[np.random.default_rng([0, step]).permutation(len(x))[:64]]

    full = train(
        apply_overrides(
            cfg,
            {"run.checkpoint_dir": str(tmp_path / "a"), "run.log_path": str(tmp_path / "a.jsonl")},
        ),
        batches,
    )
    run_b = apply_overrides(
        cfg, {"run.checkpoint_dir": str(tmp_path / "b"), "run.log_path": str(tmp_path / "b.jsonl")}
    )
    with pytest.raises(Killed):
        train(run_b, killed_at_5)
    resumed = train(run_b, batches)
    assert full.metrics[-1]["dead_fraction"] > 0  # AuxK and dead counters were in play
    for key in full.params:
        assert np.array_equal(full.params[key], resumed.params[key]), key
    assert resumed.metrics == full.metrics
    lines = [json.loads(s) for s in open(tmp_path / "b.jsonl")]
    assert [r["step"] for r in lines] == [1, 3, 5, 7]
    # only the most recent checkpoints are kept
    kept = sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.isdigit())
    assert kept == ["6", "8"]
    fresh = train(run_b, batches, resume=False)
    assert np.array_equal(fresh.params["w_enc"], full.params["w_enc"])
    with pytest.raises(ValueError, match="site_in"):
        train(apply_overrides(run_b, {"sae.site_in": "blocks.2.resid_post"}), batches)


def test_iterator_data_matches_callable():
    x = _data()

    def batch_at(step):
        return x[(step * 64) % 2048 : (step * 64) % 2048 + 64]

    a = train(_cfg(), batch_at)
    b = train(_cfg(), (batch_at(s) for s in range(100)))
    for key in a.params:
        assert np.array_equal(a.params[key], b.params[key]), key


@pytest.mark.parametrize("normalization", ["unit_mean_sq_norm", "center_unit"])
def test_exported_params_take_raw_activations(normalization):
    x = _data(offset=3.0, scale=7.0)
    result = train(
        _cfg(
            sae=dict(architecture="jumprelu", normalization=normalization), loss=dict(l0_coeff=0.1)
        ),
        x,
    )
    norm = result.normaliser
    assert norm.in_scale != pytest.approx(1.0)
    raw = result.raw_params()
    expected = norm.invert_out(_np_forward(result.params, norm.apply_in(x), "jumprelu"))
    np.testing.assert_allclose(_np_forward(raw, x, "jumprelu"), expected, rtol=1e-3, atol=1e-3)


def test_fold_transcoder_with_skip_algebra():
    from gemma_scope_pz.train.normalize import Normaliser

    rng = np.random.default_rng(5)
    p = {
        "w_enc": rng.normal(size=(6, 10)),
        "b_enc": rng.normal(size=10),
        "w_dec": rng.normal(size=(10, 4)),
        "b_dec": rng.normal(size=4),
        "w_skip": rng.normal(size=(6, 4)),
    }
    norm = Normaliser(rng.normal(size=6), 0.3, rng.normal(size=4), 2.5, "center_unit")
    x = rng.normal(size=(20, 6)) * 4
    expected = norm.invert_out(_np_forward(p, norm.apply_in(x), "relu"))
    got = _np_forward(fold_normaliser(p, norm), x, "relu")
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("b_enc_init", ["centre", "zeros"])
@pytest.mark.parametrize("transcoder", [False, True])
def test_initial_b_enc_centres_the_encoder_inputs(b_enc_init, transcoder):
    # Inputs with a large common offset, as residual streams have; a transcoder's targets have
    # another, so its encoder must be centred on its own inputs, not on b_dec.
    x_in, x_out = _data(offset=3.0), _data(seed=1, offset=-5.0)
    extra = dict(d_out=16) if transcoder else {}
    cfg = _cfg(sae=dict(architecture="jumprelu", b_dec_init="mean", b_enc_init=b_enc_init, **extra))
    source = ArraySource(x_in, x_out if transcoder else None, batch_size=64)
    state, norm = initial_state(cfg, source)
    p = {k: np.asarray(v) for k, v in state["params"].items()}
    first = [source.batch_at(i) for i in range(cfg.sae.norm_estimation_batches)]
    x = norm.apply_in(np.concatenate([b[0] if transcoder else b for b in first]))
    y = norm.apply_out(np.concatenate([b[1] for b in first])) if transcoder else x
    centred = x - x.mean(0) if b_enc_init == "centre" else x
    np.testing.assert_allclose(x @ p["w_enc"] + p["b_enc"], centred @ p["w_enc"], atol=2e-4)
    np.testing.assert_allclose(p["b_dec"], y.mean(0), atol=2e-5)
    assert np.abs(x.mean(0)).max() > 1.0  # the offset survives normalisation: the test can fail


def test_transcoder_with_skip_learns_linear_map():
    rng = np.random.default_rng(3)
    x_in = rng.normal(size=(4096, 8)).astype(np.float32)
    a = rng.normal(size=(8, 6)).astype(np.float32)
    x_out = (x_in @ a + 0.5).astype(np.float32)
    cfg = _cfg(
        sae=dict(architecture="jumprelu", d_in=8, d_out=6, affine_skip=True),
        run=dict(total_steps=300, batch_size=256, log_every=100),
        optim=dict(lr=1e-2, warmup_steps=10),
        loss=dict(l0_coeff=1.0),
    )
    result = train(cfg, (x_in, x_out))
    raw = result.raw_params()
    pred = _np_forward(raw, x_in, "jumprelu")
    fvu = np.sum((pred - x_out) ** 2) / np.sum((x_out - x_out.mean(0)) ** 2)
    assert fvu < 0.01
    np.testing.assert_allclose(raw["w_skip"], a, atol=0.1 * np.abs(a).max())


def test_bfloat16_training_reduces_loss(tmp_path):
    result = train(_cfg(run=dict(dtype="bfloat16", total_steps=20, log_every=5)), _data())
    assert result.metrics[-1]["mse"] < result.metrics[0]["mse"]
    assert result.params["w_enc"].dtype == np.float32
