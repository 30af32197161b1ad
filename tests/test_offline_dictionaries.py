"""The offline dictionaries shipped as package data: checksums, size, loading time and quality.

The quality floors are the ones the project promises (issue 10): the resid_post SAE at block 9 has
held-out FVU <= 0.12 with L0 <= 64 and delta loss <= 0.3; the transcoder FVU <= 0.2; no latent fires
on more than half the tokens. The slow test re-measures them on the real 270M.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (lets numpy, hence safetensors.numpy, read bfloat16)
import numpy as np
import pytest
from penzai import pz
from safetensors.numpy import load_file

import gemma_scope_pz as gs
from gemma_scope_pz.scope.formats import offline
from gemma_scope_pz.scope.formats.files import CheckpointError
from gemma_scope_pz.scope.formats.gemma_scope_2 import load_offline

SAE, TRANSCODER = "resid_post/layer_9", "transcoder/layer_6"
FLOORS = {
    SAE: {"fvu": 0.12, "l0": 64.0, "delta_loss": 0.3, "max_firing_fraction": 0.5},
    TRANSCODER: {"fvu": 0.2, "max_firing_fraction": 0.5},
}


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((offline.data_dir() / offline.MANIFEST_FILE).read_text())


def test_names_are_the_promised_ones(manifest):
    assert offline.available() == sorted([SAE, TRANSCODER])
    assert manifest["dictionaries"][SAE]["site_in"] == "blocks.9.resid_post"
    assert manifest["dictionaries"][TRANSCODER]["site_in"] == "blocks.6.mlp_in"
    assert manifest["dictionaries"][TRANSCODER]["site_out"] == "blocks.6.mlp_out"


def test_checksums_match_manifest(manifest):
    root = offline.data_dir()
    for name, entry in manifest["dictionaries"].items():
        folder = root / entry["folder"]
        on_disk = sorted(p.name for p in folder.iterdir() if p.is_file())
        assert on_disk == sorted(entry["files"]) == ["config.json", "params.safetensors"]
        for file, digest in entry["files"].items():
            assert hashlib.sha256((folder / file).read_bytes()).hexdigest() == digest, file
        assert offline.verify(name) == folder


def test_package_data_is_small_and_bfloat16(manifest):
    root = offline.data_dir()
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 25 * 2**20, total
    for entry in manifest["dictionaries"].values():
        tensors = load_file(str(root / entry["folder"] / "params.safetensors"))
        # weights bfloat16; the [d_sae] JumpReLU thresholds stay float32 (the writer keeps them exact)
        dtypes = {key: str(t.dtype) for key, t in tensors.items()}
        assert dtypes.pop("threshold") == "float32"
        assert set(dtypes.values()) == {"bfloat16"}, dtypes
        assert tensors["w_enc"].shape == (640, entry["d_sae"])
        assert tensors["w_dec"].shape == (entry["d_sae"], 640)
        assert ("affine_skip_connection" in tensors) == (entry["site_in"] != entry["site_out"])


def test_loaded_weights_are_the_files(manifest):
    for name, entry in manifest["dictionaries"].items():
        sae = gs.load_sae("offline", name)
        assert (sae.meta.site_in, sae.meta.site_out) == (entry["site_in"], entry["site_out"])
        assert sae.meta.source == f"offline:{name}"
        assert sae.meta.extra["offline_quality"] == entry["quality"]
        files = load_file(str(offline.data_dir() / entry["folder"] / "params.safetensors"))
        arrays = sae.to_arrays()
        for key in ("w_enc", "b_enc", "w_dec", "b_dec", "threshold"):
            np.testing.assert_array_equal(
                np.asarray(arrays[key], np.float32), files[key].astype(np.float32), err_msg=key
            )


def test_loads_in_a_fresh_process_within_30_seconds():
    code = (
        "import time; t = time.perf_counter(); import gemma_scope_pz as gs; "
        "sae = gs.load_sae('offline', 'resid_post/layer_9'); "
        "tc = gs.load_sae('offline', 'transcoder/layer_6'); "
        "print(sae.meta.site_in, tc.meta.site_out, time.perf_counter() - t)"
    )
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    wall = time.perf_counter() - start
    assert out.stdout.split()[:2] == ["blocks.9.resid_post", "blocks.6.mlp_out"]
    assert wall < 30.0, f"loading took {wall:.1f} s"


def test_unknown_name_lists_the_available_ones_and_how_to_train():
    with pytest.raises(FileNotFoundError) as info:
        gs.load_sae("offline", "resid_post/layer_3")
    text = str(info.value)
    assert "'resid_post/layer_3'" in text
    assert "resid_post/layer_9, transcoder/layer_6" in text
    assert "make_offline_dictionaries.py --site blocks.3.resid_post" in text
    assert " min on 2 CPU cores" in text


def test_corrupted_file_is_named(tmp_path):
    root = tmp_path / "offline_dictionaries"
    shutil.copytree(offline.data_dir(), root)
    params = root / SAE / "params.safetensors"
    data = bytearray(params.read_bytes())
    data[-1] ^= 0xFF
    params.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"layer_9/params\.safetensors: sha256"):
        load_offline(SAE, root=root)
    load_offline(TRANSCODER, root=root)  # the untouched one still loads


def test_missing_manifest_says_how_to_rebuild(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_offline_dictionaries.py"):
        offline.available(root=tmp_path)


# The shipped dictionaries meet every floor (the SAE's delta loss +0.281 on held-out text, +0.240 on
# training text at the calibrated threshold x0.85). MISSES lists floor checks a shipped dictionary is
# known to miss, as expected failures: strict for the manifest's fixed numbers (a retrain that passes
# fails the suite until the entry is removed), not strict for the re-measured figures, which may land
# within float summation noise of a floor.
MISSES: set[tuple[str, str]] = set()


def _floor_cases(strict: bool) -> list:
    return [
        pytest.param(
            name,
            key,
            marks=[pytest.mark.xfail(strict=strict, reason="shipped dictionary misses it")]
            if (name, key) in MISSES
            else [],
            id=f"{name}:{key}",
        )
        for name, floors in FLOORS.items()
        for key in floors
    ]


FLOOR_CASES = _floor_cases(strict=True)
MEASURED_FLOOR_CASES = _floor_cases(strict=False)


@pytest.mark.parametrize("name, key", FLOOR_CASES)
def test_manifest_figures_meet_the_floors(manifest, name, key):
    quality = manifest["dictionaries"][name]["quality"]
    assert quality["held_out_tokens"] >= 3000
    assert quality[key] <= FLOORS[name][key], (name, key, quality[key])


def test_manifest_training_figures_are_the_committed_configs(manifest):
    root = pathlib.Path(__file__).resolve().parents[1]
    for entry in manifest["dictionaries"].values():
        config = gs.TrainConfig.from_yaml(root / entry["config"])
        assert (config.sae.site_in, config.sae.site_out) == (entry["site_in"], entry["site_out"])
        assert config.sae.d_sae == entry["d_sae"]
        assert entry["training"]["steps"] == config.num_steps
        assert entry["training"]["batch_size"] == config.run.batch_size
        assert entry["training"]["tokens"] > 0 and entry["training"]["train_wall_s"] > 0


def _batch_sums(clean, spliced, saes, tokens, positions, sites):
    """One batch, one jit: the clean forward (logits and every site) and one spliced forward per
    dictionary; the sums for FVU, L0, firing and delta loss over the counted tokens/predictions."""
    from gemma_scope_pz.scope import metrics
    from gemma_scope_pz.scope.interventions import run_with_captures
    from gemma_scope_pz.scope.tokens import token_mask

    def nll_sum(logits):
        return jnp.sum(pred * metrics.next_token_nll(logits, tokens))

    logits, acts = run_with_captures(clean, tokens, positions, sites, stop_early=False)
    counted = token_mask(tokens, pad_id=0)
    pred = metrics.prediction_mask(counted, tokens != 0).astype(jnp.float32)
    w = counted.astype(jnp.float32)[..., None]
    out = {"n_pred": jnp.sum(pred), "nll_clean": nll_sum(logits), "dicts": []}
    for sae, body in zip(saes, spliced, strict=True):
        x = pz.nx.wrap(acts[sae.meta.site_in]).tag("batch", "seq", "embedding")
        target = acts[sae.meta.site_out]
        f = sae.encode(x).unwrap("batch", "seq", "latents")
        x_hat = sae(x).unwrap("batch", "seq", "embedding")
        named = pz.nx.wrap(tokens).tag("batch", "seq")
        spliced_logits = body(named, token_positions=pz.nx.wrap(positions).tag("batch", "seq"))
        out["dicts"].append(
            {
                "n": jnp.sum(w),
                "sq_err": jnp.sum(w * (target - x_hat) ** 2),
                "sum_x": jnp.sum(w * target, axis=(0, 1)),
                "sum_sq": jnp.sum(w * target**2),
                "fired": jnp.sum(w * (f > 0), axis=(0, 1)),
                "nll_spliced": nll_sum(spliced_logits.unwrap("batch", "seq", "vocabulary")),
            }
        )
    return out


def _measure(model, saes: dict, tokens: np.ndarray) -> dict:
    """Held-out figures of every dictionary, computed here independently of the script that wrote
    the manifest (and of ``evaluate_sae``): the contexts in equal batches of at most 17 rows, one
    compile, one clean forward per batch shared by the dictionaries, no zero-ablated run."""
    from gemma_scope_pz.models import stateful
    from gemma_scope_pz.models.gemma3 import positions_for
    from gemma_scope_pz.scope import metrics
    from gemma_scope_pz.scope.interventions import splice

    names = list(saes)
    frozen = tuple(pz.freeze_params(saes[n]) for n in names)
    spliced = tuple(
        stateful.detach_state(pz.freeze_params(splice(model, saes[n])).body) for n in names
    )
    sites = tuple(
        dict.fromkeys(s for n in names for s in (saes[n].meta.site_in, saes[n].meta.site_out))
    )
    step = stateful.jit(_batch_sums, static_argnames=("sites",))
    n_batches = -(-len(tokens) // 17)
    size = -(-len(tokens) // n_batches)
    padded = np.zeros((n_batches * size, tokens.shape[1]), np.int32)
    padded[: len(tokens)] = tokens  # all-pad rows count nowhere
    totals = None
    for start in range(0, len(padded), size):
        batch = jnp.asarray(padded[start : start + size])
        positions = positions_for(batch, 0)
        sums = step(pz.freeze_params(model), spliced, frozen, batch, positions, sites=sites)
        sums = jax.tree.map(lambda v: np.asarray(v, np.float64), sums)
        totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
    figures = {}
    for i, name in enumerate(names):
        t = totals["dicts"][i]
        figures[name] = {
            "fvu": metrics.fvu_from_sums(t["sq_err"], t["sum_x"], t["sum_sq"], t["n"]),
            "l0": float(t["fired"].sum() / t["n"]),
            "delta_loss": float((t["nll_spliced"] - totals["nll_clean"]) / totals["n_pred"]),
            "max_firing_fraction": float(t["fired"].max() / t["n"]),
        }
    return figures


@pytest.fixture(scope="module")
def measured(real_model, real_tokenizer, manifest) -> tuple[dict, bool]:
    """Figures re-measured on the manifest's held-out contexts, and whether the tokens are the same."""
    held = manifest["held_out"]
    tokens = np.asarray(
        gs.corpus_contexts(real_tokenizer, held["corpus"], held["contexts"], from_end=True)
    )
    digest = hashlib.sha256(tokens.astype(np.int32).tobytes()).hexdigest()
    saes = {name: gs.load_sae("offline", name) for name in FLOORS}
    return _measure(real_model, saes, tokens), digest == held["tokens_sha256"]


