"""Shared helpers of the benchmark scripts: timing medians and a machine description for the JSON."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gemma_scope_pz.backend import CPU_MATMULS, cpu_has_bf16, cpu_matmul, set_cpu_matmul


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` (results blocked on) over ``repeats`` runs after one warm-up."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_flops(repeats: int = 5, n: int = 8192) -> float:
    """FLOP/s of a jitted bfloat16 ``[n, n] @ [n, n]`` on the default device (its practical
    peak: the denominator of the benchmarks' MFU)."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (n, n), jnp.bfloat16)
    b = jax.random.normal(key_b, (n, n), jnp.bfloat16)
    matmul = jax.jit(jnp.matmul)
    return 2 * n**3 / median_seconds(lambda: matmul(a, b), repeats)


def machine_info() -> dict[str, object]:
    """Devices, CPU count, architecture, JAX version and CPU matmul mode, to label benchmark output."""
    return {
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "cpu_matmul": cpu_matmul(),
        "cpu_has_bf16": cpu_has_bf16(),
    }


def add_cpu_matmul_option(parser) -> None:
    """``--cpu-matmul`` (``gemma_scope_pz.backend``); apply with ``apply_cpu_matmul`` first thing."""
    parser.add_argument(
        "--cpu-matmul",
        choices=CPU_MATMULS,
        default=None,
        help="CPU matmul mode of this process (None: as GEMMA_SCOPE_PZ_CPU_MATMUL says)",
    )


def apply_cpu_matmul(args) -> None:
    """Sets the ``--cpu-matmul`` mode, before JAX starts."""
    if args.cpu_matmul:
        set_cpu_matmul(args.cpu_matmul)
