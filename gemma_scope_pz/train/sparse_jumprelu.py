"""The sparse JumpReLU training loss: a capped active set per row, with an exact dense fallback.

A JumpReLU latent's loss and gradients involve it only where its pre-activation ``z`` is above
``threshold - bandwidth / 2``: above the threshold it is active (it decodes, and its STE kernel
may touch the threshold), in the half-window below only the threshold's pseudo-derivative sees
it, and further below nothing does. So each row needs only its *candidates*
``z > threshold - bandwidth / 2``. A gradient-free dense encoder pass selects, per row, the
``cap`` latents of largest margin ``z - threshold`` (``cap = config.jumprelu_sparse_cap``); their
pre-activations are recomputed from gathered encoder columns, gated, and decoded from gathered
decoder rows, so the backward pass is a gather/scatter of O(batch * cap * d) instead of three
dense matmuls. The L0 penalty's step function is elementwise on the selection pass (its gradient
reaches the thresholds only) and stays dense.

When any row of the batch has more than ``cap`` candidates the batch goes to
:func:`~gemma_scope_pz.train.objectives.dense_loss_fn` instead (``lax.cond``: only the taken branch
runs), so the result always equals the dense path's. The forward values of the selected
pre-activations are those of the selection pass (the gathered recomputation carries only the
gradient), so gating decisions never differ between the count and the decode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_scope_pz.scope import sae
from gemma_scope_pz.train import objectives
from gemma_scope_pz.train.config import TrainConfig

Params = objectives.Params


def candidate_counts(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """Per row, how many latents have ``z > threshold - bandwidth / 2`` (``[batch]`` int32)."""
    return jnp.sum(z > threshold - bandwidth / 2, axis=-1, dtype=jnp.int32)


def loss_fn(
    params: Params,
    x_in: jax.Array,
    x_out: jax.Array,
    dead: jax.Array,
    sparsity_scale: jax.Array,
    config: TrainConfig,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array, jax.Array]]:
    """:func:`~gemma_scope_pz.train.objectives.loss_fn` of a JumpReLU dictionary, sparse when
    every row fits the cap, dense otherwise; also reports ``metrics["sparse"]`` (1.0 or 0.0)."""
    cap = config.jumprelu_sparse_cap
    z = jax.lax.stop_gradient(objectives.pre_activations(params, x_in, config.run.dtype))
    fits = jnp.max(candidate_counts(z, params["threshold"], config.loss.jumprelu_bandwidth)) <= cap

    def sparse(params, x_in, x_out, dead, scale, z):
        loss, (metrics, fired, thr) = _sparse_loss(params, x_in, x_out, dead, scale, z, cap, config)
        return loss, (dict(metrics, sparse=jnp.ones((), jnp.float32)), fired, thr)

    def dense(params, x_in, x_out, dead, scale, z):
        loss, (metrics, fired, thr) = objectives.dense_loss_fn(
            params, x_in, x_out, dead, scale, config
        )
        return loss, (dict(metrics, sparse=jnp.zeros((), jnp.float32)), fired, thr)

    scale = jnp.asarray(sparsity_scale, jnp.float32)
    return jax.lax.cond(fits, sparse, dense, params, x_in, x_out, dead, scale, z)


def _sparse_loss(params, x_in, x_out, dead, scale, z, cap: int, config: TrainConfig):
    """The loss from each row's ``cap`` largest-margin latents (exact when all candidates fit)."""
    dtype, bandwidth = config.run.dtype, config.loss.jumprelu_bandwidth
    threshold = params["threshold"]
    idx = sae.topk_indices(z - threshold, cap)  # [batch, cap]
    pre, rows = objectives.gathered(params, x_in, idx, dtype)
    # Forward values from the selection pass, gradient through the gathered recomputation.
    pre = jnp.take_along_axis(z, idx, axis=-1) + (pre - jax.lax.stop_gradient(pre))
    f = objectives.jumprelu(pre, threshold[idx], bandwidth)
    recon = jnp.einsum("bk,bkd->bd", f.astype(rows.dtype), rows, preferred_element_type=jnp.float32)
    recon = recon + params["b_dec"]
    if "w_skip" in params:
        recon = recon + sae.skip(x_in, params["w_skip"], dtype=dtype)
    sq_err = objectives.sum_sq(recon - x_out)
    active = f != 0
    counts = jnp.zeros(config.sae.d_sae, jnp.int32).at[idx.reshape(-1)].add(active.reshape(-1))
    l0 = jnp.mean(jnp.sum(active, axis=-1).astype(jnp.float32))
    sparsity = objectives.jumprelu_l0_penalty(z, threshold, scale, config)
    if config.loss.frequency_coeff > 0:
        batch = x_in.shape[0]
        abs_sum = (
            jnp.zeros(config.sae.d_sae, jnp.float32).at[idx.reshape(-1)].add(jnp.abs(f).reshape(-1))
        )
        sparsity = sparsity + config.loss.frequency_coeff * objectives.frequency_penalty_from(
            counts.astype(jnp.float32) / batch,
            abs_sum / batch,
            params["w_dec"],
            config.loss.max_firing_fraction,
        )
    aux = objectives.dead_latent_terms(
        params, z, x_out - recon, dead, config,
        lambda idx: objectives.gathered(params, x_in, idx, dtype)[0],
    )  # fmt: skip
    zero = jnp.zeros((), jnp.float32)
    return objectives.finish(sq_err, sq_err, sparsity, aux, l0, x_out, counts > 0, zero)
