"""Ahead-of-time memory check on a small config (8 simulated CPU devices, in a subprocess).

What ``benchmarks/aot_memory.py`` does for the released sizes: compile the forward and a KV-cached
decode step for a mesh from abstract bf16 parameters and read XLA's per-device memory.
"""

from __future__ import annotations

import textwrap

from tests.simulated_devices import run_result

SCRIPT = textwrap.dedent(
    """
    import json, math, os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    from penzai import pz
    from gemma_scope_pz.models.config import Gemma3Config, param_shapes
    from gemma_scope_pz.parallel import make_mesh, shard_abstract
    from gemma_scope_pz.parallel.aot import (
        abstract_model, chip_estimate, compile_decode, compile_forward, memory_per_device)

    def shard_bytes(tree):
        # Bytes one device holds of each abstract argument, from its sharding's shard shape.
        total = 0
        for leaf in jax.tree_util.tree_leaves(tree):
            shape = leaf.sharding.shard_shape(leaf.shape)
            total += math.prod(shape) * leaf.dtype.itemsize
        return total

    config = Gemma3Config.tiny(vocab_size=4096, d_model=256, n_heads=16, n_kv_heads=8,
                               head_dim=32, d_ff=1024, n_layers=2)
    model = abstract_model(config)
    out = {"leaf_dtypes": sorted({str(l.dtype) for l in jax.tree_util.tree_leaves(model)}),
           "n_params": sum(math.prod(s) for s in param_shapes(config).values()),
           # by label: the tied embedding table appears twice (lookup and decode)
           "abstract_params": sum(math.prod(v.value.data_array.shape) for v in {
               v.label: v for v in pz.select(model).at_instances_of(pz.ParameterValue)
               .get_sequence()}.values())}
    for shape in ((1, 8), (8, 1)):
        mesh = make_mesh(*shape)
        fwd = compile_forward(model, mesh, 8, 32)
        dec = compile_decode(model, mesh, 8, 64)
        key = f"{shape[0]}x{shape[1]}"
        out[key] = {
            "forward": memory_per_device(fwd).__dict__,
            "decode": memory_per_device(dec).__dict__,
            "param_bytes": shard_bytes(shard_abstract(model, mesh)),
            "token_bytes": 8 * 32 * 4 // shape[0],
        }
    est = chip_estimate(config, make_mesh(1, 8), "forward", 8, 32)
    out["estimate_1x8"] = est.__dict__
    big = abstract_model(Gemma3Config.preset("27b"))
    out["27b_param_bytes_1x8"] = shard_bytes(shard_abstract(big, make_mesh(1, 8)))
    print("RESULT" + json.dumps(out))
    """
)


def test_aot_memory_of_a_small_config_and_27b_parameter_shards():
    out = run_result(["-c", SCRIPT])
    # The abstract model is bf16 parameters (float32 only for a few scalar constants).
    assert "bfloat16" in out["leaf_dtypes"]
    assert out["abstract_params"] == out["n_params"]
    full = out["n_params"] * 2
    for key in ("1x8", "8x1"):
        row = out[key]
        # XLA's argument bytes are the device's parameter shards (plus its tokens, a few
        # scalars): the compiled program takes the sharded weights, not a replicated copy.
        args = row["forward"]["arguments"]
        assert 0 <= args - row["param_bytes"] - row["token_bytes"] < 256, (key, row)
        assert row["forward"]["peak"] >= args
        assert row["decode"]["arguments"] > row["param_bytes"]  # plus its KV cache
    # Replicated: every weight, the tied table twice (lookup and decode are two arguments),
    # a few scalars. Tensor parallelism over 8: about 1/8 of that per device (norms replicated).
    replicated = out["8x1"]["param_bytes"]
    assert 0 <= replicated - full - 4096 * 256 * 2 < 256
    assert out["1x8"]["param_bytes"] < replicated / 8 * 1.05
    assert out["1x8"]["forward"]["peak"] < out["8x1"]["forward"]["peak"] / 3
    # The accelerator estimate: the same bf16 arguments, without XLA CPU's float32 weight copies.
    est, cpu = out["estimate_1x8"], out["1x8"]["forward"]
    assert est["arguments"] == out["1x8"]["param_bytes"] + out["1x8"]["token_bytes"]
    assert est["arguments"] < est["peak"] < cpu["peak"]
    # Gemma 3 27B in bf16 (54 GB): each of 8 devices holds 6.75 GB of parameters, plus 0.35 GB
    # for the tied table's second argument (the same buffer at run time).
    assert 6.9e9 < out["27b_param_bytes_1x8"] < 7.2e9
