"""Gemma Scope 2 multi-layer dictionaries in the released layout: CLTs and weakly causal crosscoders.

Folders are written here in the layout of the release (config.json with placeholder hook points and the
total width; one params_layer_{i}.safetensors per layer) and checked against numpy formulas. A fake Hub
records every download, so "validated before download" is checked by counting them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from gemma_scope_pz.scope.formats import CheckpointError, load_clt, load_crosscoder, load_sae
from gemma_scope_pz.scope.formats import files as format_files

D, W = 8, 12
REPO = "google/gemma-scope-2-270m-pt"


def _layer_tensors(rng, d_dec_shape, skip):
    t = {
        "w_enc": rng.normal(size=(D, W)).astype(np.float32) * 0.5,
        "b_enc": rng.normal(size=W).astype(np.float32) * 0.2,
        "threshold": np.abs(rng.normal(size=W)).astype(np.float32) * 0.3,
        "w_dec": rng.normal(size=d_dec_shape).astype(np.float32) * 0.5,
        "b_dec": rng.normal(size=D).astype(np.float32) * 0.1,
    }
    if skip:
        t["affine_skip_connection"] = rng.normal(size=(D, D)).astype(np.float32) * 0.2
    return t


def write_released_clt(folder: Path, n_layers=3, skip=True, **config_changes):
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "type": "clt",
        "architecture": "jump_relu",
        "width": n_layers * W,
        "hf_hook_point_in": "model.layers.{all}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.{all}.post_feedforward_layernorm.output",
        "affine_connection": skip,
        "model_name": "gemma-v3-270m-pt",
        **config_changes,
    }
    (folder / "config.json").write_text(json.dumps(config))
    files = [_layer_tensors(rng, (W, n_layers, D), skip) for _ in range(n_layers)]
    for i, t in enumerate(files):
        save_file(t, str(folder / f"params_layer_{i}.safetensors"))
    return files


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    downloads = []

    def download(repo_id, filename, revision=None, **_):
        downloads.append(filename)
        path = tmp_path / "hub" / repo_id / filename
        if not path.exists():
            raise FileNotFoundError(f"404 {filename}")
        return str(path)

    def listing(repo_id, revision=None):
        root = tmp_path / "hub" / repo_id
        return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]

    monkeypatch.setattr(format_files, "hf_hub_download", download)
    monkeypatch.setattr(format_files, "list_repo_files", listing)
    return tmp_path / "hub" / REPO, downloads


def jumprelu(pre, threshold):
    return np.where(pre > threshold, pre, 0.0)


def test_released_clt_loads_and_matches_numpy(tmp_path):
    files = write_released_clt(tmp_path / "clt" / "width_36_l0_medium_affine")
    clt = load_clt(tmp_path / "clt" / "width_36_l0_medium_affine")
    assert clt.n_layers == 3 and clt.sites(1) == ("blocks.1.mlp_in", "blocks.1.mlp_out")
    xs = [np.random.default_rng(s).normal(size=(4, D)).astype(np.float32) for s in range(3)]
    f = [
        jumprelu(x.astype(np.float64) @ t["w_enc"] + t["b_enc"], t["threshold"])
        for x, t in zip(xs, files)
    ]
    outs = clt(xs)
    for j in range(3):
        want = sum(f[i] @ files[i]["w_dec"][:, j] for i in range(j + 1)) + files[j]["b_dec"]
        want = want + xs[j] @ files[j]["affine_skip_connection"]
        np.testing.assert_allclose(outs[j], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "change,match",
    [
        (
            {"type": "crosscoder"},
            r"type 'crosscoder' is not a cross-layer transcoder \(use load_crosscoder\)",
        ),
        ({"type": "sparse_thing"}, r"type 'sparse_thing' is not a cross-layer transcoder"),
        ({"architecture": "topk"}, r"CLT architecture 'topk' is not supported"),
        (
            {"hf_hook_point_in": "model.layers.{all}.mlp.down_proj"},
            r"unknown Gemma Scope hook point",
        ),
        ({"width": "36"}, r"width must be a positive integer, got '36'"),
        ({"width": 37}, r"config width 37 is not a multiple of 3 layers"),
    ],
)
def test_clt_config_refused_before_any_layer_download(fake_hub, change, match):
    root, downloads = fake_hub
    write_released_clt(root / "clt" / "w", **change)
    with pytest.raises(CheckpointError, match=match):
        load_clt(REPO, "clt/w")
    assert not [d for d in downloads if "params_layer" in d], downloads


def test_clt_width_is_the_total_over_layers(fake_hub):
    root, downloads = fake_hub
    write_released_clt(root / "clt" / "w", width=3 * 2 * W)  # a multiple, but not n x d_sae
    with pytest.raises(CheckpointError, match=r"gives 3 x 12 = 36 latents but config width is 72"):
        load_clt(REPO, "clt/w")
    assert [d for d in downloads if "params_layer" in d] == ["clt/w/params_layer_0.safetensors"]
    write_released_clt(root / "clt" / "w")
    assert load_clt(REPO, "clt/w").meta.extra["width"] == 36


def test_clt_skip_flag_must_match_the_files(tmp_path):
    write_released_clt(tmp_path, skip=False, affine_connection=True)
    with pytest.raises(
        CheckpointError, match=r"params_layer_0.*lacks 'affine_skip_connection' but config"
    ):
        load_clt(tmp_path)


def write_crosscoder(
    folder: Path, layers=(2, 5, 7, 9), by_model_layer=False, shared_everywhere=True
):
    rng = np.random.default_rng(5)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"type": "crosscoder", "architecture": "jump_relu", "width": W,
              "hf_hook_point_in": "model.layers.{all}.output", "model_name": "gemma-v3-270m-pt"}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    b_enc = rng.normal(size=W).astype(np.float32) * 0.3
    threshold = np.abs(rng.normal(size=W)).astype(np.float32) * 0.5
    files = []
    for pos, layer in enumerate(layers):
        t = {
            "w_enc": rng.normal(size=(D, W)).astype(np.float32) * 0.4,
            "w_dec": rng.normal(size=(W, D)).astype(np.float32) * 0.4,
            "b_dec": rng.normal(size=D).astype(np.float32) * 0.1,
        }
        if pos == 0 or shared_everywhere:
            t.update(b_enc=b_enc, threshold=threshold)
        save_file(t, str(folder / f"params_layer_{layer if by_model_layer else pos}.safetensors"))
        files.append(t)
    return files, b_enc, threshold


@pytest.mark.parametrize("by_model_layer,shared_everywhere", [(False, True), (True, False)])
def test_crosscoder_matches_numpy(tmp_path, by_model_layer, shared_everywhere):
    folder = tmp_path / "crosscoder" / "layer_2_5_7_9_width_12_l0_medium"
    files, b_enc, threshold = write_crosscoder(folder, by_model_layer=by_model_layer,
                                               shared_everywhere=shared_everywhere)  # fmt: skip
    cc = load_crosscoder(folder)
    assert cc.layers == (2, 5, 7, 9)
    assert cc.sites() == [f"blocks.{n}.resid_post" for n in (2, 5, 7, 9)]
    xs = [np.random.default_rng(10 + i).normal(size=(3, 4, D)).astype(np.float32) for i in range(4)]
    pre = sum(x.astype(np.float64) @ t["w_enc"] for x, t in zip(xs, files)) + b_enc
    f = jumprelu(pre, threshold)
    np.testing.assert_allclose(cc.encode(xs), f, rtol=1e-5, atol=1e-5)
    for out, t in zip(cc(xs), files, strict=True):
        np.testing.assert_allclose(out, f @ t["w_dec"] + t["b_dec"], rtol=1e-4, atol=1e-4)


def test_crosscoder_refusals(tmp_path, fake_hub):
    root, downloads = fake_hub
    folder = root / "crosscoder" / "layer_2_5_7_9_width_12_l0_medium"
    files, _, _ = write_crosscoder(folder)
    (folder / "config.json").write_text(json.dumps({"type": "clt"}))
    with pytest.raises(CheckpointError, match=r"type 'clt' is not a crosscoder \(use load_clt\)"):
        load_crosscoder(REPO, "crosscoder/layer_2_5_7_9_width_12_l0_medium")
    assert not [d for d in downloads if "params_layer" in d]
    (folder / "config.json").write_text(json.dumps({"type": "crosscoder"}))
    with pytest.raises(
        CheckpointError, match=r"type 'crosscoder' is not an SAE/transcoder \(use load_crosscoder"
    ):
        load_sae(folder)  # never read as another type
    files[2]["b_enc"] = files[2]["b_enc"] + 1
    save_file(files[2], str(folder / "params_layer_2.safetensors"))
    with pytest.raises(CheckpointError, match=r"params_layer_2.*layer 7's 'b_enc' differs"):
        load_crosscoder(folder)
    (folder / "params_layer_3.safetensors").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"expected params_layer_0..3.safetensors.*found \[0, 1, 2\]"
    ):
        load_crosscoder(folder)
    with pytest.raises(CheckpointError, match="not a crosscoder folder name"):
        load_crosscoder(tmp_path)
