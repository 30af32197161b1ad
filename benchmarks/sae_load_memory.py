"""Peak host memory of `load_sae` relative to the checkpoint size.

Writes a wide Gemma Scope 2 style folder (default d_in 640, 262144 latents, float32,
about 1.34 GB) to a temporary directory, loads it in a fresh subprocess and reports the
increase of peak RSS (``ru_maxrss``, measured after importing and warming up jax) divided
by the size of params.safetensors. (On Linux the peak is read from /proc/self/status VmHWM,
because ``ru_maxrss`` also carries the parent's high-water mark across fork + exec.) The loader aims for a ratio of at most 1.1.

Usage: python benchmarks/sae_load_memory.py [--d-in 640] [--d-sae 262144] [--dtype float32]
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

CHILD = r"""
import json, resource, sys, time
import jax, jax.numpy as jnp
from penzai import pz

def peak_kib():
    # VmHWM belongs to this process image; ru_maxrss would also count the parent's
    # high-water mark, which Linux carries across fork + exec.
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

jnp.zeros(8).block_until_ready()
jax.jit(lambda a: jnp.all(jnp.isfinite(a)))(jnp.zeros(8)).block_until_ready()
from gemma_scope_pz.scope.formats import load_sae
base = peak_kib()
start = time.perf_counter()
sae = load_sae(sys.argv[1], dtype=getattr(jnp, sys.argv[2]))
jax.block_until_ready(jax.tree_util.tree_leaves(pz.freeze_params(sae)))
seconds = time.perf_counter() - start
peak = peak_kib()
print(json.dumps({"baseline_kib": base, "peak_kib": peak, "load_seconds": seconds,
                  "device": str(jax.devices()[0])}))
"""


def write_folder(folder: Path, d_in: int, d_sae: int) -> int:
    """Writes random float32 GS2 tensors; returns the params file size in bytes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        "w_enc": rng.random((d_in, d_sae), dtype=np.float32) - 0.5,
        "b_enc": np.zeros(d_sae, np.float32),
        "w_dec": rng.random((d_sae, d_in), dtype=np.float32) - 0.5,
        "b_dec": np.zeros(d_in, np.float32),
        "threshold": np.full(d_sae, 0.1, np.float32),
    }
    save_file(tensors, str(folder / "params.safetensors"))
    del tensors
    config = {
        "hf_hook_point_in": "model.layers.9.output",
        "hf_hook_point_out": "model.layers.9.output",
        "width": d_sae,
        "architecture": "jump_relu",
        "type": "sae",
        "affine_connection": False,
        "l0": 0,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return (folder / "params.safetensors").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=640)
    parser.add_argument("--d-sae", type=int, default=262144)
    parser.add_argument("--dtype", default="float32", help="dtype passed to load_sae")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "layer_9_width_262k_l0_small"
        start = time.perf_counter()
        size = write_folder(folder, args.d_in, args.d_sae)
        write_seconds = time.perf_counter() - start
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(folder), args.dtype],
            capture_output=True,
            text=True,
            check=False,
        )
        if child.returncode:
            sys.exit(f"loader subprocess failed:\n{child.stderr}")
        result = json.loads(child.stdout.strip().splitlines()[-1])
    increase = (result["peak_kib"] - result["baseline_kib"]) * 1024
    print(
        json.dumps(
            {
                "d_in": args.d_in,
                "d_sae": args.d_sae,
                "dtype": args.dtype,
                "file_bytes": size,
                "peak_rss_increase_bytes": increase,
                "ratio": round(increase / size, 4),
                "load_seconds": round(result["load_seconds"], 3),
                "write_seconds": round(write_seconds, 3),
                "device": result["device"],
            }
        )
    )


if __name__ == "__main__":
    main()
