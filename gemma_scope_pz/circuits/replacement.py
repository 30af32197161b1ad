"""The local replacement model of Gemma 3 for one prompt.

A real forward pass (`trace_prompt`) records, on the prompt, every attention pattern, every RMSNorm
scale ``1/rms`` and every MLP input and output. With those frozen, the map from the residual
stream to the MLP inputs and to the final normed residual is linear. The MLP of layer ``L`` is
replaced by its transcoder's features plus an error node
``error_L = mlp_out_L - (decoded features + b_dec + skip(mlp_in_L))``, so the replacement
reproduces the model exactly; a layer without a transcoder has its whole MLP output as error.

`linear_forward` runs that frozen linear model: inputs are the scaled token embeddings
("resid_0") and, per layer, what is added at ``mlp_out`` besides the skip; outputs are every
layer's ``mlp_in`` and the final normed residual. `replacement_logits` runs the replacement
model itself (transcoder features recomputed from the frozen model's MLP inputs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer.model_parts import TransformerBlock

from gemma_scope_pz.circuits.transcoders import TranscoderStack, as_transcoder_stack
from gemma_scope_pz.models import stateful
from gemma_scope_pz.models.inputs import as_token_batch
from gemma_scope_pz.models.token_ids import check_token_ids

__all__ = [
    "BlockParts",
    "PromptTrace",
    "block_parts",
    "linear_forward",
    "prompt_tokens",
    "replacement_logits",
    "trace_prompt",
]


@dataclasses.dataclass(frozen=True)
class BlockParts:
    """The sublayers of one Gemma 3 decoder block, in the order they run."""

    pre_attention_norm: pz.nn.Layer
    attention: pz.nn.Attention
    post_attention_norm: pz.nn.Layer
    pre_ffw_norm: pz.nn.Layer
    mlp: pz.nn.Layer
    post_ffw_norm: pz.nn.Layer


def block_parts(block: TransformerBlock) -> BlockParts:
    """Splits a block built by ``models.builder`` into its six sublayers."""
    attn_res, mlp_res = block.sublayers
    pre_a, attn, post_a = attn_res.delta.sublayers
    pre_f, mlp, post_f = mlp_res.delta.sublayers
    return BlockParts(pre_a, attn, post_a, pre_f, mlp, post_f)


def _norm_pieces(group: pz.nn.Layer) -> tuple[pz.nn.RMSStandardize, pz.nn.Layer]:
    """(standardize, scale) of a NamedGroup([RMSLayerNorm([RMSStandardize, Linear])])."""
    norm = pz.select(group).at_instances_of(pz.nn.RMSLayerNorm).get()
    standardize, scale = norm.sublayers
    return standardize, scale


def _inv_rms(group: pz.nn.Layer, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """``1 / sqrt(mean(x^2) + eps)`` over "embedding", as the norm's RMSStandardize computes it."""
    standardize, _ = _norm_pieces(group)
    eps = standardize.epsilon
    return pz.nx.nmap(lambda v: jax.lax.rsqrt(jnp.mean(jnp.square(v)) + eps))(x.untag("embedding"))


def _frozen_norm(group: pz.nn.Layer, x: pz.nx.NamedArray, inv: pz.nx.NamedArray):
    """The norm with its ``1/rms`` fixed to ``inv`` (linear in ``x``)."""
    _, scale = _norm_pieces(group)
    return scale(x * inv)


def _body_parts(model) -> tuple[list, list[TransformerBlock], list]:
    """(layers before the first block, blocks, layers after the last block) of ``model.body``."""
    layers = list(model.body.sublayers)
    idx = [i for i, layer in enumerate(layers) if isinstance(layer, TransformerBlock)]
    return layers[: idx[0]], layers[idx[0] : idx[-1] + 1], layers[idx[-1] + 1 :]


def _to_logits(after: list, final: pz.nx.NamedArray, side: dict) -> pz.nx.NamedArray:
    """The layers after the final norm (the unembedding, and a soft-cap where there is one)."""
    for layer in after[1:]:
        final = layer(final, **side)
    return final


