"""Reconstruction and downstream metrics for sparse autoencoders, on masked token batches.

All functions are pure ``jax.numpy`` and jittable. Activations are plain arrays
``[batch, seq, d]`` (any leading shape works, the mask must match it) or NamedArrays
(unwrapped by a small adapter: leading axes "batch", "seq", the feature axis last).
``mask`` is a bool array over the token positions, False at excluded positions (BOS,
padding); ``None`` means every position counts. Reductions accumulate in float32.

Conventions:

* `fvu`: fraction of variance unexplained, ``sum_t ||x_t - x_hat_t||^2 /
  sum_t ||x_t - mean(x)||^2`` where the sums and the mean run over the masked tokens only
  (one mean vector for the whole batch, not per sequence).
* `cross_entropy`: logits at position t predict token t+1; the mask selects predicting
  positions t (so ``mask[:, -1]`` is ignored), the result is the mean NLL in nats.
* `kl_divergence`: ``KL(clean || other)`` per position, averaged over masked positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from penzai import pz

BOS_ID, EOS_ID, PAD_ID = 2, 1, 0


def _plain(x, feature_axis: str | None = None) -> jax.Array:
    """Unwraps a NamedArray to (batch, seq, ..., feature_axis) order; arrays pass through."""
    if not isinstance(x, pz.nx.NamedArrayBase):
        return jnp.asarray(x)
    names = list(x.named_shape)
    lead = [n for n in ("batch", "seq") if n in names]
    rest = [n for n in names if n not in lead and n != feature_axis]
    tail = [feature_axis] if feature_axis in names else []
    return x.unwrap(*lead, *rest, *tail)


def _weights(mask, shape: Sequence[int]) -> jax.Array:
    """Float32 weights over token positions (ones when ``mask`` is None)."""
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    mask = _plain(mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected token shape {tuple(shape)}")
    return mask.astype(jnp.float32)


def token_mask(tokens: jax.Array, exclude: Sequence[int] = (BOS_ID, PAD_ID)) -> jax.Array:
    """Bool mask that is False where ``tokens`` is one of ``exclude`` (default BOS and PAD)."""
    tokens = jnp.asarray(tokens)
    return ~jnp.isin(tokens, jnp.asarray(exclude, tokens.dtype))


def fvu(x, x_hat, mask=None) -> jax.Array:
    """Fraction of variance unexplained over masked tokens (see module docstring).

    Args:
      x: Activations [..., d] (or a NamedArray with "embedding").
      x_hat: Reconstructions, same shape.
      mask: Bool [...] over tokens, or None.
    """
    x = _plain(x, "embedding").astype(jnp.float32)
    x_hat = _plain(x_hat, "embedding").astype(jnp.float32)
    w = _weights(mask, x.shape[:-1])[..., None]
    n = jnp.maximum(w.sum(), 1.0)
    mean = (w * x).sum(axis=tuple(range(x.ndim - 1))) / n
    residual = (w * (x - x_hat) ** 2).sum()
    total = (w * (x - mean) ** 2).sum()
    return residual / total


def l0(latents, mask=None) -> jax.Array:
    """Mean number of nonzero latents per masked token. ``latents``: [..., d_sae]."""
    latents = _plain(latents, "latents")
    w = _weights(mask, latents.shape[:-1])
    counts = jnp.count_nonzero(latents, axis=-1).astype(jnp.float32)
    return (w * counts).sum() / jnp.maximum(w.sum(), 1.0)


def cross_entropy(logits, tokens, mask=None) -> jax.Array:
    """Mean next-token negative log-likelihood (nats).

    Args:
      logits: [batch, seq, vocab]; position t predicts ``tokens[:, t + 1]``.
      tokens: int [batch, seq].
      mask: Bool [batch, seq] over predicting positions; the last column is unused.
    """
    logits = _plain(logits, "vocabulary").astype(jnp.float32)
    tokens = _plain(tokens)
    w = _weights(mask, tokens.shape)[:, :-1]
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    targets = tokens[:, 1:, None].astype(jnp.int32)
    nll = -jnp.take_along_axis(log_probs, targets, axis=-1)[..., 0]
    return (w * nll).sum() / jnp.maximum(w.sum(), 1.0)


def delta_loss(clean_ce, spliced_ce) -> jax.Array:
    """Increase of the loss when the SAE is spliced in: ``spliced - clean``."""
    return jnp.asarray(spliced_ce) - jnp.asarray(clean_ce)


def ce_recovered(clean_ce, spliced_ce, ablated_ce) -> jax.Array:
    """Fraction of the ablation's loss increase that splicing recovers.

    ``(ablated - spliced) / (ablated - clean)``: 1 when the spliced model is as good as the
    clean one, 0 when it is as bad as ablating the site (e.g. zero- or mean-ablation).
    """
    clean, spliced, ablated = (
        jnp.asarray(v, jnp.float32) for v in (clean_ce, spliced_ce, ablated_ce)
    )
    return (ablated - spliced) / (ablated - clean)


def kl_divergence(clean_logits, other_logits, mask=None) -> jax.Array:
    """Mean over masked positions of ``KL(softmax(clean) || softmax(other))`` in nats.

    Both logits are [..., vocab]; ``mask`` is over the leading (token) axes.
    """
    clean = jax.nn.log_softmax(_plain(clean_logits, "vocabulary").astype(jnp.float32), axis=-1)
    other = jax.nn.log_softmax(_plain(other_logits, "vocabulary").astype(jnp.float32), axis=-1)
    kl = (jnp.exp(clean) * (clean - other)).sum(axis=-1)
    w = _weights(mask, kl.shape)
    return (w * kl).sum() / jnp.maximum(w.sum(), 1.0)


def dead_fraction(fire_counts) -> jax.Array:
    """Fraction of latents that never fired: ``mean(fire_counts == 0)`` over [d_sae] counts."""
    return jnp.mean(jnp.asarray(_plain(fire_counts)) == 0)
