"""The CPU matmul mode (gemma_scope_pz/backend.py): bfloat16 products through oneDNN, chosen per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gemma_scope_pz import backend
from gemma_scope_pz.app.parser import build_parser

# A float32 matmul whose result shows bfloat16 rounding of its inputs (8-bit mantissa: relative
# error ~1e-3 per product) against float64, printed as JSON by a fresh process.
_PROBE = """
import json, numpy as np
import gemma_scope_pz as gs
import jax, jax.numpy as jnp
rng = np.random.default_rng(0)
a, b = rng.standard_normal((256, 640)), rng.standard_normal((640, 512))
got = np.asarray(jax.jit(jnp.matmul)(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)))
want = a @ b
err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
print(json.dumps({"mode": gs.cpu_matmul(), "err": err}))
"""


def _probe(env_mode: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", backend.ENV_VAR)}
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("ONEDNN_DEFAULT_FPMATH_MODE", None)
    if env_mode:
        env[backend.ENV_VAR] = env_mode
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "stderr": done.stderr}


def test_bfloat16_mode_rounds_matmul_inputs_and_float32_mode_does_not():
    plain = _probe(None)
    assert plain["mode"] == "float32"
    assert plain["err"] < 1e-6
    fast = _probe("bfloat16")
    if backend.cpu_has_bf16():
        assert fast["mode"] == "bfloat16"
        # bfloat16 inputs: error of the order of 2^-9 per element, averaged down over 640 terms
        assert 1e-4 < fast["err"] < 1e-2, fast
    else:  # declined with a warning: XLA's oneDNN path stays off on such a CPU
        assert fast["mode"] == "float32" and fast["err"] < 1e-6, fast
        assert "'bfloat16' declined: this CPU has no bfloat16 matmul instructions" in fast["stderr"]


def test_bfloat16_is_declined_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setattr(backend, "cpu_has_bf16", lambda: False)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("ONEDNN_DEFAULT_FPMATH_MODE", raising=False)
    with pytest.warns(UserWarning, match="declined.*matmuls stay float32"):
        backend.set_cpu_matmul("bfloat16")
    assert backend.cpu_matmul() == "float32"
    assert "onednn" not in os.environ.get("XLA_FLAGS", "")


def test_bad_mode_from_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "fp8")
    with pytest.raises(ValueError, match="GEMMA_SCOPE_PZ_CPU_MATMUL='fp8'.*float32"):
        backend.apply_environment()


def test_switching_after_jax_started_is_refused_with_the_way_out(monkeypatch):
    import jax.numpy as jnp

    monkeypatch.setattr(backend, "cpu_has_bf16", lambda: True)  # else "bfloat16" is declined first

    jnp.zeros(1).block_until_ready()  # JAX has started in this process
    other = "bfloat16" if backend.cpu_matmul() == "float32" else "float32"
    with pytest.raises(RuntimeError, match="before JAX starts.*GEMMA_SCOPE_PZ_CPU_MATMUL"):
        backend.set_cpu_matmul(other)
    backend.set_cpu_matmul(backend.cpu_matmul())  # the current mode is a no-op


def test_cli_option_goes_before_the_command():
    args = build_parser().parse_args(["--cpu-matmul", "bfloat16", "generate", "hi"])
    assert args.cpu_matmul == "bfloat16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--cpu-matmul", "fp16", "generate", "hi"])
