"""Two processes on localhost, joined by ``jax.distributed`` with JAX's CPU collectives (gloo),
4 simulated devices each: a data-parallel forward of a tiny Gemma 3 and one SAE training step
(batch over "data", latents over "model") agree with the same computation on one device.
Each process feeds only its half of the batch (``tests/parallel_multiprocess_worker.py``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("parallel_multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_agree_with_one_device():
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=1200)
            assert proc.returncode == 0, err[-3000:]
            line = [s for s in out.splitlines() if s.startswith("RESULT")][-1]
            results.append(json.loads(line[len("RESULT") :]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert sorted(r["process"] for r in results) == [0, 1]
    for r in results:
        assert (r["n_devices"], r["n_local"]) == (8, 4)
        # Logits of order 10: float32 rounding of the same program, rows over two processes.
        assert r["forward"] < 5e-5, r
        step = r["sae_step"]
        assert step.pop("moved") > 1e-4  # the step changed the parameters
        assert set(step) >= {"w_enc", "w_dec", "b_enc", "b_dec", "threshold"}
        assert max(step.values()) < 1e-6, step