@pz.pytree_dataclass
class PromptTrace(pz.Struct):
    """What the frozen replacement model keeps from the real forward pass on one prompt.

    Arrays carry a leading length-1 "batch" and a "seq" axis (named arrays).

    Attributes:
      resid_0: Scaled token embeddings, axes (batch, seq, embedding).
      patterns: Per layer, the attention pattern (batch, seq, kv_seq, heads...).
      inv_rms: Per layer, ``1/rms`` of its four norms (pre/post attention, pre/post FFW).
      final_inv_rms: ``1/rms`` of the final norm.
      mlp_in: Per layer, the MLP input (output of the pre-FFW norm).
      mlp_out: Per layer, the MLP output (output of the post-FFW norm).
      logits: The model's logits (batch, seq, vocabulary).
      positions: Token positions (batch, seq).
    """

    resid_0: pz.nx.NamedArray
    patterns: list[pz.nx.NamedArray]
    inv_rms: list[tuple[pz.nx.NamedArray, ...]]
    final_inv_rms: pz.nx.NamedArray
    mlp_in: list[pz.nx.NamedArray]
    mlp_out: list[pz.nx.NamedArray]
    logits: pz.nx.NamedArray
    positions: pz.nx.NamedArray


def _trace_block(parts: BlockParts, x, side: dict[str, Any]):
    inv_pa = _inv_rms(parts.pre_attention_norm, x)
    h = parts.pre_attention_norm(x)
    attn = parts.attention
    query = attn.input_to_query(h, **side)
    key = attn.input_to_key(h, **side)
    pattern = attn.query_key_to_attn((query, key), **side)
    a = attn.attn_value_to_output((pattern, attn.input_to_value(h, **side)), **side)
    inv_qa = _inv_rms(parts.post_attention_norm, a)
    x = x + parts.post_attention_norm(a)
    inv_pf = _inv_rms(parts.pre_ffw_norm, x)
    m_in = parts.pre_ffw_norm(x)
    m = parts.mlp(m_in)
    inv_qf = _inv_rms(parts.post_ffw_norm, m)
    m_out = parts.post_ffw_norm(m)
    return x + m_out, pattern, (inv_pa, inv_qa, inv_pf, inv_qf), m_in, m_out


@stateful.jit
def _trace(model, tokens: jax.Array) -> PromptTrace:
    before, blocks, after = _body_parts(model)
    named = pz.nx.wrap(tokens[None]).tag("batch", "seq")
    positions = pz.nx.wrap(jnp.arange(tokens.shape[0], dtype=jnp.int32)[None]).tag("batch", "seq")
    side = {"token_positions": positions}
    x = named
    for layer in before:
        x = layer(x, **side)
    resid_0, patterns, invs, m_ins, m_outs = x, [], [], [], []
    for block in blocks:
        x, pattern, inv, m_in, m_out = _trace_block(block_parts(block), x, side)
        patterns.append(pattern)
        invs.append(inv)
        m_ins.append(m_in)
        m_outs.append(m_out)
    final_inv = _inv_rms(after[0], x)
    logits = _to_logits(after, after[0](x, **side), side)
    return PromptTrace(resid_0, patterns, invs, final_inv, m_ins, m_outs, logits, positions)


def prompt_tokens(model, prompt: Any) -> np.ndarray:
    """One prompt as 1-D token ids: a string (the model's tokenizer, BOS added) or ids."""
    if isinstance(prompt, str):
        batch, _ = as_token_batch(prompt, model)
        prompt = batch[0]
    tokens = np.asarray(prompt)
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1 or tokens.shape[0] == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"a prompt must be a string or a non-empty 1-D array of token ids, got {tokens.dtype} "
            f"of shape {tokens.shape}"
        )
    return check_token_ids(tokens[None], model.config.vocab_size)[0].astype(np.int32)


def trace_prompt(model, prompt: Any) -> PromptTrace:
    """Runs ``model`` on one prompt (`prompt_tokens`) and records what the freeze needs."""
    return _trace(pz.freeze_params(model), jnp.asarray(prompt_tokens(model, prompt)))


