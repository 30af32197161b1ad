"""Wall time and peak memory of `gs.attribute` on the offline 270M with transcoders on every layer.

Random JumpReLU transcoders (``--d-sae`` latents, thresholds set so a few dozen fire per token)
on all 18 layers; one fresh subprocess per prompt length, so each peak is its own. Reports the
first call (compilation included) and a second, warm call, and peak RSS (VmHWM).

Usage: python benchmarks/attribution.py [--lengths 16 64 256] [--d-sae 4096]
       [--max-feature-nodes 1024] [--batch-size 64]
Prints one JSON object. (circuit-tracer is not run here: it needs torch, which is not a project
dependency; see docs/circuits.md.)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import machine_info

CHILD = r"""
import json, sys, time
import numpy as np
import gemma_scope_pz as gs
from gemma_scope_pz.scope.layers import AutoEncoder

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0

length, d_sae, cap, batch = (int(a) for a in sys.argv[1:5])
model = gs.load_model()
d = model.config.d_model
rng = np.random.default_rng(0)

def transcoder():
    return AutoEncoder.from_arrays(
        (rng.standard_normal((d, d_sae)) / np.sqrt(d)).astype(np.float32),
        np.zeros(d_sae, np.float32),
        (0.02 * rng.standard_normal((d_sae, d))).astype(np.float32),
        np.zeros(d, np.float32),
        np.full(d_sae, 2.5, np.float32),
    )

transcoders = {layer: transcoder() for layer in range(model.config.n_layers)}
tokens = np.concatenate([[2], rng.integers(1000, 20000, length - 1)])
base = peak_kib()
times = []
for _ in range(2):
    start = time.perf_counter()
    graph = gs.attribute(model, transcoders, tokens, max_feature_nodes=cap, batch_size=batch)
    times.append(time.perf_counter() - start)
print(json.dumps({"tokens": length, "first_s": times[0], "warm_s": times[1],
                  "active_features": int(len(graph.active_features)),
                  "feature_nodes": int(graph.n_features),
                  "peak_rss_mib": peak_kib() / 1024, "rss_before_mib": base / 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--max-feature-nodes", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    rows = []
    for length in args.lengths:
        argv = [length, args.d_sae, args.max_feature_nodes, args.batch_size]
        out = subprocess.run(
            [sys.executable, "-c", CHILD, *map(str, argv)],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"machine": machine_info(), "d_sae": args.d_sae, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
