"""One of two processes on localhost joined by ``jax.distributed`` (CPU collectives, 4 devices each).

Usage: ``python parallel_multiprocess_worker.py PROCESS_ID PORT`` (started twice by
``tests/test_parallel_multiprocess.py``). Over the 8 global devices (mesh 8x1 for the tiny
Gemma 3, 4x2 for the SAE), each process feeds only its half of the batch
(``jax.make_array_from_process_local_data``); it then compares its rows of the global result with
the same computation run on one of its own devices, and prints one ``RESULT{json}`` line.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from penzai import pz  # noqa: E402

from gemma_scope_pz.models.config import Gemma3Config  # noqa: E402
from gemma_scope_pz.models.gemma3 import Gemma3LM  # noqa: E402
from gemma_scope_pz.parallel import make_mesh, shard  # noqa: E402
from gemma_scope_pz.parallel.aot import _forward  # noqa: E402
from gemma_scope_pz.train import sharding as train_sharding  # noqa: E402
from gemma_scope_pz.train import step as step_lib  # noqa: E402
from gemma_scope_pz.train.config import TrainConfig  # noqa: E402
from gemma_scope_pz.train.sources import as_source  # noqa: E402
from gemma_scope_pz.train.trainer import initial_state  # noqa: E402

N_PROCESSES, BATCH = 2, 8


def local_rows(array: np.ndarray) -> np.ndarray:
    """This process's contiguous share of the global batch."""
    n = array.shape[0] // N_PROCESSES
    return array[jax.process_index() * n : (jax.process_index() + 1) * n]


def gathered_rows(out: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
    starts, pieces = [], []
    for s in shards:
        if (s.index[0].start or 0) not in starts:
            starts.append(s.index[0].start or 0)
            pieces.append(np.asarray(s.data))
    return np.concatenate(pieces)


def forward_check(mesh) -> float:
    """Data-parallel forward of a tiny Gemma 3: max |global rows - one-device rows|."""
    config = Gemma3Config.tiny(n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, n_layers=2)
    model = Gemma3LM.random(config, seed=1)
    tokens = np.random.default_rng(0).integers(3, 64, size=(BATCH, 12)).astype(np.int32)
    batch = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("data")), local_rows(tokens), (BATCH, 12)
    )
    out = jax.jit(_forward)(pz.freeze_params(shard(model, mesh)), batch)
    device = jax.local_devices()[0]
    frozen = jax.device_put(pz.freeze_params(model), device)
    alone = jax.jit(_forward)(frozen, jax.device_put(tokens, device))
    return float(np.abs(gathered_rows(out) - local_rows(np.asarray(alone))).max())


def sae_step_check(mesh) -> dict:
    """One SAE training step, batch over "data", latents over "model": max |diff| per parameter."""
    config = TrainConfig.from_dict(
        {
            "sae": {"d_in": 16, "d_sae": 32, "architecture": "jumprelu"},
            "optim": {"warmup_steps": 0},
            "run": {"batch_size": 32, "total_steps": 1, "progress_bar": False},
        }
    )
    x = np.random.default_rng(5).standard_normal((32, 16)).astype(np.float32)
    state, _ = initial_state(config, as_source(x, batch_size=32, seed=0, replay=1))
    step_fn = step_lib.make_train_step(config)
    device = jax.local_devices()[0]
    alone, _ = jax.jit(step_fn)(jax.device_put(state, device), jax.device_put(x, device), None)
    state_sh = train_sharding.state_shardings(state, mesh, config.sae.d_sae)
    batch_sh = train_sharding.batch_sharding(mesh)
    placed = jax.tree.map(
        lambda a, sh: jax.make_array_from_callback(np.shape(a), sh, lambda i: np.asarray(a)[i]),
        state,
        state_sh,
    )
    x_global = jax.make_array_from_process_local_data(batch_sh, local_rows(x), x.shape)
    jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh, None))
    out, _ = jitted(placed, x_global, None)
    diffs = {}
    for name, value in alone["params"].items():
        full = np.asarray(value)
        diffs[name] = max(
            float(np.abs(np.asarray(piece.data) - full[piece.index]).max())
            for piece in out["params"][name].addressable_shards
        )
    diffs["moved"] = float(
        np.abs(np.asarray(alone["params"]["w_enc"]) - state["params"]["w_enc"]).max()
    )
    return diffs


def main() -> None:
    process_id, port = int(sys.argv[1]), int(sys.argv[2])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=N_PROCESSES,
        process_id=process_id,
        initialization_timeout=60,
    )
    result = {
        "process": jax.process_index(),
        "n_devices": jax.device_count(),
        "n_local": jax.local_device_count(),
    }
    print("initialized", flush=True, file=sys.stderr)
    result["forward"] = forward_check(make_mesh(8, 1))
    print("forward done", flush=True, file=sys.stderr)
    result["sae_step"] = sae_step_check(make_mesh(4, 2))
    print("RESULT" + json.dumps(result), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