def _frozen_block_to_mlp_in(parts: BlockParts, trace: PromptTrace, layer: int, x):
    """Residual after attention and the MLP input of ``layer``, attention and norms frozen."""
    inv_pa, inv_qa, inv_pf, _ = trace.inv_rms[layer]
    side = {"token_positions": trace.positions}
    h = _frozen_norm(parts.pre_attention_norm, x, inv_pa)
    value = parts.attention.input_to_value(h, **side)
    a = parts.attention.attn_value_to_output((trace.patterns[layer], value), **side)
    x = x + _frozen_norm(parts.post_attention_norm, a, inv_qa)
    return x, _frozen_norm(parts.pre_ffw_norm, x, inv_pf)


def _skip_named(stack: TranscoderStack, layer: int, m_in: pz.nx.NamedArray):
    return pz.nx.nmap(lambda v: stack.skip_at(layer, v))(m_in.untag("embedding")).tag("embedding")


def linear_forward(model, stack: TranscoderStack, trace: PromptTrace, resid_0, injections):
    """The frozen linear model: (resid_0, per-layer mlp_out injections) -> (mlp_ins, final).

    Args:
      model: The Gemma3LM the trace was recorded on.
      stack: Transcoders (their skips are part of the linear model).
      trace: The recorded prompt (`trace_prompt`).
      resid_0: Named (batch, seq, embedding): what enters block 0.
      injections: Per layer, named (batch, seq, embedding): added at ``mlp_out`` of the layer on
        top of the transcoder skip (decoded features + b_dec + error for the real prompt).

    Returns:
      (list of every layer's MLP input, the final normed residual), named arrays.
    """
    _, blocks, after = _body_parts(model)
    x, m_ins = resid_0, []
    for layer, block in enumerate(blocks):
        x, m_in = _frozen_block_to_mlp_in(block_parts(block), trace, layer, x)
        m_ins.append(m_in)
        x = x + _skip_named(stack, layer, m_in) + injections[layer]
    final = _frozen_norm(after[0], x, trace.final_inv_rms)
    return m_ins, final


def _plain(x: pz.nx.NamedArray) -> jax.Array:
    return x.unwrap("batch", "seq", "embedding")[0]


def _named(x: jax.Array) -> pz.nx.NamedArray:
    return pz.nx.wrap(x[None]).tag("batch", "seq", "embedding")


@jax.jit
def _replacement_logits(model, stack: TranscoderStack, trace: PromptTrace):
    _, blocks, after = _body_parts(model)
    x, latents = trace.resid_0, []
    for layer, block in enumerate(blocks):
        x, m_in = _frozen_block_to_mlp_in(block_parts(block), trace, layer, x)
        m_in_plain = _plain(m_in)
        for s, source in enumerate(stack.layers):
            if source == layer:
                latents.append((s, stack.encode(s, m_in_plain)))
        out = stack.skip_at(layer, m_in_plain)
        if stack.covered[layer]:
            decoded = stack.decode_to(layer, [f for _, f in latents])
            error = (
                _plain(trace.mlp_out[layer])
                - decoded
                - stack.skip_at(layer, _plain(trace.mlp_in[layer]))
            )
            out = out + decoded + jax.lax.stop_gradient(error)
        else:
            out = out + _plain(trace.mlp_out[layer])
        x = x + _named(out)
    final = _frozen_norm(after[0], x, trace.final_inv_rms)
    side = {"token_positions": trace.positions}
    return _to_logits(after, final, side).unwrap("batch", "seq", "vocabulary")[0]


def replacement_logits(model, transcoders: Any, tokens: Any) -> tuple[jax.Array, jax.Array]:
    """(replacement-model logits, model logits), each [seq, vocabulary], for one prompt.

    The replacement runs every MLP as its transcoder (features recomputed from the frozen
    model's MLP input) plus the recorded error node; attention patterns and norm scales are
    frozen at their values on the prompt. With error nodes the two agree to float precision.
    """
    stack = as_transcoder_stack(transcoders, model.config.n_layers)
    trace = trace_prompt(model, tokens)
    frozen = pz.freeze_params(model)
    return _replacement_logits(frozen, stack, trace), trace.logits.unwrap(
        "batch", "seq", "vocabulary"
    )[0]
