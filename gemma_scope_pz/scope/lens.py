"""Logit lens of dictionary features: a decoder direction read out through the final norm and unembedding."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_scope_pz.models.gemma3 import Gemma3LM


@dataclasses.dataclass(frozen=True)
class LensResult:
    """Top and bottom tokens a feature direction promotes.

    Attributes:
      feature: Latent index.
      top: (token id, logit) pairs, most promoted first.
      bottom: (token id, logit) pairs, most suppressed first.
    """

    feature: int
    top: list[tuple[int, float]]
    bottom: list[tuple[int, float]]

    def with_strings(self, token_strings: Callable[[Sequence[int]], list[str]]) -> dict:
        top_s = token_strings([i for i, _ in self.top])
        bottom_s = token_strings([i for i, _ in self.bottom])
        return {
            "feature": self.feature,
            "top": [(s, v) for s, (_, v) in zip(top_s, self.top)],
            "bottom": [(s, v) for s, (_, v) in zip(bottom_s, self.bottom)],
        }


def unembedding_readout(model: Gemma3LM) -> tuple[jax.Array, jax.Array, float]:
    """(final-norm scale [d_model], embedding table [vocab, d_model], norm epsilon) of ``model``."""
    return model.final_norm_scale(), model.embedding_table(), model.config.norm_eps


@jax.jit
def _lens_logits(directions, scale, table, eps):
    d = directions.astype(jnp.float32)
    d = d * jax.lax.rsqrt(jnp.mean(d * d, axis=-1, keepdims=True) + eps) * scale
    return d @ table.astype(jnp.float32).T


def direction_logits(model: Gemma3LM, directions) -> jax.Array:
    """Logits [n, vocab] of directions [n, d_model] after the final RMSNorm and the unembedding.

    Gemma 2's final soft-cap (``cap * tanh(logits / cap)``) is applied as the model applies it; it
    keeps the order of the logits.
    """
    scale, table, eps = unembedding_readout(model)
    logits = _lens_logits(jnp.atleast_2d(jnp.asarray(directions)), scale, table, eps)
    cap = getattr(getattr(model, "config", None), "final_logit_softcap", None)
    return logits if cap is None else cap * jnp.tanh(logits / cap)


def logit_lens(
    model: Gemma3LM, sae: pz.nn.Layer, features: int | Sequence[int], k: int = 10
) -> list[LensResult]:
    """Top/bottom-k tokens of each feature's decoder row (one batched, jitted readout)."""
    ids = [features] if isinstance(features, int | np.integer) else list(features)
    w_dec = jnp.asarray(sae.to_arrays()["w_dec"])
    bad = [int(i) for i in ids if not 0 <= int(i) < w_dec.shape[0]]
    if bad:  # jnp indexing would silently clamp (or wrap negative ids)
        raise ValueError(f"logit_lens: features {bad} are outside 0..{w_dec.shape[0] - 1}")
    if w_dec.shape[-1] != model.config.d_model:
        raise ValueError(
            f"Logit lens needs a decoder writing to the residual stream (d_model={model.config.d_model}); "
            f"this dictionary decodes to width {w_dec.shape[-1]}"
        )
    logits = direction_logits(model, w_dec[jnp.asarray(ids)])
    top_v, top_i = jax.lax.top_k(logits, k)
    bot_v, bot_i = jax.lax.top_k(-logits, k)
    results = []
    for row, feature in enumerate(ids):
        top = [(int(i), float(v)) for i, v in zip(top_i[row], top_v[row])]
        bottom = [(int(i), float(-v)) for i, v in zip(bot_i[row], bot_v[row])]
        results.append(LensResult(int(feature), top, bottom))
    return results
