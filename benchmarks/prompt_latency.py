"""Latency of prompts of new lengths on the Gemma 3 270M: no recompilation per length.

    python benchmarks/prompt_latency.py [--prompts 10] [--new-tokens 8] [--no-bucket]

A notebook session sends prompts of varied lengths; without bucketing every new length compiles
a new program. This times ``gs.forward`` and ``gs.generate`` on ``--prompts`` texts of distinct
lengths, each timed once (first call included), and reports the 2nd and 10th; the target is
under 1.5 s each on 2 CPU cores. Next to the wall times it records the process's CPU seconds per
call and the load average before and after, since on a shared machine wall time mostly measures the
other processes. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import jax
from common import machine_info

_WORDS = (
    "the energy of a closed system cannot be created or destroyed but only changed from one "
    "form to another and every model of it must keep that balance in view"
).split()


def _prompts(count: int) -> list[str]:
    """``count`` texts of strictly increasing length (3, 5, 7, ... words)."""
    return [" ".join(_WORDS[i % len(_WORDS)] for i in range(3 + 2 * k)) for k in range(count)]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(fn, cpu: list[float]) -> float:
    """Wall seconds of ``fn()`` (result blocked on); its CPU seconds are appended to ``cpu``."""
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    jax.block_until_ready(fn())
    cpu.append(_cpu_seconds() - cpu_start)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--no-bucket", action="store_true", help="disable length bucketing")
    parser.add_argument("--model", default=None, help="checkpoint source (default: offline 270M)")
    args = parser.parse_args()

    import gemma_scope_pz as gs

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    model = gs.load_model(args.model)
    load_s = time.perf_counter() - start
    bucket = not args.no_bucket
    texts = _prompts(args.prompts)
    forward_cpu: list[float] = []
    generate_cpu: list[float] = []
    forward_s = [
        _timed(lambda t=t: gs.forward(model, t, bucket=bucket), forward_cpu) for t in texts
    ]
    generate_s = [
        _timed(
            lambda t=t: gs.generate(model, t, args.new_tokens, bucket=bucket, stop_token=None),
            generate_cpu,
        )
        for t in texts
    ]

    def pick(times: list[float], n: int) -> float | None:
        return round(times[n - 1], 3) if len(times) >= n else None

    print(
        json.dumps(
            {
                "benchmark": "prompt_latency",
                "model": model.config.name,
                "bucket": bucket,
                "prompt_tokens": [len(gs.load_tokenizer().encode(t)) for t in texts],
                "new_tokens": args.new_tokens,
                "load_seconds": round(load_s, 2),
                "forward_seconds": [round(s, 3) for s in forward_s],
                "generate_seconds": [round(s, 3) for s in generate_s],
                "forward_cpu_seconds": [round(s, 3) for s in forward_cpu],
                "generate_cpu_seconds": [round(s, 3) for s in generate_cpu],
                "forward_2nd_s": pick(forward_s, 2),
                "forward_10th_s": pick(forward_s, 10),
                "generate_2nd_s": pick(generate_s, 2),
                "generate_10th_s": pick(generate_s, 10),
                "target_s": 1.5,
                "load_average_before": round(load_before, 2),
                "load_average_after": round(os.getloadavg()[0], 2),
                **machine_info(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
