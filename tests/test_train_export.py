"""Export of trained SAEs to the Gemma Scope 2 and SAELens folder formats."""

import json

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

from gemma_scope_pz.scope.formats.gemma_scope_2 import load_sae
from gemma_scope_pz.train.config import TrainConfig
from gemma_scope_pz.train.export import export_gemma_scope_2, export_saelens
from gemma_scope_pz.train.trainer import train


def _train(**sections):
    """Trains the tests' base config with fields changed per section: ``_train(sae=dict(k=8))``."""
    rng = np.random.default_rng(0)
    base = dict(
        sae=dict(
            d_in=8,
            d_sae=32,
            architecture="jumprelu",
            norm_estimation_batches=2,
            site_in="blocks.4.resid_post",
        ),
        optim=dict(warmup_steps=1),
        run=dict(
            batch_size=32, total_steps=4, progress_bar=False, log_every=2, model_name="gemma3-270m"
        ),
    )
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    cfg = TrainConfig.from_dict(base)
    x_in = (rng.normal(size=(256, 8)) * 5 + 1).astype(np.float32)
    if cfg.sae.is_transcoder:
        return train(cfg, (x_in, rng.normal(size=(256, cfg.sae.out_dim)).astype(np.float32)))
    return train(cfg, x_in)


def test_gemma_scope_2_sae_export(tmp_path):
    result = _train()
    folder = tmp_path / "gs2"
    export_gemma_scope_2(result, folder)
    export_gemma_scope_2(result, folder)  # overwriting an export is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gs2"]
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "params.safetensors")
    assert config["type"] == "sae" and config["width"] == 32
    assert config["architecture"] == "jump_relu" and config["l0"] == result.metrics[-1]["l0"]
    assert config["hf_hook_point_in"] == "model.layers.4.output"
    assert config["model_name"] == "google/gemma-3-270m"
    assert config["n_skipped_steps"] == 0 and config["train_config"] == result.config.to_dict()
    raw = result.raw_params()
    assert set(tensors) == {"w_enc", "b_enc", "w_dec", "b_dec", "threshold"}
    for key in tensors:
        np.testing.assert_array_equal(tensors[key], raw[key])
    loaded = load_sae(folder)
    assert loaded.meta.site_in == "blocks.4.resid_post"
    for key, value in loaded.to_arrays().items():
        np.testing.assert_array_equal(value, raw[key])


def test_gemma_scope_2_transcoder_and_saelens_export(tmp_path):
    result = _train(
        sae=dict(d_out=6, affine_skip=True, site_in="blocks.2.mlp_in", site_out="blocks.2.mlp_out")
    )
    export_gemma_scope_2(result, tmp_path / "tc")
    config = json.loads((tmp_path / "tc" / "config.json").read_text())
    tensors = load_file(tmp_path / "tc" / "params.safetensors")
    assert config["type"] == "transcoder" and config["affine_connection"] is True
    assert tensors["affine_skip_connection"].shape == (8, 6)
    np.testing.assert_array_equal(tensors["affine_skip_connection"], result.raw_params()["w_skip"])
    export_saelens(result, tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    weights = load_file(tmp_path / "sl" / "sae_weights.safetensors")
    assert set(weights) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"}
    assert cfg["d_in"] == 8 and cfg["d_sae"] == 32 and cfg["d_out"] == 6
    assert cfg["architecture"] == "jumprelu_skip_transcoder"
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_mlp_in"
    assert cfg["metadata"]["hook_name_out"] == "blocks.2.hook_mlp_out"
    assert cfg["metadata"]["l0"] == result.metrics[-1]["l0"]
    np.testing.assert_array_equal(weights["W_dec"], result.raw_params()["w_dec"])
    # SAELens computes x @ W_skip.T: the [d_in, d_out] skip is stored transposed
    np.testing.assert_array_equal(weights["W_skip"], result.raw_params()["w_skip"].T)


def test_batchtopk_exports_as_jumprelu_with_global_threshold(tmp_path):
    result = _train(sae=dict(architecture="batchtopk", k=4))
    assert result.inference_threshold > 0
    export_saelens(result, tmp_path / "sl")
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    weights = load_file(tmp_path / "sl" / "sae_weights.safetensors")
    assert cfg["architecture"] == "jumprelu"
    np.testing.assert_allclose(weights["threshold"], result.inference_threshold)


def test_topk_exports_convert_with_the_running_threshold(tmp_path):
    result = _train(sae=dict(architecture="topk", k=4, d_out=6, site_out="blocks.4.mlp_out"))
    assert result.inference_threshold > 0  # running mean of the k-th largest pre-activation
    export_gemma_scope_2(result, tmp_path / "gs2")
    config = json.loads((tmp_path / "gs2" / "config.json").read_text())
    tensors = load_file(tmp_path / "gs2" / "params.safetensors")
    assert config["architecture"] == "jump_relu" and config["converted_from"] == "topk (k=4)"
    np.testing.assert_array_equal(tensors["threshold"], np.float32(result.inference_threshold))
    export_saelens(result, tmp_path / "sl")  # SAELens has no TopK transcoder: converted too
    cfg = json.loads((tmp_path / "sl" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_transcoder"
    export_gemma_scope_2(result, tmp_path / "gs2", topk_threshold=0.5)  # an explicit choice
    np.testing.assert_array_equal(
        load_file(tmp_path / "gs2" / "params.safetensors")["threshold"], 0.5
    )
    sae_result = _train(sae=dict(architecture="topk", k=4))
    export_saelens(sae_result, tmp_path / "sl_sae")  # a TopK SAE stays exact TopK in SAELens
    cfg = json.loads((tmp_path / "sl_sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4


def test_to_autoencoder_matches_raw_forward():
    result = _train()
    sae = result.to_autoencoder()
    raw = result.raw_params()
    x = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32) * 5 + 1
    recon = np.asarray(sae(jnp.asarray(x)))
    z = x.astype(np.float64) @ raw["w_enc"] + raw["b_enc"]
    expected = np.where(z > raw["threshold"], z, 0) @ raw["w_dec"] + raw["b_dec"]
    np.testing.assert_allclose(recon, expected, rtol=1e-4, atol=1e-4)
    assert sae.meta.extra["l0"] == result.metrics[-1]["l0"]
    assert sae.meta.extra["n_skipped_steps"] == 0
