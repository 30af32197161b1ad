"""Loading straight into shards (``gs.load_model(source, mesh=mesh)``) on 8 simulated devices.

Tiny checkpoints (Hugging Face bf16 in two safetensors files, orbax, GGUF) written by the test are
loaded for meshes 1x8 and 2x4 (``tests/parallel_load_worker.py``, one subprocess): the logits and
per-device bytes equal the load-then-shard path, the safetensors reader is only ever asked for one
device's block (1/model of a sharded tensor), and orbax restores each tensor already split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gemma_scope_pz.models.checkpoints.layout import canonical_kind, out_in_to_canonical
from gemma_scope_pz.models.checkpoints.slices import STORED_GROUPS, stored_block
from gemma_scope_pz.models.config import Gemma3Config, param_shapes
from tests.simulated_devices import run_result

WORKER = Path(__file__).with_name("parallel_load_worker.py")
MESHES = ("1x8", "2x4")


@pytest.fixture(scope="module")
def result() -> dict:
    return run_result([str(WORKER)])


@pytest.mark.slow  # one subprocess (~90 s of CPU) shared by the module
@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_load_equals_load_then_shard(result, mesh):
    assert result["n_devices"] == 8
    for fmt, row in result["compare"][mesh].items():
        # The same arrays on the same devices: identical logits and bytes per device.
        assert row["logits"] == 0.0, (mesh, fmt, row)
        assert row["held"] == row["held_reference"], (mesh, fmt, row)
        assert len(set(row["held"])) == 1, (mesh, fmt, row)


@pytest.mark.slow  # one subprocess (~90 s of CPU) shared by the module
@pytest.mark.parametrize("mesh", MESHES)
def test_reader_reads_one_device_block_at_a_time(result, mesh):
    model = int(mesh.split("x")[1])
    blocks = result["hf_blocks"][mesh]
    ratios = blocks["ratios"]
    assert set(ratios) == set(param_shapes(_config()))
    config = _config()
    for key, ratio in ratios.items():
        kind = canonical_kind(key)
        # Every sharded tensor (heads, neurons, vocabulary) comes in 1/model blocks: the largest
        # float32 array the loader ever makes is one device's block, never the whole tensor.
        sharded = kind != "norm"
        assert ratio == pytest.approx(1 / model if sharded else 1.0), (key, ratio)
    assert config.n_kv_heads % model == 0
    # Replicas over "data" read their block again; nothing else is read.
    data = 8 // model
    assert blocks["bytes_read"] <= data * blocks["stored_bytes"] + 8 * _norm_bytes(config)


@pytest.mark.slow  # one subprocess (~90 s of CPU) shared by the module
@pytest.mark.parametrize("mesh", MESHES)
def test_orbax_restores_each_tensor_already_split(result, mesh):
    model = int(mesh.split("x")[1])
    shards = result["orbax_shards"][mesh]
    for name, ratio in shards.items():
        if "norm" in name:
            assert ratio == 1.0, name
        else:
            assert ratio == pytest.approx(1 / model), (name, ratio)
    assert any("kv_einsum" in n for n in shards) and any("gating_einsum" in n for n in shards)


@pytest.mark.slow
def test_mesh_that_does_not_divide_fails_before_reading(result):
    err = result["errors"]
    assert "'head_groups'" in err["message"] and "(size 2)" in err["message"]
    assert "'model' of size 8" in err["message"] and err["message"].endswith("fit: 4x2, 8x1")
    assert err["bytes_read"] == 0


@pytest.mark.parametrize("kind", sorted(STORED_GROUPS))
def test_stored_block_equals_the_block_of_the_whole_conversion(kind):
    config = Gemma3Config.tiny(n_heads=4, n_kv_heads=2, head_dim=6, d_model=10, d_ff=12)
    key = {
        "embedding": "embedding",
        "norm": "blocks.0.pre_ffw_norm",
        "query": "blocks.0.attn.query",
        "kv": "blocks.0.attn.key",
        "output": "blocks.0.attn.output",
        "ffw_in": "blocks.0.mlp.gate",
        "ffw_out": "blocks.0.mlp.down",
    }[kind]
    from gemma_scope_pz.models.checkpoints.layout import out_in_stored_shape

    stored = np.random.default_rng(0).standard_normal(out_in_stored_shape(key, config))
    whole = out_in_to_canonical(kind, stored, config)
    shape = param_shapes(config)[key]
    read_sizes = []

    def read(slices):
        block = stored[slices]
        read_sizes.append(block.size)
        return block

    for axis, n in enumerate(shape):
        for start, stop in ((0, n // 2), (n // 2, n), (1, n - 1)):
            index = [slice(None)] * len(shape)
            index[axis] = slice(start, stop)
            got = stored_block(read, kind, shape, tuple(index))
            np.testing.assert_array_equal(got, whole[tuple(index)])
            # An outer axis is read exactly; an inner one at most whole.
            assert read_sizes[-1] <= stored.size
            if axis in [g[0] for g in STORED_GROUPS[kind]]:
                assert read_sizes[-1] == got.size


def _config() -> Gemma3Config:
    return Gemma3Config.tiny(n_heads=16, n_kv_heads=8, head_dim=8, d_ff=64, n_layers=2)


def _norm_bytes(config: Gemma3Config) -> int:
    return sum(
        int(np.prod(s)) * 2 for k, s in param_shapes(config).items() if canonical_kind(k) == "norm"
    )
