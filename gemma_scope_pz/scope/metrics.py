"""The metric formulas for sparse autoencoders: FVU, L0, cross-entropy, KL, CE recovered, dead fraction.

The one home of these formulas: `gemma_scope_pz.scope.evaluate` streams a corpus through them
(per-token terms summed on device, finished on the host), and they work on single masked batches.

All functions are pure ``jax.numpy`` and jittable. Activations are plain arrays ``[batch, seq, d]``
(any leading shape works, the mask must match it) or NamedArrays (unwrapped by a small adapter:
leading axes "batch", "seq", the feature axis last). ``mask`` is a bool array over the token
positions, False at excluded positions (build it with `gemma_scope_pz.scope.tokens.token_mask`);
``None`` means every position counts. Reductions accumulate in float32.

Conventions:

* `fvu`: fraction of variance unexplained, ``sum_t ||x_t - x_hat_t||^2 / sum_t ||x_t - mean(x)||^2``
  where the sums and the mean run over the masked tokens only (one mean vector for the whole batch,
  not per sequence). `fvu_from_sums` is the same formula from streamed sums.
* `cross_entropy`: logits at position t predict token t+1; the mask selects predicting positions t
  (so ``mask[:, -1]`` is ignored), the result is the mean NLL in nats.
* `kl_divergence`: ``KL(clean || other)`` per position, averaged over masked positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz


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


def _masked_mean(values: jax.Array, mask) -> jax.Array:
    w = _weights(mask, values.shape)
    return (w * values).sum() / jnp.maximum(w.sum(), 1.0)


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


def fvu_from_sums(sq_err: float, sum_x: np.ndarray, sum_sq: float, n: float) -> float:
    """`fvu` from streamed float64 sums over ``n`` counted tokens (host side).

    Args:
      sq_err: ``sum_t ||x_t - x_hat_t||^2``.
      sum_x: ``sum_t x_t`` [d].
      sum_sq: ``sum_t ||x_t||^2``.
      n: Number of tokens summed.
    """
    mean = np.asarray(sum_x, np.float64) / float(n)
    variance = float(sum_sq) - float(n) * float(np.sum(mean**2))
    return float(sq_err) / max(variance, 1e-30)


def accumulate_sums(totals: dict[str, np.ndarray], sums: dict) -> None:
    """Adds one batch's metric sums into ``totals`` (float64); ``"fired"`` is OR-ed, not added."""
    for key, value in sums.items():
        value = np.asarray(value, np.float64)
        if key == "fired":
            totals[key] = totals.get(key, False) | value.astype(bool)
        else:
            totals[key] = totals.get(key, 0.0) + value


def l0(latents, mask=None) -> jax.Array:
    """Mean number of nonzero latents per masked token. ``latents``: [..., d_sae]."""
    latents = _plain(latents, "latents")
    counts = jnp.count_nonzero(latents, axis=-1).astype(jnp.float32)
    return _masked_mean(counts, mask)


def next_token_nll(logits, tokens) -> jax.Array:
    """Per-position NLL (nats) of the next token: [batch, seq - 1], float32.

    Args:
      logits: [batch, seq, vocab]; position t predicts ``tokens[:, t + 1]``.
      tokens: int [batch, seq].
    """
    logits = _plain(logits, "vocabulary").astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    targets = _plain(tokens)[:, 1:, None].astype(jnp.int32)
    return -jnp.take_along_axis(log_probs, targets, axis=-1)[..., 0]


def kl_per_token(clean_logits, other_logits) -> jax.Array:
    """``KL(softmax(clean) || softmax(other))`` in nats at every position: [...] for [..., vocab]."""
    clean = jax.nn.log_softmax(_plain(clean_logits, "vocabulary").astype(jnp.float32), axis=-1)
    other = jax.nn.log_softmax(_plain(other_logits, "vocabulary").astype(jnp.float32), axis=-1)
    return (jnp.exp(clean) * (clean - other)).sum(axis=-1)


def prediction_mask(counted, real) -> jax.Array:
    """Bool [batch, seq - 1]: the prediction at t counts when t is counted and t + 1 is real."""
    return jnp.asarray(counted)[:, :-1] & jnp.asarray(real)[:, 1:]


def cross_entropy(logits, tokens, mask=None) -> jax.Array:
    """Mean next-token negative log-likelihood (nats).

    Args:
      logits: [batch, seq, vocab]; position t predicts ``tokens[:, t + 1]``.
      tokens: int [batch, seq].
      mask: Bool [batch, seq] over predicting positions; the last column is unused.
    """
    nll = next_token_nll(logits, tokens)
    tokens = _plain(tokens)
    w = _weights(mask, tokens.shape)[:, :-1]
    return (w * nll).sum() / jnp.maximum(w.sum(), 1.0)


def _host_or_device(*values):
    """NumPy float64 for host numbers, ``jax.numpy`` float32 when any value is a JAX array."""
    if any(isinstance(v, jax.Array) for v in values):
        return jnp, tuple(jnp.asarray(v, jnp.float32) for v in values)
    return np, tuple(np.asarray(v, np.float64) for v in values)


def delta_loss(clean_ce, spliced_ce):
    """Increase of the loss when the SAE is spliced in: ``spliced - clean``."""
    _, (clean, spliced) = _host_or_device(clean_ce, spliced_ce)
    return spliced - clean


def ce_recovered(clean_ce, spliced_ce, ablated_ce):
    """Fraction of the ablation's loss increase that splicing recovers.

    ``(ablated - spliced) / (ablated - clean)``: 1 when the spliced model is as good as the
    clean one, 0 when it is as bad as ablating the site (e.g. zero- or mean-ablation); NaN when
    ablating changes nothing (``|ablated - clean| <= 1e-12``). Host numbers give a float64 NumPy
    scalar, JAX arrays (also under ``jit``) a float32 ``jax.Array``.
    """
    xp, (clean, spliced, ablated) = _host_or_device(clean_ce, spliced_ce, ablated_ce)
    denom = ablated - clean
    defined = xp.abs(denom) > 1e-12
    return xp.where(defined, (ablated - spliced) / xp.where(defined, denom, 1.0), xp.nan)


def kl_divergence(clean_logits, other_logits, mask=None) -> jax.Array:
    """Mean over masked positions of ``KL(softmax(clean) || softmax(other))`` in nats.

    Both logits are [..., vocab]; ``mask`` is over the leading (token) axes.
    """
    return _masked_mean(kl_per_token(clean_logits, other_logits), mask)


def dead_fraction(fire_counts) -> jax.Array:
    """Fraction of latents that never fired: ``mean(fire_counts == 0)`` over [d_sae] counts."""
    return jnp.mean(jnp.asarray(_plain(fire_counts)) == 0)
