"""KV-cached, fully jitted generation: greedy, temperature, top-k and nucleus (top-p) sampling.

The model is switched to penzai's ``KVCachingTransformerLM`` (so any layer attached at a site, such as
a steering vector or a spliced SAE, also runs during decoding), its state variables are unbound, and
prefill plus the whole decode loop run in one ``jax.jit`` with ``lax.fori_loop``.
Prompts of different lengths are left-padded with the pad token; pad positions get position -1 and are
masked out of attention, so each row generates exactly as it would alone. Prompt lengths and step
counts are bucketed (``models.inputs.bucket_length``) so that new lengths do not recompile.
The unbound sampler of a model is built once per cache shape and remembered while the model lives
(``models.stateful.per_model``), and enters the jitted program as a flat list of arrays with its
structure static, so a call does no walk over the model's tree.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer.sampling_mode import KVCachingTransformerLM

from gemma_scope_pz.models.gemma3 import Gemma3LM, check_token_ids, vocab_size_of
from gemma_scope_pz.models.inputs import as_token_batch, bucket_length, pad_columns
from gemma_scope_pz.models.stateful import model_state_variables, per_model
from gemma_scope_pz.parallel.shard import batch_on_mesh


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
        # the min of the top-k values, not values[..., -1:]: XLA:CPU lowers that slice to a full
        # sort of the vocabulary (63 ms instead of 0.7 ms per step for 262k logits here)
        kth = jnp.min(jax.lax.top_k(logits, config.top_k)[0], axis=-1, keepdims=True)
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


@dataclasses.dataclass(frozen=True)
class _Sampler:
    """A model's KV-caching sampler for one cache shape, unbound, as `_generate` takes it.

    Attributes:
      treedef: The structure of the sampler (parameters frozen, variables replaced by slots).
      leaves: Its leaves (the model's arrays), in ``treedef`` order.
      variables: The unbound variables: the sampler's KV caches and positions (never written:
        `_generate` only reads their initial values) and any state variable the model holds.
    """

    treedef: Any
    leaves: tuple[Any, ...]
    variables: tuple[pz.StateVariable, ...]


# A remembered sampler holds its zero KV caches; larger ones are rebuilt per call instead.
_KEEP_STATE_BYTES = 64 * 2**20


def _sampler(model: Gemma3LM, cache_len: int, batch: int, pad_id: int) -> _Sampler:
    """The unbound sampler of ``model`` for ``[batch, cache_len]`` (remembered per model)."""

    def build() -> _Sampler:
        sampler = KVCachingTransformerLM.from_uncached(
            model, cache_len=cache_len, batch_axes={"batch": batch}, pad_id=pad_id
        )
        sampler_def, variables = pz.unbind_state_vars(pz.freeze_params(sampler))
        leaves, treedef = jax.tree_util.tree_flatten(sampler_def)
        return _Sampler(treedef, tuple(leaves), tuple(variables))

    def small(sampler: _Sampler) -> bool:
        values = [v.value for v in sampler.variables]
        return sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(values)) <= (
            _KEEP_STATE_BYTES
        )

    return per_model(model, ("sampler", cache_len, batch, pad_id), build, remember=small)


@functools.partial(jax.jit, static_argnames=("treedef", "capacity", "config", "stop_token"))
def _generate(
    treedef, leaves, state, user_state, prompt, key, n_steps, capacity, config, stop_token
):
    # ``capacity`` (static) sizes the output; ``n_steps`` (traced) is how many tokens to make, so
    # one compiled program serves every count up to ``capacity``; the loop also ends once every
    # row has produced ``stop_token``.
    # ``state``: the sampler's own variables (KV caches), carried through the loop. ``user_state``:
    # variables the user's model holds (models/stateful.py); they keep the prompt pass's values.
    sampler_def = jax.tree_util.tree_unflatten(treedef, leaves)

    def run(state, tokens):
        variables = [v.unfreeze_as_copy() for v in (*state, *user_state)]
        sampler = pz.bind_variables(sampler_def, variables)
        logits = sampler(pz.nx.wrap(tokens).tag("batch", "seq"))
        frozen = [v.freeze() for v in variables]
        return logits.unwrap("batch", "seq", "vocabulary")[:, -1], frozen[: len(state)], frozen

    batch = prompt.shape[0]
    logits, state, prompt_pass = run(state, prompt)
    user_after = prompt_pass[len(state) :]
    key, sub = jax.random.split(key)
    first = choose(logits, config, sub)
    out = jnp.zeros((batch, capacity), jnp.int32).at[:, 0].set(first)
    done = first == stop_token if stop_token is not None else jnp.zeros((batch,), bool)

    def step(carry):
        i, out, state, key, done = carry
        logits, state, _ = run(state, jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1))
        key, sub = jax.random.split(key)
        nxt = choose(logits, config, sub)
        if stop_token is not None:
            nxt = jnp.where(done, 0, nxt)
            done = done | (nxt == stop_token)
        return i + 1, out.at[:, i].set(nxt), state, key, done

    def more(carry):
        i, done = carry[0], carry[-1]
        return (i < n_steps) & ~jnp.all(done)

    carry = (jnp.asarray(1, jnp.int32), out, state, key, done)
    out = jax.lax.while_loop(more, step, carry)[1]
    return out, user_after


def generate(
    model: Gemma3LM,
    prompts: Any,
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_token: int | None = 1,
    pad_id: int = 0,
    bucket: bool = True,
) -> list[list[int]]:
    """Continues each prompt by up to ``max_new_tokens`` tokens; returns the new tokens per prompt.

    ``prompts`` is anything ``models.inputs.as_token_batch`` accepts: a string or list of strings
    (the model's tokenizer, BOS added), ids, ragged lists of ids (left-padded here), or a
    left-padded int array. Generation of a row stops after ``stop_token`` (default EOS = 1;
    included in the output; None disables; the loop ends early once every row has stopped).
    With ``bucket`` the prompt length and the room for new tokens are rounded up to a few shapes
    (extra prompt columns are masked padding; the step count is a traced value, so no step is
    wasted), so new lengths reuse compiled code and the tokens are the same.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    prompt, _ = as_token_batch(prompts, model, pad_side="left", pad_id=pad_id)
    prompt = check_token_ids(prompt, vocab_size_of(model), what="prompts")
    held = model_state_variables(model)  # no bucketing then: the variables record the real prompt
    prompt, steps = _bucketed(model, prompt, max_new_tokens, pad_id, bucket and not held)
    sampler = _sampler(model, prompt.shape[1] + steps, prompt.shape[0], pad_id)
    user = [v for v in sampler.variables if any(v is h for h in held)]
    state = [v.freeze() for v in sampler.variables if not any(v is h for h in held)]
    out, user_after = _generate(
        sampler.treedef,
        sampler.leaves,
        state,
        [v.freeze() for v in user],
        batch_on_mesh(jnp.asarray(prompt), sampler.leaves),
        jax.random.key(seed),
        jnp.asarray(max_new_tokens, jnp.int32),
        steps,
        config,
        stop_token,
    )
    for var, value in zip(user, user_after):
        var.update(value)  # as after a direct call of the model on the prompt batch
    results = []
    for row in np.asarray(out)[:, :max_new_tokens]:
        row = row.tolist()
        if stop_token is not None and stop_token in row:
            row = row[: row.index(stop_token) + 1]
        results.append(row)
    return results


def _bucketed(
    model: Gemma3LM, prompt: np.ndarray, max_new_tokens: int, pad_id: int, bucket: bool
) -> tuple[np.ndarray, int]:
    """(prompt left-padded to its bucket, room for new tokens), within the model's context."""
    length = prompt.shape[1]
    limit = getattr(getattr(model, "config", None), "max_seq_len", None)
    if limit is not None and length + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({length}) + max_new_tokens exceeds the model's {limit} positions"
        )
    if not bucket:
        return prompt, max_new_tokens
    width, steps = bucket_length(length), bucket_length(max_new_tokens)
    if limit is not None and width + steps > limit:
        return prompt, max_new_tokens
    return pad_columns(prompt, width, pad_id, side="left"), steps
