"""KV-cached, fully jitted generation: greedy, temperature, top-k and nucleus (top-p) sampling.

The model is switched to penzai's ``KVCachingTransformerLM`` (so any layer attached at a site, such as
a steering vector or a spliced SAE, also runs during decoding), its state variables are unbound, and
prefill plus the whole decode loop run in one ``jax.jit`` with ``lax.fori_loop``.
Prompts of different lengths are left-padded with the pad token; pad positions get position -1 and are
masked out of attention, so each row generates exactly as it would alone.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer.sampling_mode import KVCachingTransformerLM

from gemma_scope_pz.models.gemma3 import Gemma3LM


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    Attributes:
      temperature: 0 means greedy (argmax).
      top_k: Keep only the k most likely tokens (None: all).
      top_p: Nucleus sampling: keep the smallest set of tokens whose probability mass reaches p.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Temperature-scaled logits [..., vocab] with filtered-out tokens set to -inf."""
    logits = logits.astype(jnp.float32) / max(config.temperature, 1e-6)
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p is not None and config.top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # A token is kept while the mass of strictly more likely tokens is still below p.
        keep_sorted = mass_before < config.top_p
        keep = (
            jnp.zeros_like(keep_sorted)
            .at[tuple(jnp.indices(order.shape)[:-1]) + (order,)]
            .set(keep_sorted)
        )
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def choose(logits: jax.Array, config: SamplingConfig, key: jax.Array) -> jax.Array:
    """Next token ids [...] from logits [..., vocab]."""
    if config.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, config), axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> np.ndarray:
    """Stacks token lists of different lengths into [batch, max_len], padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    out = np.full((len(prompts), width), pad_id, dtype=np.int32)
    for row, prompt in enumerate(prompts):
        out[row, width - len(prompt) :] = prompt
    return out


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "config", "stop_token"))
def _generate(sampler_def, state, prompt, key, max_new_tokens, config, stop_token):
    def run(state, tokens):
        variables = [v.unfreeze_as_copy() for v in state]
        sampler = pz.bind_variables(sampler_def, variables)
        logits = sampler(pz.nx.wrap(tokens).tag("batch", "seq"))
        return logits.unwrap("batch", "seq", "vocabulary")[:, -1], [v.freeze() for v in variables]

    batch = prompt.shape[0]
    logits, state = run(state, prompt)
    key, sub = jax.random.split(key)
    first = choose(logits, config, sub)
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = first == stop_token if stop_token is not None else jnp.zeros((batch,), bool)

    def step(i, carry):
        out, state, key, done = carry
        logits, state = run(state, jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1))
        key, sub = jax.random.split(key)
        nxt = choose(logits, config, sub)
        if stop_token is not None:
            nxt = jnp.where(done, 0, nxt)
            done = done | (nxt == stop_token)
        return out.at[:, i].set(nxt), state, key, done

    out, _, _, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, state, key, done))
    return out


def generate(
    model: Gemma3LM,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_token: int | None = 1,
    pad_id: int = 0,
) -> list[list[int]]:
    """Continues each prompt by up to ``max_new_tokens`` tokens; returns the new tokens per prompt.

    ``prompts`` are token lists (different lengths allowed) or a left-padded int array. Generation of a
    row stops after ``stop_token`` (default EOS = 1; included in the output; None disables).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    if isinstance(prompts, np.ndarray | jax.Array):
        prompt = np.asarray(prompts, dtype=np.int32)
    else:
        prompt = left_pad(prompts, pad_id)
    batch, length = prompt.shape
    cache_len = length + max_new_tokens
    max_len = getattr(getattr(model, "config", None), "max_seq_len", None)
    if max_len is not None and cache_len > max_len:
        raise ValueError(
            f"prompt ({length}) + max_new_tokens exceeds the model's {max_len} positions"
        )
    sampler = KVCachingTransformerLM.from_uncached(
        model, cache_len=cache_len, batch_axes={"batch": batch}, pad_id=pad_id
    )
    sampler_def, variables = pz.unbind_state_vars(pz.freeze_params(sampler))
    state = [v.freeze() for v in variables]
    out = np.asarray(
        _generate(
            sampler_def,
            state,
            jnp.asarray(prompt),
            jax.random.key(seed),
            max_new_tokens,
            config,
            stop_token,
        )
    )
    results = []
    for row in out:
        row = row.tolist()
        if stop_token is not None and stop_token in row:
            row = row[: row.index(stop_token) + 1]
        results.append(row)
    return results
