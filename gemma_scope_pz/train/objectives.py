"""Training objectives of sparse autoencoders and transcoders, on plain JAX arrays.

Parameters are a dict with the Gemma Scope names ``w_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``w_dec [d_sae, d_out]``, ``b_dec [d_out]``, plus ``threshold [d_sae]`` (JumpReLU) and
``w_skip [d_in, d_out]`` (transcoders with an affine skip). The model is::

    z     = x_in @ w_enc + b_enc                      (pre-activations)
    f     = activation(z)                             (sparse latents)
    y_hat = f @ w_dec + b_dec (+ x_in @ w_skip)       (reconstruction of x_out)

The reconstruction loss is the squared error summed over the output coordinates and averaged
over the batch. Architectures:

* ``relu``: ``f = relu(z)``; penalty ``l1_coeff * sum_j f_j ||w_dec_j||`` (L1 weighted by
  decoder row norms, so shrinking the encoder while growing the decoder cannot cheat it).
* ``jumprelu`` (Rajamanoharan et al. 2024): ``f = z * H(z - θ)``; penalty ``l0_coeff * L0`` and
  optionally ``target_l0_coeff * (L0 - target_l0)**2``. The Heaviside step has no useful
  gradient, so both :func:`jumprelu` and :func:`step` use a straight-through estimator: the
  derivative with respect to θ is the rectangle-kernel pseudo-derivative
  ``d/dθ JumpReLU = -(θ/ε) K((z-θ)/ε)`` and ``d/dθ H = -(1/ε) K((z-θ)/ε)`` with
  ``K(u) = 1[|u| < 1/2]``; the derivative with respect to z is the ordinary one
  (``H(z-θ)`` for JumpReLU, 0 for the step).
* ``topk``: per token, exactly k pre-activations are kept (ties to the lowest index), then ReLU'd.
* ``batchtopk``: the ``k * batch`` largest over the whole batch are kept; the smallest kept
  value is returned so the trainer can keep a running inference threshold (BatchTopK SAEs are
  exported as JumpReLU SAEs with that global threshold).
* AuxK (Gao et al. 2024; TopK-style and JumpReLU): the ``aux_k`` largest pre-activations among *dead*
  latents, taken as they are (not ReLU'd, so a latent negative on every token still gets a
  gradient), reconstruct the (stop-gradient) residual ``x_out - y_hat``; the loss is normalised by
  the residual's total variance and is exactly 0 when no latent is dead. Only ``aux_k`` latents
  per token take part, so their decoder rows are gathered instead of a dense matmul.
* Pre-activation loss (JumpReLU): ``dead_preact_coeff * mean_b sum_j relu(θ_j - z_bj) ||w_dec_j||``
  over the same selected dead latents, which raises their pre-activations up to their thresholds
  (a JumpReLU latent below its threshold everywhere gets no other gradient to its threshold).
* ``sparse_topk=True`` (TopK): a gradient-free dense encoder pass only *selects* the k latents;
  their pre-activations (:mod:`~gemma_scope_pz.train.selected`) carry a scatter-add gradient and
  they decode from gathered decoder rows, so the backward pass costs O(batch * k * d) instead
  of three dense matmuls.
  Loss and gradients equal the dense path's (tested): both select with the same TopK rule.
* ``matryoshka``: the reconstruction loss is summed over nested prefixes of the latents
  (``f[:, :m] @ w_dec[:m]`` for each prefix size m), computed with one matmul per group.

Every forward value (pre-activations, the activations with their one TopK tie rule, decode, skip)
comes from :mod:`gemma_scope_pz.scope.sae`, the one home of the SAE math; this module adds only
the training-time pieces: straight-through estimators, sparsity penalties, AuxK, the sparse path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gemma_scope_pz.scope import sae
from gemma_scope_pz.train import selected
from gemma_scope_pz.train.config import TrainConfig

Params = dict[str, jax.Array]
# ``((loss, (metrics, fired, batch_threshold)), grads)``: what a step's value_and_grad returns.
ValueAndGrad = tuple[tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array, jax.Array]], Params]


# --------------------------------------------------------------------------- activations
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def jumprelu(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """JumpReLU ``z * H(z - threshold)`` with the rectangle-kernel STE for the threshold."""
    return sae.jumprelu(z, threshold)


def _jumprelu_fwd(z, threshold, bandwidth):
    return jumprelu(z, threshold, bandwidth), (z, threshold)


def _jumprelu_bwd(bandwidth, residuals, g):
    z, threshold = residuals
    kernel = (jnp.abs(z - threshold) < bandwidth / 2).astype(z.dtype) / bandwidth
    d_threshold = _sum_to_shape(-threshold * kernel * g, threshold.shape)
    return jnp.where(z > threshold, g, 0.0), d_threshold


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def step(z: jax.Array, threshold: jax.Array, bandwidth: float) -> jax.Array:
    """Heaviside ``H(z - threshold)`` (as 0./1.) with the rectangle-kernel STE for the threshold."""
    return (z > threshold).astype(z.dtype)


def _step_fwd(z, threshold, bandwidth):
    return step(z, threshold, bandwidth), (z, threshold)


def _step_bwd(bandwidth, residuals, g):
    z, threshold = residuals
    kernel = (jnp.abs(z - threshold) < bandwidth / 2).astype(z.dtype) / bandwidth
    return jnp.zeros_like(z), _sum_to_shape(-kernel * g, threshold.shape)


step.defvjp(_step_fwd, _step_bwd)


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    lead = x.ndim - len(shape)
    return jnp.sum(x, axis=tuple(range(lead))) if lead else x


def topk_activation(z: jax.Array, k: int) -> jax.Array:
    """Exactly k entries per row kept, ReLU'd (:func:`gemma_scope_pz.scope.sae.topk`)."""
    return sae.topk(z, k)


