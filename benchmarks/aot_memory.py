"""Ahead-of-time memory check: does Gemma 3 fit a mesh of 16 GB chips, sharded by parallel.rules?

For each case (preset, devices, mesh) the forward pass (batch 1 by ``--seq`` tokens) and one
KV-cached decode step (cache of ``--cache`` tokens, batch 1) are lowered and compiled for the mesh
with abstract bfloat16 parameters (``jax.ShapeDtypeStruct`` with shardings: no weights, no device
memory), and XLA's ``memory_analysis()`` gives the bytes per device. Runs on simulated CPU devices
(``--xla_force_host_platform_device_count`` is set here, before jax is imported). Per device:
the bf16 arguments (weights, KV cache, tokens) exactly, plus the outputs and scratch space of the
program compiled with float32 weights (XLA's CPU backend would upcast bf16 weights to float32
copies; see ``parallel.aot.chip_estimate``): an upper bound for a chip with native bfloat16.

Usage: python benchmarks/aot_memory.py [--cases 27b:1x8,12b:1x4,4b:1x1] [--seq 2048] [--cache 4096]
       [--budget-gb 14] [--out aot_memory.json]
Prints a table and writes (and prints) JSON. Exit status 1 if a case exceeds the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEFAULT_CASES = "27b:1x8,12b:1x4,4b:1x1"


def _parse_cases(text: str) -> list[tuple[str, int, int]]:
    cases = []
    for item in text.split(","):
        preset, _, shape = item.partition(":")
        data, _, model = shape.partition("x")
        cases.append((preset, int(data), int(model)))
    return cases


def _measure(preset: str, data: int, model: int, seq: int, cache: int) -> dict:
    from gemma_scope_pz.models.config import Gemma3Config
    from gemma_scope_pz.parallel import make_mesh
    from gemma_scope_pz.parallel.aot import chip_estimate

    config = Gemma3Config.preset(preset)
    mesh = make_mesh(data, model)
    row = {"model": preset, "mesh": f"{data}x{model}", "devices": data * model}
    for kind, length in (("forward", seq), ("decode", cache)):
        start = time.perf_counter()
        memory = chip_estimate(config, mesh, kind, 1, length)
        row[kind] = {
            "peak_gb": memory.peak / 1e9,
            "arguments_gb": memory.arguments / 1e9,
            "temporaries_gb": memory.temporaries / 1e9,
            "compile_s": round(time.perf_counter() - start, 1),
        }
    return row


def _table(rows: list[dict], seq: int, cache: int) -> str:
    head = (
        f"{'model':>6} {'mesh':>5} | forward ({seq} tok) peak / args GB |"
        f" decode ({cache} cache) peak / args GB"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        f, d = r["forward"], r["decode"]
        lines.append(
            f"{r['model']:>6} {r['mesh']:>5} | {f['peak_gb']:>12.2f} / {f['arguments_gb']:<14.2f} |"
            f" {d['peak_gb']:>12.2f} / {d['arguments_gb']:.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help="preset:DATAxMODEL, comma-separated")
    parser.add_argument("--seq", type=int, default=2048, help="forward tokens (batch 1)")
    parser.add_argument("--cache", type=int, default=4096, help="KV cache length of the decode")
    parser.add_argument("--budget-gb", type=float, default=14.0, help="per-device target")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    cases = _parse_cases(args.cases)
    n = max(d * m for _, d, m in cases)
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    rows = [_measure(p, d, m, args.seq, args.cache) for p, d, m in cases]
    print(_table(rows, args.seq, args.cache))
    result = {
        "budget_gb": args.budget_gb,
        "seq": args.seq,
        "cache": args.cache,
        "dtype": "bfloat16",
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "rows": rows,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        from gemma_scope_pz.io import write_atomically

        write_atomically(args.out, text)
    over = [r for r in rows for k in ("forward", "decode") if r[k]["peak_gb"] > args.budget_gb]
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
