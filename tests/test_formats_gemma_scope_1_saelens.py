"""Gemma Scope 1 against SAELens's own loaders, canonical folders, and the model-family check.

``tests/data/gemma_scope_1/<repo>/<sae id>/params.npz`` are small random files laid out as the Hub
repos; ``tests/data/gemma_scope_1_reference.json`` holds what SAELens 6.54's ``gemma_2`` /
``gemma_2_transcoder`` loaders read from them (hook names, model name) and their encodings, all from
``scripts/reference_gemma_scope_1.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import gemma_scope_pz as gs
from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.gemma3 import Gemma3LM, forward
from gemma_scope_pz.scope.formats import CheckpointError, load_gemma_scope_1
from gemma_scope_pz.scope.formats import files as format_files
from gemma_scope_pz.scope.formats.gemma_scope_1 import canonical_folder
from gemma_scope_pz.scope.formats.hook_names import model_family, saelens_hook_name
from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "gemma_scope_1_reference.json").read_text())
CASES = REFERENCE["cases"]
IDS = [f"{c['repo'].rsplit('-', 1)[-1]}:{c['sae_id'].split('/')[0]}" for c in CASES]
IDS = [f"{i}-{n}" for n, i in enumerate(IDS)]


@pytest.fixture
def hub(monkeypatch) -> list[str]:
    """The hub download reads tests/data/gemma_scope_1; returns the requested file names."""
    requested: list[str] = []

    def download(repo_id, filename, revision=None):
        requested.append(f"{repo_id}/{filename}")
        return str(DATA / "gemma_scope_1" / repo_id / filename)

    monkeypatch.setattr(format_files, "hf_hub_download", download)
    return requested


def _saelens_hook(sae: AutoEncoder) -> str:
    """The SAELens hook name our site corresponds to (recorded in meta for the special cases)."""
    return sae.meta.extra.get("saelens_hook_name") or saelens_hook_name(sae.meta.site_in)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_encodings_equal_saelens(case, hub):
    sae = load_gemma_scope_1(case["repo"], case["sae_id"])
    x = np.array(case["x"], np.float32)
    feats = np.asarray(sae.encode(x))
    np.testing.assert_allclose(feats, np.array(case["encode"]), rtol=1e-5, atol=1e-5)
    assert int((feats > 0).sum()) == case["active"] > 0
    recon = np.asarray(sae.decode(feats))
    np.testing.assert_allclose(recon, np.array(case["decode"]), rtol=1e-5, atol=1e-5)
    # The site each SAE attaches to is the hook its release names in SAELens.
    assert _saelens_hook(sae) == case["hook_name"]
    if case["hook_name_out"]:
        assert sae.meta.extra["saelens_hook_name_out"] == case["hook_name_out"]
    assert sae.meta.extra["model_name"] == "google/" + case["model_name"]


def test_sites_of_the_recorded_releases(hub):
    sites = {
        (c["repo"], c["sae_id"]): (s.meta.site_in, s.meta.site_out)
        for c in CASES
        for s in [load_gemma_scope_1(c["repo"], c["sae_id"])]
    }
    assert sites == {
        ("google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_82"): ("blocks.3.resid_post",) * 2,
        ("google/gemma-scope-2b-pt-mlp", "layer_1/width_16k/average_l0_119"): ("blocks.1.mlp_out",) * 2,
        ("google/gemma-scope-2b-pt-att", "layer_2/width_16k/average_l0_104"): ("blocks.2.attn_out",) * 2,
        ("google/gemma-scope-2b-pt-res", "embedding/width_4k/average_l0_6"): ("blocks.0.resid_pre",) * 2,
        ("google/gemma-scope-2b-pt-transcoders", "layer_2/width_16k/average_l0_76"): (
            "blocks.2.mlp_in", "blocks.2.mlp_out"),
        ("google/gemma-scope-9b-it-res", "layer_1/width_16k/average_l0_88"): ("blocks.1.resid_post",) * 2,
    }  # fmt: skip


def test_canonical_ids_name_the_saelens_l0_folder(tmp_path, monkeypatch):
    assert canonical_folder("google/gemma-scope-2b-pt-res", "layer_20/width_16k/canonical") == (
        "layer_20/width_16k/average_l0_71"
    )
    assert canonical_folder("gemma-scope-9b-it-res-canonical", "layer_9/width_16k/canonical") == (
        "layer_9/width_16k/average_l0_88"
    )
    assert canonical_folder("google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_82") == (
        "layer_3/width_16k/average_l0_82"
    )
    # SAELens's release name "...-res-canonical" is not a hub repo: the real repo's L0 folder is
    # fetched (layer_3/width_16k/canonical is average_l0_59 in SAELens's table).
    repo = "google/gemma-scope-2b-pt-res"
    target = tmp_path / repo / "layer_3/width_16k/average_l0_59/params.npz"
    target.parent.mkdir(parents=True)
    target.write_bytes(
        (DATA / "gemma_scope_1" / repo / "layer_3/width_16k/average_l0_82/params.npz").read_bytes()
    )
    requested = []
    monkeypatch.setattr(format_files, "hf_hub_download",
                        lambda repo_id, filename, revision=None: requested.append(f"{repo_id}/{filename}")
                        or str(tmp_path / repo_id / filename))  # fmt: skip
    sae = load_gemma_scope_1(f"{repo}-canonical", "layer_3/width_16k/canonical")
    assert requested == [f"{repo}/layer_3/width_16k/average_l0_59/params.npz"]
    assert (sae.meta.site_in, sae.meta.extra["release"]) == ("blocks.3.resid_post", repo)
    with pytest.raises(CheckpointError, match=r"no canonical SAE 'layer_99/width_16k/canonical'"):
        load_gemma_scope_1(repo, "layer_99/width_16k/canonical")


def test_model_family_names():
    assert [model_family(n) for n in ("google/gemma-2-2b", "gemma2-9b", "gemma-2-27b-it")] == [
        "gemma2"
    ] * 3
    assert [model_family(n) for n in ("google/gemma-3-270m", "gemma3-1b", "270m")] == ["gemma3"] * 3
    assert model_family("my-model") is None


def _tiny_gemma2() -> Gemma3LM:
    """A Gemma 2 whose widths match the recorded files: d_model 24, attention width 4 x 4."""
    config = Gemma3Config.tiny(family="gemma2", d_model=24, n_layers=4, head_dim=4, vocab_size=48)
    return Gemma3LM.random(config, seed=1)


def test_gemma2_only_sites_splice_into_a_gemma2_model(hub):
    """The attention-z SAE and the transcoder (resid sites work as on Gemma 3)."""
    model = _tiny_gemma2()
    tokens = np.array([[2, 5, 9, 11, 40, 7, 8, 30]])
    clean = np.asarray(forward(model, tokens))
    special = ("attn.hook_z", "ln2.hook_normalized")
    for case in [c for c in CASES if c["hook_name"].endswith(special)]:
        sae = load_gemma_scope_1(case["repo"], case["sae_id"])
        exact = np.asarray(forward(gs.splice(model, sae, include_error=True), tokens))
        np.testing.assert_allclose(exact, clean, atol=1e-4, err_msg=case["sae_id"])
        spliced = np.asarray(forward(gs.splice(model, sae), tokens))
        assert np.isfinite(spliced).all() and np.abs(spliced - clean).max() > 1e-4


def test_gemma_scope_1_on_gemma3_refused_naming_both(hub):
    gemma3 = Gemma3LM.random(Gemma3Config.tiny(d_model=24, n_layers=4, head_dim=4), seed=1)
    sae = load_gemma_scope_1("google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_82")
    with pytest.raises(ValueError, match=r"google/gemma-2-2b \(gemma2\).*tiny \(gemma3\)"):
        gs.splice(gemma3, sae)
    with pytest.raises(ValueError, match=r"google/gemma-2-2b \(gemma2\)"):
        gs.evaluate_sae(gemma3, sae, np.array([[2, 5, 9, 11]]))


def test_gemma3_dictionary_on_gemma2_refused_naming_both():
    model = _tiny_gemma2()
    rng = np.random.default_rng(0)
    meta = SaeMeta(
        d_in=24,
        d_sae=8,
        d_out=24,
        site_in="blocks.1.resid_post",
        site_out="blocks.1.resid_post",
        extra={"model_name": "google/gemma-3-270m"},
    )
    sae = AutoEncoder.from_arrays(
        rng.normal(size=(24, 8)), np.zeros(8), rng.normal(size=(8, 24)), np.zeros(24),
        np.zeros(8), meta=meta,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"google/gemma-3-270m \(gemma3\).*tiny-gemma2 \(gemma2\)"):
        gs.splice(model, sae)


def test_transcoder_evaluated_on_gemma2(hub):
    """evaluate_sae runs a Gemma Scope 1 transcoder on Gemma 2; its clean loss is the soft-capped
    model's next-token loss (numpy, BOS's own prediction not counted)."""
    model = _tiny_gemma2()
    tc = load_gemma_scope_1(
        "google/gemma-scope-2b-pt-transcoders", "layer_2/width_16k/average_l0_76"
    )
    tokens = np.array([[2, 5, 9, 11, 40, 7, 8, 30], [2, 6, 10, 12, 41, 3, 9, 31]])
    ev = gs.evaluate_sae(model, tc, tokens, progress=False)
    logits = np.asarray(forward(model, tokens)).astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    assert ev.n_tokens == 14
    np.testing.assert_allclose(ev.ce_clean, nll[:, 1:].mean(), rtol=1e-5)
    assert np.isfinite([ev.fvu, ev.ce_spliced, ev.kl]).all() and ev.ce_spliced != ev.ce_clean


def test_load_sae_reads_gemma_scope_1(hub):
    """gs.load_sae hands Gemma Scope 1 repos (canonical ids too) and params.npz folders over."""
    case = CASES[0]
    sae = gs.load_sae(case["repo"], case["sae_id"])
    assert (sae.meta.extra["format"], sae.meta.site_in) == ("gemma_scope_1", "blocks.3.resid_post")
    x = np.array(case["x"], np.float32)
    np.testing.assert_allclose(sae.encode(x), np.array(case["encode"]), rtol=1e-5, atol=1e-5)
    local = DATA / "gemma_scope_1" / case["repo"] / case["sae_id"]
    assert gs.load_sae(local).meta.d_sae == sae.meta.d_sae
    with pytest.raises(CheckpointError, match=r"d_in=24, expected 2304"):
        gs.load_sae(case["repo"], case["sae_id"], expected_d_in=2304)
