"""Gemma Scope 1 params.npz: the site comes from the release name, embedding SAEs scaled as SAELens does."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from gemma_scope_pz.scope.formats import CheckpointError, load_gemma_scope_1
from gemma_scope_pz.scope.formats import files as format_files
from gemma_scope_pz.scope.formats.gemma_scope_1 import sites_from_release

D, W = 8, 16


def write_npz(folder: Path, seed=0, d_out=D) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "W_enc": rng.normal(size=(D, W)).astype(np.float32),
        "b_enc": rng.normal(size=W).astype(np.float32) * 0.1,
        "W_dec": rng.normal(size=(W, d_out)).astype(np.float32),
        "b_dec": rng.normal(size=d_out).astype(np.float32),
        "threshold": np.abs(rng.normal(size=W)).astype(np.float32),
    }
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **arrays)
    return arrays


@pytest.mark.parametrize(
    "release,sae_id,sites",
    [
        (
            "google/gemma-scope-2b-pt-res",
            "layer_12/width_16k/average_l0_82",
            ("blocks.12.resid_post",) * 2,
        ),
        (
            "gemma-scope-9b-pt-res-canonical",
            "layer_20/width_16k/canonical",
            ("blocks.20.resid_post",) * 2,
        ),
        ("gemma-scope-2b-pt-mlp", "layer_3/width_16k/average_l0_119", ("blocks.3.mlp_out",) * 2),
        ("gemma-scope-2b-pt-att", "layer_0/width_16k/average_l0_104", ("blocks.0.attn_out",) * 2),
        (
            "gemma-scope-2b-pt-transcoders",
            "layer_7/width_16k/average_l0_76",
            ("blocks.7.mlp_in", "blocks.7.mlp_out"),
        ),
    ],
)
def test_site_from_release(release, sae_id, sites):
    assert sites_from_release(release, sae_id) == (*sites, False)


def test_unknown_release_and_id_refused():
    with pytest.raises(
        ValueError, match="unknown Gemma Scope 1 release 'gemma-scope-2b-pt-residual'"
    ):
        sites_from_release("gemma-scope-2b-pt-residual", "layer_1/width_16k/x")
    with pytest.raises(ValueError, match="does not start with 'layer_<L>/'"):
        sites_from_release("gemma-scope-2b-pt-res", "width_16k/layer_1")


def test_local_path_substrings_are_not_read(tmp_path):
    folder = tmp_path / "my-res-experiments" / "layer_3" / "gemma-scope-2b-pt-mlp-copy"
    write_npz(folder)
    assert load_gemma_scope_1(folder).meta.site_in == ""
    sae = load_gemma_scope_1(
        folder.parent.parent, "layer_3/gemma-scope-2b-pt-mlp-copy", release="gemma-scope-2b-pt-mlp"
    )
    assert (sae.meta.site_in, sae.meta.extra["release"]) == (
        "blocks.3.mlp_out",
        "gemma-scope-2b-pt-mlp",
    )


def test_transcoder_from_hub(tmp_path, monkeypatch):
    repo = "google/gemma-scope-2b-pt-transcoders"
    a = write_npz(tmp_path / repo / "layer_7/width_16k/average_l0_76", seed=1)
    monkeypatch.setattr(format_files, "hf_hub_download",
                        lambda repo_id, filename, revision=None: str(tmp_path / repo_id / filename))  # fmt: skip
    tc = load_gemma_scope_1(repo, "layer_7/width_16k/average_l0_76")
    assert (tc.meta.site_in, tc.meta.site_out) == ("blocks.7.mlp_in", "blocks.7.mlp_out")
    x = np.random.default_rng(2).normal(size=(5, D)).astype(np.float32)
    pre = x.astype(np.float64) @ a["W_enc"] + a["b_enc"]
    want = np.where(pre > a["threshold"], pre, 0) @ a["W_dec"] + a["b_dec"]
    np.testing.assert_allclose(tc(x), want, rtol=1e-5, atol=1e-4)


def test_embedding_sae_scaled_like_saelens(tmp_path):
    a = write_npz(tmp_path / "embedding" / "width_4k" / "average_l0_6", seed=3)
    sae = load_gemma_scope_1(
        tmp_path, "embedding/width_4k/average_l0_6", release="gemma-scope-2b-pt-res"
    )
    scale = math.sqrt(D)
    # SAELens's hook_embed is TransformerLens's embedding already times sqrt(d_model): resid_pre 0.
    assert sae.meta.site_in == "blocks.0.resid_pre"
    assert sae.meta.extra["saelens_hook_name"] == "hook_embed"
    x = np.random.default_rng(4).normal(size=(5, D)).astype(np.float32)
    pre = x.astype(np.float64) @ (a["W_enc"] / scale) + a["b_enc"]  # SAELens's gemma_2 loader
    want = np.where(pre > a["threshold"], pre, 0) @ (a["W_dec"] * scale) + a["b_dec"]
    np.testing.assert_allclose(sae(x), want, rtol=1e-5, atol=1e-4)


def test_release_mismatch_named(tmp_path):
    write_npz(tmp_path / "layer_1")
    with pytest.raises(CheckpointError, match="unknown Gemma Scope 1 release 'my-release'"):
        load_gemma_scope_1(tmp_path, "layer_1", release="my-release")