def batchtopk_activation(z: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Keeps the ``k * rows`` largest positive entries of the whole batch.

    Returns:
      The sparse activations and the smallest kept value (the batch's implied threshold).
    """
    threshold = sae.batchtopk_threshold(z, k)
    return sae.batchtopk(z, k, threshold), threshold


# --------------------------------------------------------------------------- forward pieces
def pre_activations(params: Params, x_in: jax.Array, dtype: str = "float32") -> jax.Array:
    """``z = x_in @ w_enc + b_enc``."""
    return sae.pre_activations(x_in, params["w_enc"], params["b_enc"], dtype=dtype)


def topk_threshold(z: jax.Array, k: int) -> jax.Array:
    """The batch mean of each row's k-th largest pre-activation (ReLU'd, no gradient).

    Its running average is the JumpReLU threshold a TopK dictionary is exported with where the
    format has no TopK (Gemma Scope 2, SAELens transcoders).
    """
    return sae.relu(jnp.mean(sae.kth_largest(jax.lax.stop_gradient(z), k)))


def activate(params: Params, z: jax.Array, config: TrainConfig) -> tuple[jax.Array, jax.Array]:
    """Applies the configured activation; also returns the batch's implied threshold (BatchTopK:
    the smallest kept value; TopK: :func:`topk_threshold`; 0 otherwise)."""
    kind, zero = config.sae.activation, jnp.zeros((), z.dtype)
    if kind == "relu":
        return sae.relu(z), zero
    if kind == "jumprelu":
        return jumprelu(z, params["threshold"], config.loss.jumprelu_bandwidth), zero
    if kind == "topk":
        return topk_activation(z, config.sae.k), topk_threshold(z, config.sae.k)
    return batchtopk_activation(z, config.sae.k)


def decode(
    params: Params, f: jax.Array, x_in: jax.Array | None = None, dtype: str = "float32"
) -> jax.Array:
    """``f @ w_dec + b_dec`` (+ ``x_in @ w_skip`` when the params have a skip)."""
    out = sae.decode(f, params["w_dec"], params["b_dec"], dtype=dtype)
    if "w_skip" in params:
        out = out + sae.skip(x_in, params["w_skip"], dtype=dtype)
    return out


def sum_sq(x: jax.Array) -> jax.Array:
    """Squared norm over the last axis, averaged over the batch."""
    return jnp.mean(jnp.sum(jnp.square(x), axis=-1))


def weighted_l1(f: jax.Array, w_dec: jax.Array) -> jax.Array:
    """``mean_batch sum_j |f_j| * ||w_dec_j||``."""
    return jnp.mean(jnp.abs(f) @ jnp.linalg.norm(w_dec, axis=-1))


def jumprelu_l0_penalty(
    z: jax.Array, threshold: jax.Array, sparsity_scale: jax.Array, config: TrainConfig
) -> jax.Array:
    """``scale * (l0_coeff * L0 + target_l0_coeff * (L0 - target_l0)^2)`` with the batch-mean L0
    counted by :func:`step` (its gradient reaches the thresholds only)."""
    gates = step(z, threshold, config.loss.jumprelu_bandwidth)
    l0_ste = jnp.mean(jnp.sum(gates, axis=-1))
    penalty = config.loss.l0_coeff * l0_ste
    if config.loss.target_l0 is not None:
        penalty = penalty + config.loss.target_l0_coeff * jnp.square(l0_ste - config.loss.target_l0)
    return sparsity_scale * penalty


def frequency_penalty(f: jax.Array, w_dec: jax.Array, max_fraction: float) -> jax.Array:
    """Decoder-norm-weighted mean activation of latents that fire too often in this batch.

    ``sum_j max(0, p_j - max_fraction) * mean_batch(f_j) * ||w_dec_j||`` with ``p_j`` the
    (stop-gradient) fraction of the batch's rows on which latent j fires. Its gradient lowers the
    activations, hence the encoder bias, of the latents above the limit until they fire less often;
    latents at or below it are untouched.
    """
    fraction = jnp.mean((f != 0).astype(jnp.float32), axis=0)
    return frequency_penalty_from(fraction, jnp.mean(jnp.abs(f), axis=0), w_dec, max_fraction)


def frequency_penalty_from(
    fraction: jax.Array, mean_abs: jax.Array, w_dec: jax.Array, max_fraction: float
) -> jax.Array:
    """:func:`frequency_penalty` from each latent's firing fraction and mean ``|f_j|``."""
    excess = jnp.maximum(jax.lax.stop_gradient(fraction) - max_fraction, 0.0)
    return jnp.sum(excess * mean_abs * jnp.linalg.norm(w_dec, axis=-1))


