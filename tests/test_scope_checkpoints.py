"""Gemma Scope loaders and writer on folders written here (no network)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from gemma_scope_pz.scope.formats import (
    CheckpointError,
    hook_from_site,
    load_clt,
    load_gemma_scope_1,
    load_sae,
    save_gemma_scope_2,
    site_from_hook,
)
from gemma_scope_pz.scope.formats import files as checkpoint_files
from gemma_scope_pz.scope.layers import AutoEncoder, AutoEncoderSkip, SaeMeta

D, W = 8, 24


def gs2_tensors(seed=0, d_in=D, d_sae=W, d_out=D, affine=False):
    rng = np.random.default_rng(seed)
    tensors = {
        "w_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32) * 0.5,
        "b_enc": rng.normal(size=d_sae).astype(np.float32) * 0.1,
        "w_dec": rng.normal(size=(d_sae, d_out)).astype(np.float32) * 0.5,
        "b_dec": rng.normal(size=d_out).astype(np.float32),
        "threshold": np.abs(rng.normal(size=d_sae)).astype(np.float32) * 0.5,
    }
    if affine:
        tensors["affine_skip_connection"] = rng.normal(size=(d_in, d_out)).astype(np.float32)
    return tensors


def write_gs2(folder: Path, tensors=None, **config_changes):
    tensors = gs2_tensors() if tensors is None else tensors
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "hf_hook_point_in": "model.layers.9.output",
        "hf_hook_point_out": "model.layers.9.output",
        "width": tensors["w_enc"].shape[1],
        "model_name": "google/gemma-3-270m-pt",
        "architecture": "jump_relu",
        "l0": 20,
        "affine_connection": "affine_skip_connection" in tensors,
        "type": "sae",
    }
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "params.safetensors"))
    return tensors


def numpy_forward(t, x):
    pre = x.astype(np.float64) @ t["w_enc"] + t["b_enc"]
    f = np.where(pre > t["threshold"], pre, 0.0)
    y = f @ t["w_dec"] + t["b_dec"]
    if "affine_skip_connection" in t:
        y = y + x.astype(np.float64) @ t["affine_skip_connection"]
    return f, y


def x_batch(d=D, seed=1):
    return np.random.default_rng(seed).normal(size=(3, 5, d)).astype(np.float32)


def test_load_local_sae(tmp_path):
    folder = tmp_path / "resid_post" / "layer_9_width_16k_l0_small"
    t = write_gs2(folder)
    sae = load_sae(folder, expected_d_in=D)
    assert not isinstance(sae, AutoEncoderSkip)
    x = x_batch()
    f, y = numpy_forward(t, x)
    np.testing.assert_allclose(sae.encode(x), f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sae(x), y, rtol=1e-5, atol=1e-5)
    m = sae.meta
    assert (m.d_in, m.d_sae, m.d_out, m.activation) == (D, W, D, "jumprelu")
    assert m.site_in == m.site_out == "blocks.9.resid_post"
    assert (
        m.extra["l0"] == 20 and m.extra["width_label"] == "16k" and m.extra["l0_label"] == "small"
    )
    assert m.source == str(folder)
    # folder given separately
    assert load_sae(tmp_path, "resid_post/layer_9_width_16k_l0_small").meta.d_sae == W


def test_load_transcoder_with_skip(tmp_path):
    t = gs2_tensors(2, d_out=5, affine=True)
    write_gs2(
        tmp_path,
        t,
        type="transcoder",
        hf_hook_point_in="model.layers.3.pre_feedforward_layernorm.output",
        hf_hook_point_out="model.layers.3.post_feedforward_layernorm.output",
    )
    sae = load_sae(tmp_path)
    assert isinstance(sae, AutoEncoderSkip)
    assert (sae.meta.site_in, sae.meta.site_out) == ("blocks.3.mlp_in", "blocks.3.mlp_out")
    x = x_batch()
    np.testing.assert_allclose(sae(x), numpy_forward(t, x)[1], rtol=1e-5, atol=1e-4)


def test_dtypes(tmp_path):
    t = gs2_tensors(3)
    write_gs2(tmp_path / "f32", t)
    write_gs2(tmp_path / "bf16", {k: v.astype(jnp.bfloat16) for k, v in t.items()})
    as_bf16 = load_sae(tmp_path / "f32", dtype=jnp.bfloat16).to_arrays()
    assert as_bf16["w_enc"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(as_bf16["w_dec"], t["w_dec"].astype(jnp.bfloat16))
    from_bf16 = load_sae(tmp_path / "bf16").to_arrays()  # bf16 file, f32 parameters
    assert from_bf16["w_enc"].dtype == np.float32
    np.testing.assert_array_equal(
        from_bf16["w_enc"], t["w_enc"].astype(jnp.bfloat16).astype(np.float32)
    )


@pytest.mark.parametrize(
    "change,config,match",
    [
        (lambda t: t.pop("b_dec"), {}, r"params\.safetensors: missing tensor\(s\) \['b_dec'\]"),
        (
            lambda t: t.update(b_enc=np.zeros(W + 1, np.float32)),
            {},
            r"'b_enc' has shape \(25,\), expected \(24,\)",
        ),
        (
            lambda t: None,
            {"width": 16384},
            r"w_enc has shape \(8, 24\) but .*config\.json says width=16384",
        ),
        (
            lambda t: t["w_dec"].__setitem__((0, 0), np.nan),
            {},
            r"'w_dec' \(24, 8\) contains NaN or Inf",
        ),
        (
            lambda t: t.update(threshold=t["threshold"].astype(np.int32)),
            {},
            r"'threshold' has dtype I32",
        ),
        (
            lambda t: None,
            {"affine_connection": True},
            r"missing tensor\(s\) \['affine_skip_connection'\]",
        ),
        (
            lambda t: t.update(w_dec=np.zeros((W, 5), np.float32)),
            {},
            r"SAE with w_enc \(8, 24\) and w_dec \(24, 5\)",
        ),
        (
            lambda t: None,
            {"hf_hook_point_in": "model.layers.2.mystery"},
            r"'model\.layers\.2\.mystery'",
        ),
        (lambda t: None, {"type": "clt"}, r"type 'clt'.*load_clt"),
    ],
)
def test_bad_checkpoints_name_file_key_and_shape(tmp_path, change, config, match):
    t = gs2_tensors(4)
    change(t)
    write_gs2(tmp_path, t, **config)
    with pytest.raises(ValueError, match=match):
        load_sae(tmp_path)


def test_skip_tensor_without_affine_flag(tmp_path):
    write_gs2(tmp_path, gs2_tensors(5, affine=True), affine_connection=False)
    with pytest.raises(CheckpointError, match="affine_skip_connection.*affine_connection=false"):
        load_sae(tmp_path)


def test_expected_d_in_and_missing_files(tmp_path):
    write_gs2(tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"w_enc has shape \(8, 24\): d_in=8, expected 640"):
        load_sae(tmp_path / "a", expected_d_in=640)
    (tmp_path / "a" / "params.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="params.safetensors"):
        load_sae(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_sae(tmp_path / "nowhere")
    truncated = tmp_path / "b"
    write_gs2(truncated)
    data = (truncated / "params.safetensors").read_bytes()
    (truncated / "params.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="past the end of the file"):
        load_sae(truncated)


def fake_hub(monkeypatch, root: Path, calls: list):
    def download(repo_id, filename, revision=None, **_):
        calls.append((repo_id, filename, revision))
        path = root / repo_id / filename
        if not path.exists():
            raise FileNotFoundError(f"404 {repo_id}/{filename}")
        return str(path)

    monkeypatch.setattr(checkpoint_files, "hf_hub_download", download)


def test_hub_sources(tmp_path, monkeypatch):
    calls = []
    fake_hub(monkeypatch, tmp_path, calls)
    folder = "resid_post/layer_9_width_16k_l0_small"
    t = write_gs2(tmp_path / "google/gemma-scope-2-270m-pt" / folder)
    a = load_sae("google/gemma-scope-2-270m-pt", folder, revision="abc")
    assert ("google/gemma-scope-2-270m-pt", f"{folder}/params.safetensors", "abc") in calls
    b = load_sae(f"google/gemma-scope-2-270m-pt:{folder}")
    assert a.meta.source == b.meta.source == f"google/gemma-scope-2-270m-pt:{folder}"
    np.testing.assert_array_equal(b.to_arrays()["w_enc"], t["w_enc"])
    with pytest.raises(FileNotFoundError, match="could not download .*layer_1/config.json"):
        load_sae("google/gemma-scope-2-270m-pt", "layer_1")


def test_save_round_trip(tmp_path):
    write_gs2(tmp_path / "src", gs2_tensors(6, d_out=5, affine=True), type="transcoder",
              hf_hook_point_out="model.layers.9.post_feedforward_layernorm.output")  # fmt: skip
    sae = load_sae(tmp_path / "src")
    out = save_gemma_scope_2(sae, tmp_path / "out" / "tc")
    again = load_sae(out)
    assert isinstance(again, AutoEncoderSkip)
    for key, value in sae.to_arrays().items():
        np.testing.assert_array_equal(again.to_arrays()[key], value)
    config = json.loads((out / "config.json").read_text())
    assert config["type"] == "transcoder" and config["affine_connection"] is True
    assert config["hf_hook_point_out"] == "model.layers.9.post_feedforward_layernorm.output"
    assert (again.meta.site_in, again.meta.site_out) == (sae.meta.site_in, sae.meta.site_out)
    with pytest.raises(FileExistsError):
        save_gemma_scope_2(sae, out)
    save_gemma_scope_2(load_sae(tmp_path / "src"), out, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tc"]  # no temp leftovers


def test_gemma_scope_1_npz(tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    arrays = {k.replace("w_", "W_"): v for k, v in gs2_tensors(7).items()}
    folder = tmp_path / "google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **arrays)
    monkeypatch.setattr(
        checkpoint_files,
        "hf_hub_download",
        lambda repo_id, filename, revision=None: str(tmp_path / repo_id / filename),
    )
    sae = load_gemma_scope_1("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")
    assert sae.meta.site_in == "blocks.12.resid_post" and sae.meta.extra["width_label"] == "16k"
    x = rng.normal(size=(4, D)).astype(np.float32)
    lower = {k.lower(): v for k, v in arrays.items()}
    np.testing.assert_allclose(sae(x), numpy_forward(lower, x)[1], rtol=1e-5, atol=1e-5)
    np.savez(tmp_path / "params.npz", W_enc=np.array([object()]), b_enc=np.zeros(1))
    with pytest.raises(CheckpointError, match="params.npz"):
        load_gemma_scope_1(tmp_path)


def write_clt(folder: Path, n_layers=3, d=D, d_sae=W, skip=True, seed=8):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n_layers):
        t = gs2_tensors(seed + i, d_in=d, d_sae=d_sae, d_out=d, affine=skip)
        t["w_dec"] = rng.normal(size=(d_sae, n_layers, d)).astype(np.float32)
        t["w_dec"][:, :i] = 1e6  # unused targets j < i: must never be read
        save_file(t, str(folder / f"params_layer_{i}.safetensors"))
        files.append(t)
    return files


def test_clt_against_numpy(tmp_path, monkeypatch):
    files = write_clt(tmp_path / "clt" / "width_16k_l0_medium_affine")
    clt = load_clt(tmp_path / "clt" / "width_16k_l0_medium_affine")
    assert clt.n_layers == 3 and clt.w_dec[1].shape == (W, 2, D)
    xs = [x_batch(seed=s) for s in range(3)]
    latents = []
    for i, (t, x) in enumerate(zip(files, xs, strict=True)):
        pre = x.astype(np.float64) @ t["w_enc"] + t["b_enc"]
        latents.append(np.where(pre > t["threshold"], pre, 0.0))
        np.testing.assert_allclose(clt.encode(x, i), latents[-1], rtol=1e-5, atol=1e-5)
    outs = clt(xs)
    for j in range(3):
        want = sum(latents[i] @ files[i]["w_dec"][:, j] for i in range(j + 1)) + files[j]["b_dec"]
        lat32 = [f.astype(np.float32) for f in latents]
        np.testing.assert_allclose(clt.decode_to_layer(lat32, j), want, rtol=1e-4, atol=1e-3)
        want = want + xs[j] @ files[j]["affine_skip_connection"]
        np.testing.assert_allclose(outs[j], want, rtol=1e-4, atol=1e-3)
    jitted = jax.jit(lambda model, inputs: model(inputs))(clt, xs)
    np.testing.assert_allclose(jitted[2], outs[2], rtol=1e-5, atol=1e-4)
    assert clt.sites(2) == ("blocks.2.mlp_in", "blocks.2.mlp_out")
    # hub listing: the layer files are found through list_repo_files
    listing = [f"clt/w/params_layer_{i}.safetensors" for i in (2, 0, 1)] + ["clt/w/README.md"]
    monkeypatch.setattr(checkpoint_files, "list_repo_files", lambda repo, revision=None: listing)

    def download(repo_id, filename, revision=None):
        path = tmp_path / "clt" / "width_16k_l0_medium_affine" / Path(filename).name
        if not path.exists():
            raise FileNotFoundError(filename)
        return str(path)

    monkeypatch.setattr(checkpoint_files, "hf_hub_download", download)
    from_hub = load_clt("google/gemma-scope-2-270m-pt", "clt/w")
    np.testing.assert_array_equal(from_hub.w_dec[2], clt.w_dec[2])
    del listing[1]  # layer 0 missing
    with pytest.raises(FileNotFoundError, match="expected params_layer_0"):
        load_clt("google/gemma-scope-2-270m-pt", "clt/w")


def test_clt_bad_decoder_shape(tmp_path):
    write_clt(tmp_path, n_layers=2)
    t = gs2_tensors(1, affine=True)
    t["w_dec"] = np.zeros((W, 3, D), np.float32)
    save_file(t, str(tmp_path / "params_layer_1.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"params_layer_1.*'w_dec' has shape \(24, 3, 8\), expected \(24, 2, 8\)",
    ):
        load_clt(tmp_path)
    save_file(gs2_tensors(1), str(tmp_path / "params_layer_1.safetensors"))  # no skip in layer 1
    with pytest.raises(
        CheckpointError, match=r"params_layer_1.*layer 1 lacks 'affine_skip_connection'"
    ):
        load_clt(tmp_path)
    # the reverse: layer 0 without a skip must not borrow layer 1's
    first = write_clt(tmp_path, n_layers=2)[0]
    first.pop("affine_skip_connection")
    save_file(first, str(tmp_path / "params_layer_0.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"params_layer_1.*layer 1 has 'affine_skip_connection'"
    ):
        load_clt(tmp_path)


def test_site_table():
    assert site_from_hook("model.layers.9.output") == "blocks.9.resid_post"
    assert site_from_hook("model.language_model.layers.4.output") == "blocks.4.resid_post"
    assert site_from_hook("model.layers.11.self_attn.o_proj.input") == "blocks.11.attn_out"
    for site in (
        "blocks.2.resid_pre",
        "blocks.2.resid_post",
        "blocks.2.attn_out",
        "blocks.2.mlp_in",
        "blocks.2.mlp_out",
    ):
        assert site_from_hook(hook_from_site(site)) == site
        assert site_from_hook(site) == site
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj"):
        site_from_hook("model.layers.1.mlp.down_proj")


def _trainer_sae(activation, k=None):
    t = gs2_tensors(9)
    t.pop("threshold")
    meta = SaeMeta(
        D, W, D, site_in="blocks.4.resid_post", site_out="blocks.4.resid_post", extra={"l0": 3}
    )
    return AutoEncoder.from_arrays(**t, activation=activation, k=k, meta=meta)


def test_save_relu_as_jumprelu_threshold_zero(tmp_path):
    sae = _trainer_sae("relu")
    again = load_sae(save_gemma_scope_2(sae, tmp_path / "out", model_name="gemma3-270m"))
    assert (again.meta.activation, again.meta.site_in) == ("jumprelu", "blocks.4.resid_post")
    np.testing.assert_array_equal(again.to_arrays()["threshold"], np.zeros(W, np.float32))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["hf_hook_point_in"] == "model.layers.4.output" and config["type"] == "sae"
    assert config["architecture"] == "jump_relu" and config["model_name"] == "google/gemma-3-270m"
    assert config["converted_from"] == "relu" and config["l0"] == 3
    x = x_batch()
    np.testing.assert_allclose(again(x), sae(x), rtol=1e-6, atol=1e-6)


def test_save_topk_refused_or_converted_with_threshold(tmp_path):
    sae = _trainer_sae("topk", 3)
    with pytest.raises(ValueError, match=r"TopK dictionary \(k=3\) has no exact JumpReLU form"):
        save_gemma_scope_2(sae, tmp_path / "out", model_name="270m")
    assert not (tmp_path / "out").exists()
    out = save_gemma_scope_2(sae, tmp_path / "out", model_name="270m", topk_threshold=0.25)
    again = load_sae(out)
    x = x_batch()
    pre = x @ sae.to_arrays()["w_enc"] + sae.to_arrays()["b_enc"]
    want = np.where(pre > 0.25, pre, 0.0) @ sae.to_arrays()["w_dec"] + sae.to_arrays()["b_dec"]
    np.testing.assert_allclose(again(x), want, rtol=1e-5, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["converted_from"] == "topk (k=3)" and "k" not in config


def test_save_needs_a_gemma_3_model_name(tmp_path):
    with pytest.raises(ValueError, match="need a model_name"):
        save_gemma_scope_2(_trainer_sae("relu"), tmp_path / "a")
    with pytest.raises(ValueError, match="'gpt2' is not a Gemma 3 model"):
        save_gemma_scope_2(_trainer_sae("relu"), tmp_path / "a", model_name="gpt2")
    assert not (tmp_path / "a").exists()


def test_read_topk_folder_of_older_exports(tmp_path):
    t = gs2_tensors(10)
    t.pop("threshold")
    write_gs2(tmp_path, t, architecture="topk", k=3)
    sae = load_sae(tmp_path)
    assert (sae.meta.activation, sae.meta.k) == ("topk", 3)
    write_gs2(tmp_path, t, architecture="topk", k="3")
    with pytest.raises(CheckpointError, match="architecture 'topk' needs an integer 'k', got '3'"):
        load_sae(tmp_path)


def test_hook_name_tables_are_strict():
    from gemma_scope_pz.scope.formats.hook_names import (
        hf_model_id,
        saelens_hook_name,
        site_kind_from_hook,
    )

    kinds = ("resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_out")
    names = ["hook_resid_pre", "hook_resid_post", "attn.hook_z", "hook_mlp_in", "hook_mlp_out"]
    assert [saelens_hook_name(f"blocks.7.{k}") for k in kinds] == [f"blocks.7.{n}" for n in names]
    assert site_kind_from_hook("model.layers.{all}.pre_feedforward_layernorm.output") == (
        "mlp_in",
        None,
    )
    with pytest.raises(ValueError, match="names all layers"):
        site_from_hook("model.layers.{all}.output")
    for bad in (
        "blocks.3.resid_post\n",
        "blocks.٣.resid_post",
        "blocks.3.resid",
        " blocks.3.mlp_in",
    ):
        with pytest.raises(ValueError, match="unknown site"):
            hook_from_site(bad)
        with pytest.raises(ValueError, match="unknown site"):
            saelens_hook_name(bad)
    assert hf_model_id("gemma3-270m") == "google/gemma-3-270m"
    assert hf_model_id("hf:google/gemma-3-1b-it") == "google/gemma-3-1b-it"
    assert hf_model_id("4b") == "google/gemma-3-4b-pt"
    with pytest.raises(ValueError, match="'google/gemma-2-2b' is not a Gemma 3 model"):
        hf_model_id("google/gemma-2-2b")


def test_old_import_paths_warn_and_still_work():
    import importlib
    import sys

    from gemma_scope_pz.scope import formats

    for old, new in (
        ("gemma_scope_pz.scope.checkpoints", formats),
        ("gemma_scope_pz.scope.gemma_scope_2", formats.gemma_scope_2),
    ):
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{old} is deprecated"):
            module = importlib.import_module(old)
        assert (
            module.load_sae is new.load_sae and module.save_gemma_scope_2 is new.save_gemma_scope_2
        )