@pytest.mark.slow
def test_manifest_figures_agree_with_a_new_measurement(measured, manifest):
    figures, same_text = measured
    # Same tokens: the manifest's figures are reproduced up to float summation order. Other text
    # (another Python version changes the offline corpus): only a loose agreement.
    tol = {"fvu": 0.005, "l0": 0.5, "delta_loss": 0.02, "max_firing_fraction": 0.01}
    if not same_text:
        tol = {"fvu": 0.03, "l0": 6.0, "delta_loss": 0.15, "max_firing_fraction": 0.1}
    for name, values in figures.items():
        recorded = manifest["dictionaries"][name]["quality"]
        for key, value in values.items():
            assert abs(value - recorded[key]) <= tol[key], (name, key, value, recorded[key])


@pytest.mark.slow
@pytest.mark.parametrize("name, key", MEASURED_FLOOR_CASES)
def test_measured_quality_meets_the_floors(measured, name, key):
    figures, _ = measured
    assert figures[name][key] <= FLOORS[name][key], (name, key, figures[name][key])


def test_sae_threshold_scale_follows_the_calibration_rule(manifest):
    """The SAE's threshold scale is the one the script's rule picks from the training-text figures
    recorded next to it: the lowest delta loss among scales with L0 <= 60, the search stopping at
    the first scale over it; and the shipped folder says which scale it carries."""
    entry = manifest["dictionaries"][SAE]
    calibration = entry["calibration"]
    rows = calibration["training_text"]
    assert [r["scale"] for r in rows] == sorted((r["scale"] for r in rows), reverse=True)
    assert all(r["l0"] <= 60.0 for r in rows[:-1])
    allowed = [r for r in rows if r["l0"] <= 60.0]
    best = min(allowed, key=lambda r: (r["delta_loss"], -r["scale"]))
    assert calibration["scale"] == best["scale"]
    config = json.loads((offline.data_dir() / SAE / "config.json").read_text())
    assert config["threshold_scale"] == calibration["scale"]
    assert f"threshold x{best['scale']}" in entry["architecture"]