def dead_latent_losses(
    z: jax.Array,
    residual: jax.Array,
    w_dec: jax.Array,
    dead: jax.Array,
    aux_k: int,
    dtype: str,
    pre_activations_at=None,
    threshold: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(auxk, preact)`` of each row's ``aux_k`` highest-pre-activation dead latents.

    AuxK: those latents reconstruct the (stop-gradient) residual ``e``; the loss is
    ``||e - e_hat||^2 / ||e - mean(e)||^2`` over the batch.

    Pre-activation loss, for JumpReLU (``threshold`` given; else 0):
    ``mean_b sum_{j in S_b} relu(threshold_j - z_bj) * ||w_dec_j||``.

    AuxK trains a dead latent's encoder direction and decoder row, but a JumpReLU latent whose
    threshold lies above all its pre-activations still never fires, and its threshold gets no
    gradient. The pre-activation loss (after Anthropic's, which applies it to every latent) raises
    the pre-activations of each row's most promising dead latents until they cross the threshold.
    Both are 0 while nothing is dead; the computation is skipped then.

    With a dense ``z`` (carrying the gradient) the selection is a mask (each row's dead latents
    at or above its ``aux_k``-th largest dead pre-activation) and the decode a dense matmul: no
    gather of ``[batch, aux_k, d]`` decoder rows, no scatter in the backward pass.
    ``pre_activations_at(idx)`` (the sparse paths, whose ``z`` has no gradient) gives the
    selected pre-activations with their gradient instead, and the decode gathers their rows.
    """

    def dense(z, residual, w_dec):
        masked = jnp.where(dead, jax.lax.stop_gradient(z), -jnp.inf)
        kth = sae.kth_largest(masked, aux_k)[..., None]
        picked = dead & (masked >= kth)  # all the dead when a row has fewer than aux_k
        # Raw pre-activations, not ReLU'd (as SAELens does): a dead latent's pre-activation is
        # usually negative on every token, and a ReLU would give AuxK no gradient to revive it.
        f_aux = jnp.where(picked, z, 0.0)
        estimate = sae.matmul(f_aux, w_dec, dtype)
        gap = jax.nn.relu(threshold - z) * jnp.linalg.norm(w_dec, axis=-1) if jump else None
        return _aux_from_estimate(residual, estimate, dead), _preact(gap, picked)

    def gathered(z, residual, w_dec):
        idx = sae.topk_indices(jnp.where(dead, jax.lax.stop_gradient(z), -1e30), aux_k)
        pre = pre_activations_at(idx)
        picked = dead[idx]
        rows = jnp.take(w_dec, idx, axis=0)
        f_aux = jnp.where(picked, pre, 0.0)
        estimate = jnp.einsum(
            "bk,bkd->bd",
            sae.operand(f_aux, dtype),
            sae.operand(rows, dtype),
            preferred_element_type=jnp.float32,
        )
        gap = jax.nn.relu(threshold[idx] - pre) * jnp.linalg.norm(rows, axis=-1) if jump else None
        return _aux_from_estimate(residual, estimate, dead), _preact(gap, picked)

    jump = threshold is not None
    compute = dense if pre_activations_at is None else gathered
    zero = jnp.zeros((), jnp.float32)
    return jax.lax.cond(jnp.any(dead), compute, lambda *_: (zero, zero), z, residual, w_dec)


def _preact(gap: jax.Array | None, picked: jax.Array) -> jax.Array:
    """The pre-activation loss from per-entry gaps (``None``: not JumpReLU, 0)."""
    if gap is None:
        return jnp.zeros((), jnp.float32)
    return jnp.mean(jnp.sum(jnp.where(picked, gap, 0.0), axis=-1)).astype(jnp.float32)


def _aux_from_estimate(residual: jax.Array, estimate: jax.Array, dead: jax.Array) -> jax.Array:
    residual = jax.lax.stop_gradient(residual)
    variance = jnp.sum(jnp.square(residual - jnp.mean(residual, axis=0)))
    loss = jnp.sum(jnp.square(residual - estimate)) / jnp.maximum(variance, 1e-12)
    return jnp.where(jnp.any(dead), loss, 0.0)


def _sparse_topk_terms(params: Params, x_in: jax.Array, dead: jax.Array, config: TrainConfig):
    """Selection pre-activations, TopK reconstruction (without b_dec/skip), fired mask, L0.

    The dense encoder pass only *selects* latents (no gradient flows through it); gradients
    reach the encoder columns and decoder rows of the selected latents only.
    """
    z = jax.lax.stop_gradient(pre_activations(params, x_in, config.run.dtype))
    idx = sae.topk_indices(z, config.sae.k)
    pre = selected.pre_activations_at(params, x_in, idx, z)
    rows = selected.decoder_rows(params, idx, config.run.dtype)
    f = sae.relu(pre)
    recon = jnp.einsum("bk,bkd->bd", f.astype(rows.dtype), rows, preferred_element_type=jnp.float32)
    counts = jnp.zeros(config.sae.d_sae, jnp.int32).at[idx.reshape(-1)].add((f > 0).reshape(-1))
    l0 = jnp.mean(jnp.sum(f > 0, axis=-1).astype(jnp.float32))
    return z, recon, counts > 0, l0


def matryoshka_reconstructions(
    params: Params, f: jax.Array, x_in: jax.Array, prefixes: tuple[int, ...], dtype: str
) -> list[jax.Array]:
    """Reconstructions from each nested prefix ``f[:, :m]`` (the last is the full one)."""
    out = params["b_dec"] + (
        sae.skip(x_in, params["w_skip"], dtype=dtype) if "w_skip" in params else 0.0
    )
    recons, start = [], 0
    for end in prefixes:
        out = out + sae.matmul(f[:, start:end], params["w_dec"][start:end], dtype)
        recons.append(out)
        start = end
    return recons


# --------------------------------------------------------------------------- the loss
def loss_fn(
    params: Params,
    x_in: jax.Array,
    x_out: jax.Array,
    dead: jax.Array,
    sparsity_scale: jax.Array,
    config: TrainConfig,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array, jax.Array]]:
    """Total training loss of one batch (dense; sparse TopK with ``sae.sparse_topk``).

    The sparse JumpReLU path is chosen by :func:`gemma_scope_pz.train.loss.value_and_grad`, which the
    step calls; here a JumpReLU dictionary is always computed densely (same values).

    Args:
      params: Parameter dict (normalised-activation space).
      x_in: Inputs ``[batch, d_in]`` (normalised).
      x_out: Targets ``[batch, d_out]`` (normalised); ``x_in`` for autoencoders.
      dead: ``[d_sae]`` bool, latents counted as dead (used by AuxK).
      sparsity_scale: Warm-up factor in [0, 1] multiplying the L1 / L0 coefficients.
      config: The run configuration (static).

    Returns:
      ``(loss, (metrics, fired, batch_threshold))``: scalar metrics, a ``[d_sae]`` bool of
      latents active in this batch, and the BatchTopK implied threshold (0 otherwise).
    """
    if config.sae.sparse_topk:
        return _sparse_topk_loss(params, x_in, x_out, dead, config)
    return dense_loss_fn(params, x_in, x_out, dead, sparsity_scale, config)


def dense_loss_fn(
    params: Params,
    x_in: jax.Array,
    x_out: jax.Array,
    dead: jax.Array,
    sparsity_scale: jax.Array,
    config: TrainConfig,
) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array, jax.Array]]:
    """:func:`loss_fn` by dense matmuls (every architecture; the sparse paths' reference)."""
    dtype = config.run.dtype
    z = pre_activations(params, x_in, dtype)
    f, batch_threshold = activate(params, z, config)
    if config.sae.architecture == "matryoshka":
        recons = matryoshka_reconstructions(params, f, x_in, config.sae.matryoshka_prefixes, dtype)
        recon = recons[-1]
        recon_loss = sum(sum_sq(r - x_out) for r in recons)
    else:
        recon = decode(params, f, x_in, dtype)
        recon_loss = sum_sq(recon - x_out)
    full_sq_err = sum_sq(recon - x_out)
    l0 = jnp.mean(jnp.sum(f != 0, axis=-1).astype(jnp.float32))

    sparsity = jnp.zeros((), jnp.float32)
    if config.sae.activation == "relu":
        sparsity = sparsity_scale * config.loss.l1_coeff * weighted_l1(f, params["w_dec"])
    elif config.sae.activation == "jumprelu":
        sparsity = jumprelu_l0_penalty(z, params["threshold"], sparsity_scale, config)
    if config.loss.frequency_coeff > 0:
        sparsity = sparsity + config.loss.frequency_coeff * frequency_penalty(
            f, params["w_dec"], config.loss.max_firing_fraction
        )
    aux = dead_latent_terms(params, z, x_out - recon, dead, config)
    fired = jnp.any(f != 0, axis=0)
    return finish(recon_loss, full_sq_err, sparsity, aux, l0, x_out, fired, batch_threshold)


def dead_latent_terms(params, z, residual, dead, config: TrainConfig, pre_activations_at=None):
    """``aux_k_coeff * AuxK + dead_preact_coeff * preact`` (:func:`dead_latent_losses`), or 0
    when AuxK is off; the pre-activation term only for JumpReLU."""
    if config.effective_aux_k == 0:
        return jnp.zeros((), jnp.float32)
    jump = config.sae.activation == "jumprelu" and config.loss.dead_preact_coeff > 0
    auxk, preact = dead_latent_losses(
        z, residual, params["w_dec"], dead, config.effective_aux_k, config.run.dtype,
        pre_activations_at, params["threshold"] if jump else None,
    )  # fmt: skip
    return config.loss.aux_k_coeff * auxk + config.loss.dead_preact_coeff * preact


def finish(recon_loss, full_sq_err, sparsity, aux, l0, x_out, fired, batch_threshold):
    """:func:`loss_fn`'s return value from its terms (total loss and the scalar metrics)."""
    loss = recon_loss + sparsity + aux
    variance = jnp.sum(jnp.square(x_out - jnp.mean(x_out, axis=0)))
    metrics = {
        "loss": loss,
        "mse": full_sq_err / x_out.shape[-1],
        "fvu": full_sq_err * x_out.shape[0] / jnp.maximum(variance, 1e-12),
        "l0": l0,
        "sparsity_loss": sparsity,
        "aux_loss": aux,
    }
    return loss, (metrics, fired, batch_threshold)


def _sparse_topk_loss(params, x_in, x_out, dead, config):
    z, recon, fired, l0 = _sparse_topk_terms(params, x_in, dead, config)
    recon = recon + params["b_dec"]
    if "w_skip" in params:
        recon = recon + sae.skip(x_in, params["w_skip"], dtype=config.run.dtype)
    sq_err = sum_sq(recon - x_out)
    aux = dead_latent_terms(
        params, z, x_out - recon, dead, config,
        lambda idx: selected.pre_activations_at(params, x_in, idx, z),
    )  # fmt: skip
    zero = jnp.zeros((), jnp.float32)
    threshold = topk_threshold(z, config.sae.k)
    return finish(sq_err, sq_err, zero, aux, l0, x_out, fired, threshold)


# --------------------------------------------------------------------------- init
def init_params(
    config: TrainConfig,
    key: jax.Array,
    b_dec: jax.Array | None = None,
    in_centre: jax.Array | None = None,
) -> Params:
    """Initial parameters.

    Decoder rows are random Gaussian directions scaled to norm 1 (``unit_norm_decoder``) or
    ``decoder_init_norm``. For autoencoders the encoder is the transpose of the *unit* decoder
    directions, so initial pre-activations are the projections ``x · d_j`` (about unit variance
    on normalised data, the scale of the default JumpReLU threshold); transcoders get
    independent random unit encoder columns. ``b_enc`` starts at ``-in_centre @ w_enc`` (so the
    initial pre-activations are those of the centred inputs; 0 if ``None``), ``w_skip`` at 0,
    thresholds at ``jumprelu_init_threshold``, ``b_dec`` at the given estimate (zeros if
    ``None``).
    """
    d_in, d_sae, d_out = config.sae.d_in, config.sae.d_sae, config.sae.out_dim
    key_dec, key_enc = jax.random.split(key)
    directions = jax.random.normal(key_dec, (d_sae, d_out), jnp.float32)
    directions = directions / jnp.linalg.norm(directions, axis=-1, keepdims=True)
    row_norm = 1.0 if config.sae.unit_norm_decoder else config.sae.decoder_init_norm
    if config.sae.is_transcoder:
        w_enc = jax.random.normal(key_enc, (d_in, d_sae), jnp.float32)
        w_enc = w_enc / jnp.linalg.norm(w_enc, axis=0, keepdims=True)
    else:
        w_enc = directions.T
    params = {
        "w_enc": jnp.asarray(w_enc),
        "b_enc": jnp.zeros((d_sae,), jnp.float32)
        if in_centre is None
        else -(jnp.asarray(in_centre, jnp.float32) @ w_enc),
        "w_dec": directions * row_norm,
        "b_dec": jnp.zeros((d_out,), jnp.float32) if b_dec is None else jnp.asarray(b_dec),
    }
    if config.sae.activation == "jumprelu":
        params["threshold"] = jnp.full((d_sae,), config.sae.jumprelu_init_threshold, jnp.float32)
    if config.sae.affine_skip:
        params["w_skip"] = jnp.zeros((d_in, d_out), jnp.float32)
    return params
