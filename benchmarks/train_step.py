"""Throughput of the jitted SAE train step, next to this machine's dense matmul rate.

Usage: python benchmarks/train_step.py [--quick] [--archs jumprelu,topk] [--steps 5]

Prints one JSON object: for each architecture (and the gather-based sparse variants: TopK
with ``sparse_topk=True``, JumpReLU with ``sparse_jumprelu="on"`` and cap k, its thresholds set
so that about k / 4 latents per row are candidates, ``sparse_branch_taken`` saying the step did
not fall back to the dense path) the seconds per step, tokens/s, and achieved FLOP/s, where the
step is counted as ``6 * batch * d_in * d_sae`` FLOPs (the "6 x tokens x weights" rule for the
two matrices' multiply-adds); ``dense_matmul`` is a jitted float32 ``[batch, d_in] @ [d_in,
d_sae]`` on the same device, timed right before and after each step (the machine may be shared);
``fraction_of_matmul`` is the median over steps of step FLOP/s / neighbouring matmul FLOP/s. The exact
dense step is ~10 * batch * d_in * d_sae FLOPs (encoder and decoder forward, decoder
input-gradient, both weight gradients), so the hardware utilisation is ~5/3 of the reported
fraction.

On an accelerator (``--shape`` for its sizes, ``--group`` steps per timing so that dispatch is
not what is timed), ``peak`` is a jitted bfloat16 ``[8192, 8192] @ [8192, 8192]`` on the device
and each step also reports ``mfu``: the exact dense FLOPs (``10 * batch * d_in * d_sae``) per
second over that measured peak (and over ``--peak-tflops``, the datasheet's dense bfloat16
rate, when given).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import add_cpu_matmul_option, apply_cpu_matmul, machine_info, peak_flops

from gemma_scope_pz.train import objectives
from gemma_scope_pz.train import step as step_lib
from gemma_scope_pz.train.config import (
    DictionaryConfig,
    LossConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
)


def _matmul_timer(batch: int, d_in: int, d_sae: int, dtype=jnp.float32, group: int = 1):
    """A function timing one jitted ``[batch, d_in] @ [d_in, d_sae]`` (seconds; the mean of
    ``group`` back-to-back products)."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (batch, d_in), dtype)
    b = jax.random.normal(key_b, (d_in, d_sae), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()

    def timed() -> float:
        start = time.perf_counter()
        jax.block_until_ready([matmul(a, b) for _ in range(group)])
        return (time.perf_counter() - start) / group

    return timed


def _with_active_set(params: dict, config: TrainConfig) -> dict:
    """Thresholds that leave about ``cap / 4`` candidates per row of the benchmark's Gaussian
    batch (the sparse JumpReLU path then takes its sparse branch, as after training)."""
    fraction = config.jumprelu_sparse_cap / 4 / config.sae.d_sae
    # Pre-activations of N(0, I) inputs through unit encoder columns are N(0, 1).
    threshold = float(np.quantile(np.random.default_rng(0).normal(size=200_000), 1 - fraction))
    return dict(params, threshold=jnp.full_like(params["threshold"], threshold))


def step_rate(config: TrainConfig, repeats: int, matmul_time, group: int = 1) -> dict:
    """Times the train step (the mean of ``group`` back-to-back steps); each timing sits between
    two timed matmuls (the machine may be shared, so rates are compared pairwise)."""
    params = objectives.init_params(config, jax.random.PRNGKey(0))
    if config.jumprelu_sparse_cap:
        params = _with_active_set(params, config)
    zeros = np.zeros(config.sae.d_in, np.float32)
    norm = {
        "in_shift": zeros,
        "in_scale": np.float32(1),
        "out_shift": zeros,
        "out_scale": np.float32(1),
    }
    state = step_lib.init_state(config, params, norm)
    step_fn = jax.jit(step_lib.make_train_step(config), donate_argnums=(0,))
    x = jax.random.normal(
        jax.random.PRNGKey(1), (config.run.batch_size, config.sae.d_in), jnp.float32
    )
    box = {"state": state}

    def run(n: int = group) -> float:
        start = time.perf_counter()
        for _ in range(n):
            box["state"], box["metrics"] = step_fn(box["state"], x, None)
        jax.block_until_ready(box["metrics"]["loss"])
        return (time.perf_counter() - start) / n

    compile_s = run(1)
    sparse_branch = None
    steps, matmuls = [], []
    for _ in range(repeats):
        before = matmul_time()
        steps.append(run())
        matmuls.append((before + matmul_time()) / 2)
        if "sparse" in box["metrics"]:
            sparse_branch = bool(box["metrics"]["sparse"])
    flops = 6 * config.run.batch_size * config.sae.d_in * config.sae.d_sae
    matmul_flops = 2 * config.run.batch_size * config.sae.d_in * config.sae.d_sae
    seconds, matmul_s = float(np.median(steps)), float(np.median(matmuls))
    return {
        "sparse_branch_taken": sparse_branch,
        "seconds_per_step": seconds,
        "compile_and_first_step_s": compile_s,
        "tokens_per_s": config.run.batch_size / seconds,
        "flops_per_s": flops / seconds,
        "matmul_flops_per_s": matmul_flops / matmul_s,
        "fraction_of_matmul": float(
            np.median([flops / s / (matmul_flops / m) for s, m in zip(steps, matmuls, strict=True)])
        ),
    }


def _variants(archs: str, k: int) -> list[tuple[str, dict]]:
    """(name, config overrides) of every step variant of ``archs``."""
    variants = []
    for arch in archs.split(","):
        variants.append((arch, {}))
        if arch == "topk":
            variants.append(("topk_sparse", {"sae.sparse_topk": True}))
        if arch == "jumprelu":
            variants[-1] = (arch, {"sae.sparse_jumprelu": "off"})
            variants.append(("jumprelu_sparse", {"sae.sparse_jumprelu": "on", "sae.sparse_cap": k}))
    return variants


def shape_report(shape: tuple[int, int, int], args, peak: float | None) -> dict:
    """Every variant's step rate at ``(d_in, d_sae, batch)``, next to the dense matmul rate."""
    (d_in, d_sae, batch), k = shape, args.k
    matmul_time = _matmul_timer(batch, d_in, d_sae, group=args.group)
    matmul_s = float(np.median([matmul_time() for _ in range(args.steps)]))
    report = {
        "shape": {"d_in": d_in, "d_sae": d_sae, "batch": batch, "k": k, "dtype": args.dtype},
        "dense_matmul": {"seconds": matmul_s, "flops_per_s": 2 * batch * d_in * d_sae / matmul_s},
        "steps": {},
    }
    for name, extra in _variants(args.archs, k):
        arch = name.split("_")[0]
        config = TrainConfig(
            sae=DictionaryConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k),
            loss=LossConfig(dead_window_tokens=batch * 2),
            run=RunConfig(batch_size=batch, total_steps=1000, dtype=args.dtype),
        )
        step = step_rate(apply_overrides(config, extra), args.steps, matmul_time, args.group)
        exact = 10 * batch * d_in * d_sae / step["seconds_per_step"]
        if peak:
            step["mfu"] = exact / peak
        if args.peak_tflops:
            step["mfu_datasheet"] = exact / (args.peak_tflops * 1e12)
        report["steps"][name] = step
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d_in 128, d_sae 2048, batch 512")
    parser.add_argument(
        "--shape", action="append", default=None, metavar="D_IN,D_SAE,BATCH",
        help="a shape to time (repeatable; default 640,16384,4096)",
    )  # fmt: skip
    parser.add_argument("--archs", default="jumprelu,topk")
    parser.add_argument("--k", type=int, default=32, help="TopK's k and the sparse JumpReLU cap")
    parser.add_argument("--steps", type=int, default=5, help="timings per configuration")
    parser.add_argument("--group", type=int, default=1, help="back-to-back steps per timing")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--peak", action="store_true", help="measure the bf16 peak; report MFU")
    parser.add_argument("--peak-tflops", type=float, default=None, help="datasheet bf16 peak")
    add_cpu_matmul_option(parser)
    args = parser.parse_args()
    apply_cpu_matmul(args)
    shapes = [(128, 2048, 512)] if args.quick else [(640, 16384, 4096)]
    if args.shape:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shape]
    peak = peak_flops() if args.peak else None
    report = {**machine_info(), "load_average": os.getloadavg(), "peak_flops_per_s": peak,
              "shapes": [shape_report(shape, args, peak) for shape in shapes]}  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
