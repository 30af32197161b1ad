"""Process-wide JAX backend settings that must be chosen before JAX starts: CPU matmul precision.

On x86 CPUs with AMX or AVX-512 BF16 (Sapphire Rapids and later), XLA can send float32 dots to
oneDNN, which computes them with bfloat16 products and float32 accumulation. Arrays stay float32
(weights, activations, optimiser state); only the inputs of each matmul are rounded to bfloat16's
8-bit mantissa, as a TPU does at its default precision. On this project's 2-core reference
machine (AMX) the Gemma 3 270M forward to block 9 runs ~2.5x faster this way.

It is a setting of the whole process, read when JAX starts its CPU backend (the first array or
computation), so it is chosen first: ``GEMMA_SCOPE_PZ_CPU_MATMUL=bfloat16`` in the environment
(applied when ``gemma_scope_pz`` is imported), ``gemma-scope-pz --cpu-matmul bfloat16 …``, or
``gs.set_cpu_matmul("bfloat16")`` before anything else. On a CPU without bfloat16 instructions
the request is declined with a warning and the process computes in float32 as before: XLA's
oneDNN path is left off there, because on such a CPU (an AVX2-only AMD EPYC) it corrupted the heap
of the 270M forward at random. GPU and TPU backends ignore it.

Precision: on real text the activations at ``blocks.9.resid_post`` of the offline 270M differ
from float32's by ~0.5% (relative L2; a bfloat16 forward: ~0.8%); see docs/results.md.
"""

from __future__ import annotations

import os
import warnings

CPU_MATMULS: tuple[str, ...] = ("float32", "bfloat16")
ENV_VAR = "GEMMA_SCOPE_PZ_CPU_MATMUL"
# oneDNN for float32 dots, one dot per oneDNN call; XLA's own (YNN) dot fusions off so that the
# dots reach oneDNN; oneDNN's default floating-point mode bf16 (bfloat16 inputs, float32 sums).
_XLA_FLAGS = (
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "--xla_cpu_experimental_ynn_fusion_type=",
)
_FPMATH_VAR = "ONEDNN_DEFAULT_FPMATH_MODE"


def cpu_matmul() -> str:
    """The CPU matmul mode this process runs (or will run) with: "float32" or "bfloat16"."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    on = all(f in flags for f in _XLA_FLAGS) and os.environ.get(_FPMATH_VAR, "") == "BF16"
    return "bfloat16" if on else "float32"


def set_cpu_matmul(mode: str) -> None:
    """Chooses the CPU matmul mode of this process ("float32" or "bfloat16"; see the module doc).

    On a CPU without bfloat16 instructions ("bfloat16" asked for where ``cpu_has_bf16()`` is
    false) it warns and keeps float32.

    Raises:
      ValueError: for another mode.
      RuntimeError: if JAX's backend has already started in another mode (the message says how
        to choose it in time).
    """
    if mode not in CPU_MATMULS:
        raise ValueError(f"CPU matmul mode must be one of {CPU_MATMULS}, got {mode!r}")
    if mode == cpu_matmul():
        return
    if mode == "bfloat16" and not cpu_has_bf16():
        warnings.warn(
            "CPU matmul mode 'bfloat16' declined: this CPU has no bfloat16 matmul instructions "
            "(no amx_bf16 or avx512_bf16 in /proc/cpuinfo); matmuls stay float32",
            stacklevel=2,
        )
        return
    from jax._src import xla_bridge  # noqa: PLC0415 (private: no public "has JAX started")

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            f"CPU matmul mode {mode!r} must be chosen before JAX starts (this process already "
            f"computed with {cpu_matmul()!r}): set {ENV_VAR}={mode} in the environment, or call "
            "set_cpu_matmul first"
        )
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in _XLA_FLAGS]
    if mode == "bfloat16":
        flags += _XLA_FLAGS
        os.environ[_FPMATH_VAR] = "BF16"
    else:
        os.environ.pop(_FPMATH_VAR, None)
    os.environ["XLA_FLAGS"] = " ".join(flags)


def apply_environment() -> None:
    """``set_cpu_matmul`` from ``GEMMA_SCOPE_PZ_CPU_MATMUL`` when it is set (at package import)."""
    mode = os.environ.get(ENV_VAR, "").strip()
    if mode:
        try:
            set_cpu_matmul(mode)
        except ValueError as err:
            raise ValueError(f"{ENV_VAR}={mode!r}: {err}") from None


def cpu_has_bf16() -> bool:
    """Whether this CPU advertises bfloat16 matmul instructions (AMX-BF16 or AVX-512 BF16)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
