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
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import add_cpu_matmul_option, apply_cpu_matmul, machine_info

from gemma_scope_pz.train import objectives
from gemma_scope_pz.train import step as step_lib
from gemma_scope_pz.train.config import (
    DictionaryConfig,
    LossConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
)


def _matmul_timer(batch: int, d_in: int, d_sae: int):
    """A function timing one jitted float32 ``[batch, d_in] @ [d_in, d_sae]`` (seconds)."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(key_a, (batch, d_in), jnp.float32)
    b = jax.random.normal(key_b, (d_in, d_sae), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()

    def timed() -> float:
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        return time.perf_counter() - start

    return timed


def _with_active_set(params: dict, config: TrainConfig) -> dict:
    """Thresholds that leave about ``cap / 4`` candidates per row of the benchmark's Gaussian
    batch (the sparse JumpReLU path then takes its sparse branch, as after training)."""
    fraction = config.jumprelu_sparse_cap / 4 / config.sae.d_sae
    # Pre-activations of N(0, I) inputs through unit encoder columns are N(0, 1).
    threshold = float(np.quantile(np.random.default_rng(0).normal(size=200_000), 1 - fraction))
    return dict(params, threshold=jnp.full_like(params["threshold"], threshold))


def step_rate(config: TrainConfig, repeats: int, matmul_time) -> dict:
    """Times the train step; each timed step sits between two timed matmuls (the machine may
    be shared, so rates are compared pairwise)."""
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

    def run() -> float:
        start = time.perf_counter()
        box["state"], box["metrics"] = step_fn(box["state"], x, None)
        jax.block_until_ready(box["metrics"]["loss"])
        return time.perf_counter() - start

    compile_s = run()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d_in 128, d_sae 2048, batch 512")
    parser.add_argument("--archs", default="jumprelu,topk")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    add_cpu_matmul_option(parser)
    args = parser.parse_args()
    apply_cpu_matmul(args)
    d_in, d_sae, batch, k = (128, 2048, 512, 32) if args.quick else (640, 16384, 4096, 32)
    matmul_time = _matmul_timer(batch, d_in, d_sae)
    matmul_s = float(np.median([matmul_time() for _ in range(args.steps)]))
    report = {
        **machine_info(),
        "load_average": os.getloadavg(),
        "shape": {"d_in": d_in, "d_sae": d_sae, "batch": batch, "k": k, "dtype": args.dtype},
        "dense_matmul": {"seconds": matmul_s, "flops_per_s": 2 * batch * d_in * d_sae / matmul_s},
        "steps": {},
    }
    variants = []
    for arch in args.archs.split(","):
        variants.append((arch, {}))
        if arch == "topk":
            variants.append(("topk_sparse", {"sae.sparse_topk": True}))
        if arch == "jumprelu":
            variants[-1] = (arch, {"sae.sparse_jumprelu": "off"})
            variants.append(("jumprelu_sparse", {"sae.sparse_jumprelu": "on", "sae.sparse_cap": k}))
    for name, extra in variants:
        arch = name.split("_")[0]
        config = TrainConfig(
            sae=DictionaryConfig(d_in=d_in, d_sae=d_sae, architecture=arch, k=k),
            loss=LossConfig(dead_window_tokens=batch * 2),
            run=RunConfig(batch_size=batch, total_steps=1000, dtype=args.dtype),
        )
        config = apply_overrides(config, extra)
        report["steps"][name] = step_rate(config, args.steps, matmul_time)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
