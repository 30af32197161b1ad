"""Runs a Python script in a fresh process on simulated CPU devices and returns its RESULT.

``XLA_FLAGS=--xla_force_host_platform_device_count=N`` only works if it is set before jax is
imported, which the test process has already done; so such checks run as a subprocess whose last
``RESULT{json}`` line is their outcome.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_result(args: list[str], n_devices: int = 8, timeout: int = 1800) -> dict:
    """``python *args`` with ``n_devices`` CPU devices; the JSON after its last ``RESULT``."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])
