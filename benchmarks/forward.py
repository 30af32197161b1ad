"""Tokens/s of the Gemma 3 270M forward on this machine: full logits, and stopping after block 9.

    python benchmarks/forward.py [--batch 8] [--seq 128] [--repeats 5] [--dtype float32]

Prints one JSON object. The "stop after block 9" case is the activation-harvest path
(``capture(model, tokens, ["blocks.9.resid_post"])``).
"""

from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np
from common import add_cpu_matmul_option, apply_cpu_matmul, machine_info, median_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--model", default=None, help="checkpoint source (default: offline 270M)")
    add_cpu_matmul_option(parser)
    args = parser.parse_args()
    apply_cpu_matmul(args)

    import gemma_scope_pz as gs

    start = time.perf_counter()
    model = gs.load_model(args.model, dtype=jnp.dtype(args.dtype))
    load_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 20_000, size=(args.batch, args.seq)).astype(np.int32)
    tokens[:, 0] = 2
    n_tokens = args.batch * args.seq
    full = median_seconds(lambda: gs.forward(model, tokens), args.repeats)
    harvest = median_seconds(
        lambda: gs.capture(model, tokens, ["blocks.9.resid_post"])["blocks.9.resid_post"],
        args.repeats,
    )
    print(
        json.dumps(
            {
                "benchmark": "forward",
                "model": model.config.name,
                "dtype": args.dtype,
                "batch": args.batch,
                "seq": args.seq,
                "repeats": args.repeats,
                "load_seconds": round(load_s, 2),
                "full_logits_tokens_per_s": round(n_tokens / full, 1),
                "full_logits_median_s": round(full, 4),
                "stop_after_block_9_tokens_per_s": round(n_tokens / harvest, 1),
                "stop_after_block_9_median_s": round(harvest, 4),
                **machine_info(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
