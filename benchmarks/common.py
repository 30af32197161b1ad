"""Shared helpers of the benchmark scripts: timing medians and a machine description for the JSON."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import jax


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn()`` (results blocked on) over ``repeats`` runs after one warm-up."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_info() -> dict[str, object]:
    """Devices, CPU count, architecture and JAX version, to label benchmark output."""
    return {
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
    }
