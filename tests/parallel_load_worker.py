"""Loads tiny checkpoints straight into shards on 8 simulated CPU devices; prints one JSON line.

Started by ``tests/test_parallel_load.py`` in a subprocess (``XLA_FLAGS`` must be set before jax
is imported). Every number is measured: differences from the load-then-shard path, bytes per
device, and the blocks the safetensors reader was asked for.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import gemma_scope_pz.models.checkpoints.orbax as orbax_reader  # noqa: E402
from gemma_scope_pz.models.checkpoints.slices import HFSliceReader  # noqa: E402
from gemma_scope_pz.models.config import Gemma3Config  # noqa: E402
from gemma_scope_pz.models.gemma3 import forward  # noqa: E402
from gemma_scope_pz.models.loading import load_model  # noqa: E402
from gemma_scope_pz.models.sources import resolve_source  # noqa: E402
from gemma_scope_pz.parallel import make_mesh, shard  # noqa: E402
from gemma_scope_pz.parallel.load import load_sharded  # noqa: E402
from gemma_scope_pz.parallel.shard import device_bytes  # noqa: E402
from tests.fixtures_checkpoints import (  # noqa: E402
    hf_config,
    hf_tensors,
    random_params,
    write_checkpoint,
    write_hf_dir,
)

CONFIG = Gemma3Config.tiny(n_heads=16, n_kv_heads=8, head_dim=8, d_ff=64, n_layers=2)
MESHES = ((1, 8), (2, 4))


class CountingReader(HFSliceReader):
    """Records the size of every block handed out, per canonical key."""

    def __init__(self, directory):
        super().__init__(directory)
        self.blocks: dict[str, list[int]] = {}

    def read(self, key, index, dtype):
        block = super().read(key, index, dtype)
        self.blocks.setdefault(key, []).append(block.nbytes)
        return block


def diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def compare(path, mesh, tokens, dtype=np.float32) -> dict:
    """Sharded load vs load-then-shard: logits and per-device bytes."""
    reference = shard(load_model(str(path), dtype=dtype), mesh)
    loaded = load_model(str(path), dtype=dtype, mesh=mesh)
    return {
        "logits": diff(forward(loaded, tokens), forward(reference, tokens)),
        "held": sorted(device_bytes(loaded).values()),
        "held_reference": sorted(device_bytes(reference).values()),
    }


def hf_blocks(path, mesh) -> dict:
    """Per canonical key: the largest block read (float32) against the whole tensor's bytes."""
    reader = CountingReader(path)
    load_sharded(resolve_source(str(path), want="weights"), mesh, reader=reader)
    whole = {k: int(np.prod(s)) * 4 for k, s in reader.shapes.items()}
    stored = sum(int(np.prod(s)) * 2 for s in reader.shapes.values())  # bf16 file
    return {
        "ratios": {k: max(v) / whole[k] for k, v in reader.blocks.items()},
        "bytes_read": reader.bytes_read,
        "stored_bytes": stored,
    }


def orbax_shards(path, mesh) -> dict:
    """Shard shape / full shape of every stored tensor orbax restored (the largest ratio)."""
    seen = {}
    original = orbax_reader.restore_sharded

    def recording(directory, tree, shardings):
        out = original(directory, tree, shardings)
        for name, array in out.items():
            full = int(np.prod(array.shape))
            seen[name] = max(int(np.prod(s.data.shape)) for s in array.addressable_shards) / full
        return out

    orbax_reader.restore_sharded = recording
    try:
        load_model(str(path), mesh=mesh)
    finally:
        orbax_reader.restore_sharded = original
    return seen


def errors(root) -> dict:
    """A mesh that does not divide the heads: the error, and no tensor bytes read before it."""
    config = Gemma3Config.tiny()  # 2 key/value heads
    path = write_hf_dir(
        root / "small", hf_config(config), hf_tensors(config, random_params(config))
    )
    reader = HFSliceReader(path)
    try:
        load_sharded(resolve_source(str(path), want="weights"), make_mesh(1, 8), reader=reader)
        return {"message": "", "bytes_read": reader.bytes_read}
    except ValueError as err:
        return {"message": str(err), "bytes_read": reader.bytes_read}


def main() -> None:
    root = pathlib.Path(tempfile.mkdtemp())
    params = random_params(CONFIG, seed=3)
    hf = write_hf_dir(
        root / "hf",
        hf_config(CONFIG),
        hf_tensors(CONFIG, params),
        shards=2,
        dtype=ml_dtypes.bfloat16,
    )
    orbax, _, _ = write_checkpoint("orbax", root / "orbax", CONFIG, params=params)
    gguf, _, _ = write_checkpoint("gguf", root / "gguf", CONFIG, params=params)
    tokens = np.random.default_rng(0).integers(3, 64, size=(8, 16)).astype(np.int32)
    out = {"compare": {}, "hf_blocks": {}, "orbax_shards": {}}
    for shape in MESHES:
        mesh, key = make_mesh(*shape), f"{shape[0]}x{shape[1]}"
        out["compare"][key] = {
            "hf": compare(hf, mesh, tokens),
            "hf_bf16": compare(hf, mesh, tokens, dtype=ml_dtypes.bfloat16),
            "orbax": compare(orbax, mesh, tokens),
            "gguf": compare(gguf, mesh, tokens),
        }
        out["hf_blocks"][key] = hf_blocks(hf, mesh)
        out["orbax_shards"][key] = orbax_shards(orbax, mesh)
    out["errors"] = errors(root)
    out["n_devices"] = len(jax.devices())
    print("RESULT" + json.dumps(out))


if __name__ == "__main__":
    main()
