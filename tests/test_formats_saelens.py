"""Our SAELens and Gemma Scope 2 exports against the real SAELens (recorded outputs, no torch here).

``write_reference_folders`` builds small dictionaries from deterministic random weights and writes
them with our writers; the committed copies live in ``tests/data/saelens/``. The real SAELens
(sae-lens 6.54.12, in a scratch environment) loaded those folders and recorded its encode / decode /
forward outputs and the hook names it resolved in ``tests/data/saelens_reference.json``
(``scripts/reference_saelens.py``). These tests re-export, check the bytes are the committed ones, and
compare our outputs with SAELens's to 1e-5.

Regenerate after a deliberate format change::

    .venv/bin/python -c "import tests.test_formats_saelens as t; t.write_reference_folders()"
    /work/scratch/saelens/bin/python scripts/reference_saelens.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gemma_scope_pz.scope.formats import load_sae, save_gemma_scope_2, save_saelens
from gemma_scope_pz.scope.formats.hook_names import hook_from_site, saelens_hook_name
from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta

DATA = Path(__file__).parent / "data"
FOLDERS = DATA / "saelens"
REFERENCE = DATA / "saelens_reference.json"
D, W, D_OUT = 16, 32, 12
TOPK_THRESHOLD = 0.3

# name -> (activation, k, d_out, skip, site_in, site_out)
SPECS = {
    "sae_jumprelu": ("jumprelu", None, D, False, "blocks.5.resid_post", "blocks.5.resid_post"),
    "sae_relu": ("relu", None, D, False, "blocks.3.mlp_out", "blocks.3.mlp_out"),
    "sae_topk": ("topk", 4, D, False, "blocks.2.attn_out", "blocks.2.attn_out"),
    "tc_topk_as_jumprelu": ("topk", 4, D, False, "blocks.4.mlp_in", "blocks.4.mlp_out"),
    "tc_jumprelu_skip_square": ("jumprelu", None, D, True, "blocks.1.mlp_in", "blocks.1.mlp_out"),
    "tc_relu_skip_rect": ("relu", None, D_OUT, True, "blocks.0.mlp_in", "blocks.0.mlp_out"),
    "tc_jumprelu_rect": ("jumprelu", None, D_OUT, False, "blocks.2.mlp_in", "blocks.2.mlp_out"),
}
# The SAELens class each export must become.
SAELENS_CLASSES = {
    "sae_jumprelu": "JumpReLUSAE",
    "sae_relu": "StandardSAE",
    "sae_topk": "TopKSAE",
    "tc_topk_as_jumprelu": "JumpReLUTranscoder",
    "tc_jumprelu_skip_square": "JumpReLUSkipTranscoder",
    "tc_relu_skip_rect": "SkipTranscoder",
    "tc_jumprelu_rect": "JumpReLUTranscoder",
}
# Gemma Scope 2 folders (named as released, which SAELens's gemma_3 loader parses) -> dictionary.
GS2 = {
    "resid_post/layer_5_width_16k_l0_small": "sae_jumprelu",
    "transcoder/layer_1_width_16k_l0_small_affine": "tc_jumprelu_skip_square",
}


def make_dictionary(name: str) -> AutoEncoder:
    """A small dictionary with deterministic weights (seeded by its position in SPECS)."""
    activation, k, d_out, skip, site_in, site_out = SPECS[name]
    rng = np.random.default_rng(list(SPECS).index(name) + 100)
    arrays = {
        "w_enc": rng.normal(size=(D, W)).astype(np.float32) * 0.4,
        "b_enc": rng.normal(size=W).astype(np.float32) * 0.2,
        "w_dec": rng.normal(size=(W, d_out)).astype(np.float32) * 0.4,
        "b_dec": rng.normal(size=d_out).astype(np.float32) * 0.1,
    }
    threshold = np.abs(rng.normal(size=W)).astype(np.float32) * 0.5
    w_skip = rng.normal(size=(D, d_out)).astype(np.float32) * 0.3 if skip else None
    meta = SaeMeta(
        D,
        W,
        d_out,
        site_in=site_in,
        site_out=site_out,
        extra={"model_name": "gemma3-270m", "l0": 7.5, "trained_with": "gemma_scope_pz"},
    )
    return AutoEncoder.from_arrays(
        **arrays,
        threshold=threshold if activation == "jumprelu" else None,
        activation=activation,
        k=k,
        w_skip=w_skip,
        meta=meta,
    )


def inputs() -> np.ndarray:
    return np.random.default_rng(7).normal(size=(6, D)).astype(np.float32)


def write_reference_folders(root: Path = FOLDERS) -> None:
    """Writes every SAELens folder, the Gemma Scope 2 folders and the inputs under ``root``."""
    for name in SPECS:
        topk_threshold = TOPK_THRESHOLD if name == "tc_topk_as_jumprelu" else None
        save_saelens(
            make_dictionary(name), root / name, overwrite=True, topk_threshold=topk_threshold
        )
    for folder, name in GS2.items():
        save_gemma_scope_2(make_dictionary(name), root / "gs2" / folder, overwrite=True)
    (root / "inputs.json").write_text(json.dumps({"x": inputs().tolist()}) + "\n")


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("saelens")
    write_reference_folders(root)
    return root


def test_exports_equal_the_committed_folders(rewritten):
    committed = sorted(p.relative_to(FOLDERS) for p in FOLDERS.rglob("*") if p.is_file())
    fresh = sorted(p.relative_to(rewritten) for p in rewritten.rglob("*") if p.is_file())
    assert fresh == committed
    for rel in committed:
        assert (rewritten / rel).read_bytes() == (FOLDERS / rel).read_bytes(), rel


def _ours(name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    ae = make_dictionary(name)
    if name == "tc_topk_as_jumprelu":  # what the export means: JumpReLU at the given threshold
        a = ae.to_arrays()
        pre = x @ a["w_enc"] + a["b_enc"]
        f = np.where(pre > TOPK_THRESHOLD, pre, 0.0)
        return {
            "encode": f,
            "decode": f @ a["w_dec"] + a["b_dec"],
            "forward": f @ a["w_dec"] + a["b_dec"],
        }
    f = np.asarray(ae.encode(x))
    return {"encode": f, "decode": np.asarray(ae.decode(f)), "forward": np.asarray(ae(x))}


@pytest.mark.parametrize("name", list(SPECS))
def test_outputs_match_saelens(reference, name):
    x = np.asarray(reference["inputs"], np.float32)
    np.testing.assert_array_equal(x, inputs())
    recorded = reference["saelens"][name]
    ours = _ours(name, x)
    for key in ("encode", "decode", "forward"):
        np.testing.assert_allclose(
            ours[key], np.asarray(recorded[key]), rtol=1e-5, atol=1e-5, err_msg=key
        )


@pytest.mark.parametrize("name", list(SPECS))
def test_saelens_resolves_our_hook_names(reference, name):
    recorded = reference["saelens"][name]
    _, _, _, _, site_in, site_out = SPECS[name]
    assert recorded["class"] == SAELENS_CLASSES[name]
    assert recorded["hook_name"] == saelens_hook_name(site_in)
    assert recorded["hf_hook_name"] == hook_from_site(site_in)
    assert recorded["model_name"] == "google/gemma-3-270m"
    assert recorded["l0"] == 7.5  # our metadata survives SAELens's config parsing
    if site_out != site_in:
        assert recorded["hook_name_out"] == saelens_hook_name(site_out)
    assert recorded["attached"], (
        f"HookedSAETransformer.add_sae did not attach at {recorded['hook_name']}"
    )
    # spliced into a small TransformerLens model with Gemma 3's hook layout, a forward pass runs
    # (None: a rectangular transcoder whose d_out is not that model's width)
    square = SPECS[name][2] == D
    assert recorded["runs_in_model"] is (True if square else None)
    assert recorded["reshape_activations"] == ("hook_z" if site_in.endswith("attn_out") else "none")


def test_skip_transcoder_matrix_is_stored_transposed(rewritten):
    from safetensors.numpy import load_file

    ae = make_dictionary("tc_relu_skip_rect")
    weights = load_file(rewritten / "tc_relu_skip_rect" / "sae_weights.safetensors")
    assert weights["W_skip"].shape == (D_OUT, D)
    np.testing.assert_array_equal(weights["W_skip"].T, ae.to_arrays()["w_skip"])


@pytest.mark.parametrize("folder,name", list(GS2.items()))
def test_gemma_scope_2_exports_load_in_saelens_gemma_3_loader(reference, folder, name):
    recorded = reference["gemma_scope_2"][folder]
    x = np.asarray(reference["inputs"], np.float32)
    ours = load_sae(FOLDERS / "gs2" / folder)
    np.testing.assert_allclose(np.asarray(ours.encode(x)), recorded["encode"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours(x)), recorded["forward"], rtol=1e-5, atol=1e-5)
    _, _, _, _, site_in, site_out = SPECS[name]
    assert recorded["hook_name"] == saelens_hook_name(site_in)
    assert recorded["model_name"] == "google/gemma-3-270m"


def test_topk_transcoder_refused_without_threshold(tmp_path):
    with pytest.raises(ValueError, match=r"SAELens has no TopK transcoder architecture \(k=4\)"):
        save_saelens(make_dictionary("tc_topk_as_jumprelu"), tmp_path / "tc")
    assert not (tmp_path / "tc").exists()


def test_negative_threshold_and_missing_model_refused(tmp_path):
    ae = make_dictionary("sae_jumprelu")
    a = ae.to_arrays()
    bad = AutoEncoder.from_arrays(
        a["w_enc"], a["b_enc"], a["w_dec"], a["b_dec"], a["threshold"] - 1.0, meta=ae.meta
    )
    with pytest.raises(ValueError, match=r"threshold has negative entries \(min -"):
        save_saelens(bad, tmp_path / "neg")
    no_model = AutoEncoder.from_arrays(
        a["w_enc"], a["b_enc"], a["w_dec"], a["b_dec"], a["threshold"]
    )
    with pytest.raises(ValueError, match="need a model_name"):
        save_saelens(no_model, tmp_path / "nm")
    assert list(tmp_path.iterdir()) == []
