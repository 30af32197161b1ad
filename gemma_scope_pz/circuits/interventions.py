"""Interventions from a graph: set or ablate transcoder features and rerun the model.

The real model runs; at each layer the chosen features' activations are read from the current
MLP input, and ``(new - current) * w_dec`` is added to the MLP output of every layer the feature
writes to (as circuit-tracer's ``feature_intervention``). Setting a feature to 0 ablates it;
setting it to a large value steers with it. ``freeze_attention`` keeps the prompt's attention
patterns (the graph's setting), otherwise attention is recomputed.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_scope_pz.circuits import replacement as rep
from gemma_scope_pz.circuits.transcoders import TranscoderStack, as_transcoder_stack

__all__ = ["intervene"]


def _attention(parts: rep.BlockParts, h, side, pattern):
    attn = parts.attention
    if pattern is None:
        pattern = attn.query_key_to_attn(
            (attn.input_to_query(h, **side), attn.input_to_key(h, **side)), **side
        )
    return attn.attn_value_to_output((pattern, attn.input_to_value(h, **side)), **side)


@functools.partial(jax.jit, static_argnames="freeze")
def _run(model, stack: TranscoderStack, trace, tokens, edits, freeze: bool):
    before, blocks, after = rep._body_parts(model)
    side = {"token_positions": trace.positions}
    x = pz.nx.wrap(tokens[None]).tag("batch", "seq")
    for layer in before:
        x = layer(x, **side)
    pending = jnp.zeros((stack.n_layers, tokens.shape[0], x.named_shape["embedding"]))
    for layer, block in enumerate(blocks):
        parts = rep.block_parts(block)
        h = parts.pre_attention_norm(x)
        pattern = trace.patterns[layer] if freeze else None
        x = x + parts.post_attention_norm(_attention(parts, h, side, pattern))
        m_in = parts.pre_ffw_norm(x)
        for s, (pos, latent, value) in edits.items():
            if stack.layers[s] != layer:
                continue
            current = stack.encode(s, rep._plain(m_in))[pos, latent]
            delta = (value - current)[:, None, None] * stack.w_dec[s][latent]
            for t, target in enumerate(stack.targets(s)):
                pending = pending.at[target, pos].add(delta[:, t])
        x = x + parts.post_ffw_norm(parts.mlp(m_in)) + rep._named(pending[layer])
    logits = rep._to_logits(after, after[0](x, **side), side)
    return logits.unwrap("batch", "seq", "vocabulary")[0]


def _edits(stack: TranscoderStack, features: Mapping) -> dict[int, tuple]:
    by_source: dict[int, list] = {}
    for key, value in features.items():
        layer, pos, latent = (int(v) for v in key)
        if layer not in stack.layers:
            raise ValueError(f"feature {key}: layer {layer} has no transcoder")
        s = stack.layers.index(layer)
        if not 0 <= latent < stack.w_enc[s].shape[1]:
            raise ValueError(
                f"feature {key}: latent {latent} outside 0..{stack.w_enc[s].shape[1] - 1}"
            )
        by_source.setdefault(s, []).append((pos, latent, float(value)))
    return {
        s: tuple(jnp.asarray(np.array(col), dtype) for col, dtype in
                 zip(zip(*rows, strict=True), (jnp.int32, jnp.int32, jnp.float32), strict=True))
        for s, rows in by_source.items()
    }  # fmt: skip


def intervene(
    model,
    transcoders: Any,
    prompt: Any,
    features: Mapping[tuple[int, int, int], float],
    *,
    freeze_attention: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(logits with the features set, original logits), each [seq, vocabulary].

    Args:
      model: A `Gemma3LM`.
      transcoders: As for `attribution.attribute`.
      prompt: Text or 1-D token ids (see `replacement.prompt_tokens`).
      features: ``{(layer, position, latent): value}``; 0 ablates, larger values steer.
      freeze_attention: Keep the prompt's attention patterns instead of recomputing them.
    """
    stack = as_transcoder_stack(transcoders, model.config.n_layers)
    tokens = rep.prompt_tokens(model, prompt)
    trace = rep.trace_prompt(model, tokens)
    seq = trace.positions.named_shape["seq"]
    for layer, pos, latent in features:
        if not 0 <= int(pos) < seq:
            raise ValueError(f"feature {(layer, pos, latent)}: position outside 0..{seq - 1}")
    edits = _edits(stack, features)
    new = _run(
        pz.freeze_params(model), stack, trace, jnp.asarray(tokens, jnp.int32), edits,
        freeze_attention,
    )  # fmt: skip
    return new, trace.logits.unwrap("batch", "seq", "vocabulary")[0]
