"""The jitted training step: loss, gradients, Adam update, constraints, counters, metrics.

The trainer state is a plain dict pytree (checkpointed as is)::

    params        parameter dict (see objectives), float32 master weights
    opt_state     optax state of clip -> Adam -> learning-rate schedule
    step          int32 scalar, index of the next step (= data position)
    rng           uint32[2] PRNG key (reserved for stochastic variants; saved and restored)
    since_fired   int32[d_sae], steps since each latent was last active (dead if >= window)
    inference_threshold  float32 scalar, running mean of the BatchTopK batch threshold
    n_skipped     int32 scalar, steps skipped because the batch or gradient was not finite
    first_bad_step int32 scalar, first skipped step (-1 if none)
    norm          normaliser arrays (constant during training)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gemma_scope_pz.train import loss as loss_lib
from gemma_scope_pz.train.config import TrainConfig

State = dict
_SATURATE = 2**30
_MIN_THRESHOLD = 1e-4
# optax.tree.norm (optax >= 0.2.5) replaces the deprecated optax.global_norm.
_global_norm = optax.tree.norm if hasattr(optax, "tree") else optax.global_norm


def learning_rate(config: TrainConfig, step):
    """Learning rate at ``step``: linear warm-up ``lr * (step + 1) / warmup_steps``, then cosine
    decay from ``lr`` to ``lr * lr_final_fraction`` over the remaining steps (or constant)."""
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.minimum(1.0, (step + 1.0) / max(1, config.optim.warmup_steps))
    if config.optim.lr_decay == "constant":
        return config.optim.lr * warm
    span = max(1, config.num_steps - config.optim.warmup_steps)
    progress = jnp.clip((step - config.optim.warmup_steps) / span, 0.0, 1.0)
    final = config.optim.lr_final_fraction
    cosine = final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return config.optim.lr * jnp.where(step < config.optim.warmup_steps, warm, cosine)


def sparsity_scale(config: TrainConfig, step):
    """Sparsity-coefficient warm-up factor ``min(1, (step + 1) / sparsity_warmup_steps)``."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(1.0, (step + 1.0) / max(1, config.loss.sparsity_warmup_steps))


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam, then the learning-rate schedule."""
    parts = []
    if config.optim.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(config.optim.grad_clip_norm))
    parts.append(
        optax.scale_by_adam(config.optim.adam_b1, config.optim.adam_b2, config.optim.adam_eps)
    )
    parts.append(optax.scale_by_learning_rate(lambda count: learning_rate(config, count)))
    return optax.chain(*parts)


def init_state(config: TrainConfig, params: dict, norm_arrays: dict[str, np.ndarray]) -> State:
    """Fresh trainer state around initial parameters."""
    params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    return {
        "params": params,
        "opt_state": make_optimizer(config).init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.PRNGKey(config.run.seed),
        "since_fired": jnp.zeros((config.sae.d_sae,), jnp.int32),
        "inference_threshold": jnp.zeros((), jnp.float32),
        "n_skipped": jnp.zeros((), jnp.int32),
        "first_bad_step": jnp.full((), -1, jnp.int32),
        "norm": {k: jnp.asarray(v, jnp.float32) for k, v in norm_arrays.items()},
    }


def project_out_parallel(grad_w_dec: jax.Array, w_dec: jax.Array) -> jax.Array:
    """Removes from each decoder-row gradient its component along the (unit) row."""
    unit = w_dec / jnp.maximum(jnp.linalg.norm(w_dec, axis=-1, keepdims=True), 1e-12)
    return grad_w_dec - jnp.sum(grad_w_dec * unit, axis=-1, keepdims=True) * unit


def normalise_batch(norm: dict, x_in: jax.Array, x_out: jax.Array | None):
    """``(finite, x_in', x_out')``: the batch normalised (zeros where it is not finite)."""
    finite = jnp.all(jnp.isfinite(x_in))
    if x_out is not None:
        finite &= jnp.all(jnp.isfinite(x_out))
    x_in = jnp.where(finite, (x_in - norm["in_shift"]) * norm["in_scale"], 0.0)
    if x_out is None:
        return finite, x_in, x_in
    return finite, x_in, jnp.where(finite, (x_out - norm["out_shift"]) * norm["out_scale"], 0.0)


def _make_update(config: TrainConfig, optimizer: optax.GradientTransformation) -> Callable:
    """``update(operands, step, fired, batch_threshold)`` for a good step: Adam, constraints,
    dead-latent counters and the running inference threshold."""

    def update(operands, step, fired, batch_threshold):
        params, opt_state, grads, since_fired, threshold_ema = operands
        updates, opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        if config.sae.unit_norm_decoder:
            w_dec = new_params["w_dec"]
            new_params["w_dec"] = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
        if "threshold" in new_params:
            new_params["threshold"] = jnp.maximum(new_params["threshold"], _MIN_THRESHOLD)
        since_fired = jnp.where(fired, 0, jnp.minimum(since_fired + 1, _SATURATE))
        momentum = jnp.where(step == 0, 0.0, 0.99)
        threshold_ema = momentum * threshold_ema + (1 - momentum) * batch_threshold
        return new_params, opt_state, since_fired, threshold_ema

    return update


def make_train_step(config: TrainConfig) -> Callable:
    """``step_fn(state, x_in, x_out_or_None) -> (state, metrics)`` (not yet jitted).

    Raw batches are normalised inside the step. When the batch, the loss or the gradient norm
    is not finite, every part of the state except ``step``, ``n_skipped`` and
    ``first_bad_step`` is left unchanged (the step is skipped).
    """
    optimizer = make_optimizer(config)
    update = _make_update(config, optimizer)
    window = config.dead_window_steps

    def step_fn(state: State, x_in: jax.Array, x_out: jax.Array | None):
        params, step = state["params"], state["step"]
        finite, x_in, x_out = normalise_batch(state["norm"], x_in, x_out)
        dead = state["since_fired"] >= window
        (loss, (metrics, fired, batch_threshold)), grads = loss_lib.value_and_grad(
            params, x_in, x_out, dead, sparsity_scale(config, step), config
        )
        if config.sae.unit_norm_decoder:
            grads["w_dec"] = project_out_parallel(grads["w_dec"], params["w_dec"])
        grad_norm = _global_norm(grads)
        ok = finite & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        operands = (
            params,
            state["opt_state"],
            grads,
            state["since_fired"],
            state["inference_threshold"],
        )
        # lax.cond (not a select): the update runs only for good steps, with no extra pass.
        chosen = jax.lax.cond(
            ok,
            lambda ops: update(ops, step, fired, batch_threshold),
            lambda ops: (ops[0], ops[1], ops[3], ops[4]),
            operands,
        )
        new_state = dict(state)
        new_state.update(
            zip(("params", "opt_state", "since_fired", "inference_threshold"), chosen, strict=True)
        )
        new_state["step"] = step + 1
        new_state["n_skipped"] = state["n_skipped"] + (~ok).astype(jnp.int32)
        new_state["first_bad_step"] = jnp.where(
            (~ok) & (state["first_bad_step"] < 0), step, state["first_bad_step"]
        )
        metrics = dict(metrics, grad_norm=grad_norm, lr=learning_rate(config, step))
        metrics["dead_fraction"] = jnp.mean(
            (new_state["since_fired"] >= window).astype(jnp.float32)
        )
        metrics["skipped"] = new_state["n_skipped"]
        return new_state, metrics

    return step_fn
