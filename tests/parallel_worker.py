"""Runs the model operations on 8 simulated CPU devices, sharded and not; prints one JSON line.

Started by ``tests/test_parallel.py`` in a subprocess: ``XLA_FLAGS`` must be set before jax is
imported, which the test process has already done. Every number printed is a difference between a
sharded run and the unsharded one (or a measured per-device size), so the test asserts on them.
"""

from __future__ import annotations

import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gemma_scope_pz.models.config import Gemma3Config  # noqa: E402
from gemma_scope_pz.models.gemma3 import Gemma3LM, forward  # noqa: E402
from gemma_scope_pz.models.sampling import generate  # noqa: E402
from gemma_scope_pz.parallel import make_mesh, shard, shard_batch  # noqa: E402
from gemma_scope_pz.parallel.shard import device_bytes  # noqa: E402
from gemma_scope_pz.scope.evaluate import evaluate_sae  # noqa: E402
from gemma_scope_pz.scope.interventions import capture, splice, steer  # noqa: E402
from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta  # noqa: E402

SITE = "blocks.1.resid_post"
MESHES = ((1, 8), (2, 4), (8, 1))


def tiny_model() -> Gemma3LM:
    """Every sharded dimension divisible by 8: 8 key/value heads, 64 neurons, 64 tokens."""
    config = Gemma3Config.tiny(n_heads=16, n_kv_heads=8, head_dim=8, d_ff=64, n_layers=2)
    return Gemma3LM.random(config, seed=1)


def sae(d_in: int = 32, d_sae: int = 64) -> AutoEncoder:
    rng = np.random.default_rng(2)
    return AutoEncoder.from_arrays(
        w_enc=rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in),
        b_enc=0.1 * rng.standard_normal(d_sae),
        w_dec=rng.standard_normal((d_sae, d_in)) / np.sqrt(d_sae),
        b_dec=0.1 * rng.standard_normal(d_in),
        threshold=np.abs(0.2 * rng.standard_normal(d_sae)),
        activation="jumprelu",
        meta=SaeMeta(d_in, d_sae, d_in, site_in=SITE, site_out=SITE),
    )


def diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def operations(model, dictionary, tokens) -> dict:
    """The outputs compared: logits, a capture, splices, steering, generation, evaluation."""
    direction = np.linspace(-1.0, 1.0, 32)
    prompts = [[2, 5, 9, 11], [2, 7, 3, 4, 8, 20, 21]]
    ev = evaluate_sae(model, dictionary, tokens, progress=False)
    return {
        "logits": forward(model, tokens),
        "capture": capture(model, tokens, [SITE, "blocks.0.mlp_out"])[SITE],
        "splice_error": forward(splice(model, dictionary, include_error=True), tokens),
        "splice": forward(splice(model, dictionary), tokens),
        "steer": forward(steer(model, SITE, direction, 3.0), tokens),
        "generate": np.asarray(generate(model, prompts, 6, stop_token=None)),
        "evaluate": np.asarray([ev.fvu, ev.ce_clean, ev.ce_spliced, ev.kl]),
    }


def sizes(model, mesh) -> dict:
    """Per-device parameter bytes, and the bytes expected if sharded axes split ``model`` ways."""
    from penzai import pz

    from gemma_scope_pz.parallel.rules import DEFAULT_RULES

    _, params = pz.unbind_params(model)
    split = whole = 0
    for p in params:
        nbytes = p.value.data_array.nbytes
        if "model" in DEFAULT_RULES.axis_map(p.value.named_shape).values():
            split += nbytes
        else:
            whole += nbytes
    held = device_bytes(model)
    return {
        "held": sorted(held.values()),
        "n_devices": len(held),
        "expected": whole + split // mesh.shape["model"],
        "total": whole + split,
    }


def errors(model, dictionary) -> dict:
    out = {}
    a, b = make_mesh(1, 8), make_mesh(2, 4)
    for name, fn in {
        "reshard": lambda: shard(shard(model, a), b),
        "two_meshes": lambda: forward(splice(shard(model, a), shard(dictionary, b)), [[2, 3, 4]]),
        "not_dividing": lambda: shard(Gemma3LM.random(Gemma3Config.tiny()), a),
        "bad_mesh": lambda: make_mesh(3, 4),
        "batch": lambda: shard_batch(np.zeros((3, 4), np.int32), b),
    }.items():
        try:
            fn()
            out[name] = ""
        except ValueError as e:
            out[name] = str(e)
    return out


def main() -> None:
    assert len(jax.devices()) == 8
    model, dictionary = tiny_model(), sae()
    tokens = np.random.default_rng(0).integers(3, 64, size=(8, 16)).astype(np.int32)
    reference = operations(model, dictionary, tokens)
    result = {
        "diffs": {},
        "sizes": {},
        "specs": {},
        "scale": {k: diff(v, 0) for k, v in reference.items()},
    }
    for shape in MESHES:
        mesh = make_mesh(*shape)
        sharded_model, sharded_sae = shard(model, mesh), shard(dictionary, mesh)
        got = operations(sharded_model, sharded_sae, tokens)
        key = f"{shape[0]}x{shape[1]}"
        result["diffs"][key] = {k: diff(got[k], reference[k]) for k in reference}
        result["sizes"][key] = sizes(sharded_model, mesh)
        result["specs"][key] = str(forward(sharded_model, tokens).sharding.spec)
    result["errors"] = errors(model, dictionary)
    print("RESULT" + json.dumps(result))


if __name__ == "__main__":
    main()
