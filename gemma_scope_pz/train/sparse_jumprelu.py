"""The sparse JumpReLU training loss: a capped active set per row, with an exact dense fallback.

A JumpReLU latent's loss and gradients involve it only where its pre-activation ``z`` is above
``threshold - bandwidth / 2``: above the threshold it is active (it decodes, and its STE kernel
may touch the threshold), in the half-window below only the threshold's pseudo-derivative sees
it, and further below nothing does. So each row needs only its *candidates*
``z - threshold > -bandwidth / 2``. A gradient-free dense encoder pass selects, per row, the
``cap`` latents of largest margin ``z - threshold`` (``cap = config.jumprelu_sparse_cap``); their
pre-activations and gradients come from :mod:`~gemma_scope_pz.train.selected` (values from the
selection pass, a scatter-add backward), they are gated, and decoded from gathered decoder rows.
The L0 penalty is counted on the selected latents too: its step function and the kernel of its
pseudo-derivative are zero outside the candidates. So past the encoder's forward matmul the step
costs O(batch * cap * d) instead of three dense matmuls and dense passes over ``[batch, d_sae]``.

The selection takes ``cap + 1`` latents per row: when any row's ``cap + 1``-th largest margin is
still a candidate (more than ``cap`` candidates) the batch goes to
:func:`~gemma_scope_pz.train.objectives.dense_loss_fn` instead (``lax.cond``: only the taken
branch runs), so the loss and gradients always equal the dense path's. The entry point is
:func:`value_and_grad` (loss and gradients together; see there why).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gemma_scope_pz.scope import sae
from gemma_scope_pz.train import objectives, selected
from gemma_scope_pz.train.config import TrainConfig

Params = objectives.Params


def value_and_grad(
    params: Params,
    x_in: jax.Array,
    x_out: jax.Array,
    dead: jax.Array,
    sparsity_scale: jax.Array,
    config: TrainConfig,
) -> objectives.ValueAndGrad:
    """``jax.value_and_grad(objectives.loss_fn, has_aux=True)`` of a JumpReLU dictionary,
    sparse when every row fits the cap, dense otherwise; ``metrics["sparse"]`` says which (1.0
    or 0.0).

    The branch is chosen outside the differentiation, each branch differentiating itself:
    differentiating through a ``lax.cond`` would make the sparse branch hand over zero-filled
    ``[batch, d_sae]`` residuals of the dense one (0.6 s of a 2 s step at 4096 x 16,384 here).
    """
    z = jax.lax.stop_gradient(objectives.pre_activations(params, x_in, config.run.dtype))
    idx, fits = select(z, params["threshold"], config.jumprelu_sparse_cap,
                       config.loss.jumprelu_bandwidth)  # fmt: skip

    def sparse(params, x_in, x_out, dead, scale, z, idx):
        grad_fn = jax.value_and_grad(_sparse_loss, has_aux=True)
        (loss, (metrics, fired, thr)), grads = grad_fn(
            params, x_in, x_out, dead, scale, z, idx, config
        )
        return (loss, (dict(metrics, sparse=jnp.ones((), jnp.float32)), fired, thr)), grads

    def dense(params, x_in, x_out, dead, scale, z, idx):
        grad_fn = jax.value_and_grad(objectives.dense_loss_fn, has_aux=True)
        (loss, (metrics, fired, thr)), grads = grad_fn(params, x_in, x_out, dead, scale, config)
        return (loss, (dict(metrics, sparse=jnp.zeros((), jnp.float32)), fired, thr)), grads

    scale = jnp.asarray(sparsity_scale, jnp.float32)
    return jax.lax.cond(fits, sparse, dense, params, x_in, x_out, dead, scale, z, idx)


def select(
    z: jax.Array, threshold: jax.Array, cap: int, bandwidth: float
) -> tuple[jax.Array, jax.Array]:
    """Each row's ``cap + 1`` largest-margin latents ``[batch, cap + 1]`` (all of them when
    ``cap >= d_sae``), and whether every row has at most ``cap`` candidates (margin
    ``z - threshold > -bandwidth / 2``), i.e. its ``cap + 1``-th largest margin is none.

    The extra slot is decoded with the others (a non-candidate contributes exactly 0): slicing
    it off, or reading its value by index, makes XLA:CPU lower the top-k to a full sort (here
    11.8 s instead of 0.12 s at 4096 x 16,384).
    """
    margin = z - threshold
    n = min(cap + 1, z.shape[-1])
    values, idx = jax.lax.top_k(margin, n)
    if n == z.shape[-1]:
        return idx, jnp.ones((), bool)
    return idx, jnp.all(jnp.min(values, axis=-1) <= -bandwidth / 2)  # as sae.kth_largest


def _sparse_loss(params, x_in, x_out, dead, scale, z, idx, config: TrainConfig):
    """The loss from each row's selected latents (exact when all candidates are selected)."""
    dtype, bandwidth = config.run.dtype, config.loss.jumprelu_bandwidth
    threshold = params["threshold"][idx]
    pre = selected.pre_activations_at(params, x_in, idx, z)
    rows = selected.decoder_rows(params, idx, dtype)
    f = objectives.jumprelu(pre, threshold, bandwidth)
    recon = jnp.einsum("bk,bkd->bd", f.astype(rows.dtype), rows, preferred_element_type=jnp.float32)
    recon = recon + params["b_dec"]
    if "w_skip" in params:
        recon = recon + sae.skip(x_in, params["w_skip"], dtype=dtype)
    sq_err = objectives.sum_sq(recon - x_out)
    active = f != 0
    counts = jnp.zeros(config.sae.d_sae, jnp.int32).at[idx.reshape(-1)].add(active.reshape(-1))
    l0 = jnp.mean(jnp.sum(active, axis=-1).astype(jnp.float32))
    sparsity = objectives.jumprelu_l0_penalty(pre, threshold, scale, config)
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
        lambda idx: selected.pre_activations_at(params, x_in, idx, z),
    )  # fmt: skip
    zero = jnp.zeros((), jnp.float32)
    return objectives.finish(sq_err, sq_err, sparsity, aux, l0, x_out, counts > 0, zero)
