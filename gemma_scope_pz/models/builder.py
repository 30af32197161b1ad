"""Builds Gemma 3's (and Gemma 2's) Penzai layer tree from canonical parameters.

The tree is made of penzai's own layers. Gemma 2 differs only where its config says so: no
QK-norm (``config.qk_norm``), ``pz.nn.TanhSoftCap`` on the attention logits before the mask
and on the output logits (``attn_logit_softcap`` / ``final_logit_softcap``).

``build_body`` lays the tree out so that every place an interpretability tool attaches to has a
name (see ``models.gemma3`` for the picture); ``Gemma3LM.from_params`` wraps the result.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts
from penzai.models.transformer.model_parts import TransformerBlock, TransformerFeedForward

from gemma_scope_pz.models.config import Gemma3Config

__all__ = ["ScaledRoPE", "build_body", "head_axes"]

# The value masked attention logits are replaced with (finite, so fully-masked pad rows stay finite).
_MASKED_OUT = -2.3819763e38


@pz.pytree_dataclass
class ScaledRoPE(pz.nn.Layer):
    """Rotary position embedding (rotate-half form) with linear position scaling.

    Attributes:
      embedding_axis: Axis holding the per-head vector ("projection").
      max_wavelength: RoPE base (10,000 on local layers, 1,000,000 on global ones).
      position_scale: Positions are divided by this (8 on global layers of Gemma 3 4b and larger).
      positions_input_name: Side input holding integer token positions.
    """

    embedding_axis: str = dataclasses.field(metadata={"pytree_node": False})
    max_wavelength: float = dataclasses.field(metadata={"pytree_node": False})
    position_scale: float = dataclasses.field(default=1.0, metadata={"pytree_node": False})
    positions_input_name: str = dataclasses.field(
        default="token_positions", metadata={"pytree_node": False}
    )

    def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
        positions = side_inputs[self.positions_input_name]
        head_dim = x.named_shape[self.embedding_axis]
        inv_freq = self.max_wavelength ** (
            -jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
        )

        def rotate(vec, pos):
            angle = (pos.astype(jnp.float32) / self.position_scale) * inv_freq
            sin, cos = jnp.sin(angle), jnp.cos(angle)
            first, second = jnp.split(vec.astype(jnp.float32), 2)
            out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin])
            return out.astype(vec.dtype)

        return pz.nx.nmap(rotate)(x.untag(self.embedding_axis), positions).tag(self.embedding_axis)


def _param(label: str, array: np.ndarray, axes: tuple[str, ...], dtype) -> pz.Parameter:
    value = pz.nx.wrap(jnp.asarray(array, dtype=dtype)).tag(*axes)
    return pz.Parameter(value=value, label=label)


def _linear(label, array, in_axes, out_axes, dtype, parallel_axes=()) -> pz.nn.Linear:
    return pz.nn.Linear(
        weights=_param(label, array, (*in_axes, *parallel_axes, *out_axes), dtype),
        in_axis_names=tuple(in_axes),
        out_axis_names=tuple(out_axes),
    )


def _rms_norm(label: str, scale: np.ndarray, axis: str, eps: float, dtype) -> pz.nn.RMSLayerNorm:
    return pz.nn.RMSLayerNorm(
        [
            pz.nn.RMSStandardize(across=(axis,), epsilon=jnp.asarray(eps, dtype=dtype)),
            pz.nn.Linear(
                weights=_param(f"{label}.scale", scale, (axis,), dtype),
                in_axis_names=(),
                out_axis_names=(),
            ),
        ]
    )


def head_axes(config: Gemma3Config) -> tuple[dict[str, int], dict[str, int]]:
    """(axes shared by queries/keys/values, axes only queries have), as in penzai's llama-likes."""
    mult = config.n_heads // config.n_kv_heads
    if mult == 1:
        return {"heads": config.n_heads}, {}
    if config.n_kv_heads == 1:
        return {}, {"query_heads": mult}
    return {"head_groups": config.n_kv_heads}, {"query_heads": mult}


def _split_query_heads(config: Gemma3Config, q: np.ndarray, axis: int) -> np.ndarray:
    """Reshapes a flat query-head axis into (kv group, query head) when both exist."""
    common, query_only = head_axes(config)
    if common and query_only:
        shape = list(q.shape)
        shape[axis : axis + 1] = [config.n_kv_heads, config.n_heads // config.n_kv_heads]
        return q.reshape(shape)
    return q


def _rope(config: Gemma3Config, i: int) -> ScaledRoPE:
    glob = config.is_global(i)
    return ScaledRoPE(
        embedding_axis="projection",
        max_wavelength=config.global_rope_base if glob else config.local_rope_base,
        position_scale=config.global_rope_scale if glob else 1.0,
    )


def _attention_scores(config: Gemma3Config, i: int, act_dtype) -> pz.nn.Sequential:
    """Query·key logits, the (sliding-window) causal mask and the softmax over "kv_seq"."""
    common, query_only = head_axes(config)
    einsum_common = {name: name[:2] for name in common}
    einsum_q = {name: name[:2] for name in query_only}
    masked = jnp.array(_MASKED_OUT, dtype=act_dtype)
    softcap = []
    if config.attn_logit_softcap is not None:
        softcap = [pz.nn.TanhSoftCap(soft_cap=jnp.array(config.attn_logit_softcap, act_dtype))]
    if config.is_global(i):
        masker = pz.nn.ApplyCausalAttentionMask(masked_out_value=masked)
    else:
        masker = pz.nn.ApplyCausalSlidingWindowAttentionMask(
            sliding_window_size=config.sliding_window, masked_out_value=masked
        )
    return pz.nn.Sequential(
        [
            pz.nn.NamedEinsum(
                (
                    {"seq": "tq", **einsum_common, **einsum_q, "projection": "p"},
                    {"seq": "tkv", **einsum_common, "projection": "p"},
                ),
                {"seq": "tq", **einsum_common, **einsum_q, "kv_seq": "tkv"},
            ),
            *softcap,
            masker,
            pz.nn.Softmax("kv_seq"),
        ]
    )


def _attention_output(config: Gemma3Config, i: int, p: dict, dtype) -> pz.nn.Sequential:
    """Attention-weighted values, then the output projection in ``NamedGroup("attention_output")``."""
    common, query_only = head_axes(config)
    einsum_common = {name: name[:2] for name in common}
    einsum_q = {name: name[:2] for name in query_only}
    output_w = _split_query_heads(config, p[f"blocks.{i}.attn.output"], 0)
    output = _linear(
        f"blocks.{i}.attention.output",
        output_w,
        (*common, *query_only, "projection"),
        ("embedding",),
        dtype,
    )
    return pz.nn.Sequential(
        [
            pz.nn.NamedEinsum(
                (
                    {"seq": "tq", **einsum_common, **einsum_q, "kv_seq": "tkv"},
                    {"seq": "tkv", **einsum_common, "projection": "p"},
                ),
                {"seq": "tq", **einsum_common, **einsum_q, "projection": "p"},
            ),
            pz.nn.NamedGroup("attention_output", [output]),
        ]
    )


def _attention(config: Gemma3Config, i: int, p: dict, dtype, act_dtype) -> pz.nn.Attention:
    pre, name = f"blocks.{i}.attn.", f"blocks.{i}.attention"
    common, query_only = head_axes(config)
    q_heads, kv_heads = (*common, *query_only), tuple(common)
    kv = p[pre + "key"], p[pre + "value"]
    if not kv_heads:  # multi-query: a single key/value head
        kv = tuple(a[:, 0, :] for a in kv)
    query_w = _split_query_heads(config, p[pre + "query"], 1)
    eps = config.norm_eps

    def norm(kind: str) -> list[pz.nn.RMSLayerNorm]:
        if not config.qk_norm:  # Gemma 2
            return []
        return [_rms_norm(f"{name}.{kind}", p[pre + kind], "projection", eps, dtype)]

    return pz.nn.Attention(
        input_to_query=pz.nn.Sequential(
            [
                _linear(f"{name}.query", query_w, ("embedding",), (*q_heads, "projection"), dtype),
                *norm("query_norm"),
                _rope(config, i),
                pz.nn.ConstantRescale(by=jnp.array(config.query_scale, dtype=act_dtype)),
            ]
        ),
        input_to_key=pz.nn.Sequential(
            [
                _linear(f"{name}.key", kv[0], ("embedding",), (*kv_heads, "projection"), dtype),
                *norm("key_norm"),
                _rope(config, i),
            ]
        ),
        input_to_value=pz.nn.Sequential(
            [_linear(f"{name}.value", kv[1], ("embedding",), (*kv_heads, "projection"), dtype)]
        ),
        query_key_to_attn=_attention_scores(config, i, act_dtype),
        attn_value_to_output=_attention_output(config, i, p, dtype),
    )


def _mlp(config: Gemma3Config, i: int, p: dict, dtype) -> TransformerFeedForward:
    pre, name = f"blocks.{i}.mlp.", f"blocks.{i}.mlp"
    gelu = functools.partial(jax.nn.gelu, approximate=True)
    return TransformerFeedForward(
        [
            pz.nn.BranchAndMultiplyTogether(
                branches=[
                    pz.nn.NamedGroup(
                        "gate",
                        [
                            _linear(
                                f"{name}.gate", p[pre + "gate"], ("embedding",), ("neurons",), dtype
                            ),
                            pz.nn.Elementwise(gelu),
                        ],
                    ),
                    _linear(f"{name}.up", p[pre + "up"], ("embedding",), ("neurons",), dtype),
                ]
            ),
            _linear(f"{name}.down", p[pre + "down"], ("neurons",), ("embedding",), dtype),
        ]
    )


def _block(config: Gemma3Config, i: int, p: dict, dtype, act_dtype) -> TransformerBlock:
    def norm(kind: str) -> pz.nn.NamedGroup:
        layer = _rms_norm(
            f"blocks.{i}.{kind}", p[f"blocks.{i}.{kind}"], "embedding", config.norm_eps, dtype
        )
        return pz.nn.NamedGroup(kind, [layer])

    return TransformerBlock(
        sublayers=[
            pz.nn.Residual(
                pz.nn.Sequential(
                    [
                        norm("pre_attention_norm"),
                        _attention(config, i, p, dtype, act_dtype),
                        norm("post_attention_norm"),
                    ]
                )
            ),
            pz.nn.Residual(
                pz.nn.Sequential(
                    [
                        norm("pre_ffw_norm"),
                        _mlp(config, i, p, dtype),
                        norm("post_ffw_norm"),
                    ]
                )
            ),
        ]
    )


def build_body(
    config: Gemma3Config, p: dict[str, np.ndarray], dtype, act_dtype
) -> tuple[pz.nn.Sequential, model_parts.TransformerMetadata]:
    """The model body (embedding, blocks, final norm, unembedding) and its metadata."""
    table = pz.nn.EmbeddingTable(
        embeddings=_param("embedding", p["embedding"], ("vocabulary", "embedding"), dtype),
        vocabulary_axis="vocabulary",
    )
    sublayers: list[pz.nn.Layer] = [pz.nn.EmbeddingLookup(table)]
    if act_dtype != dtype:
        sublayers.append(pz.nn.CastToDType(act_dtype))
    sublayers.append(pz.nn.ConstantRescale(by=jnp.sqrt(config.d_model).astype(act_dtype)))
    sublayers += [_block(config, i, p, dtype, act_dtype) for i in range(config.n_layers)]
    sublayers.append(
        pz.nn.NamedGroup(
            "final_norm",
            [_rms_norm("final_norm", p["final_norm"], "embedding", config.norm_eps, dtype)],
        )
    )
    sublayers.append(pz.nn.EmbeddingDecode(table))
    if config.final_logit_softcap is not None:
        cap = jnp.array(config.final_logit_softcap, dtype=act_dtype)
        sublayers.append(pz.nn.TanhSoftCap(soft_cap=cap))
    common, query_only = head_axes(config)
    metadata = model_parts.TransformerMetadata(
        common_head_axes=common,
        query_only_head_axes=query_only,
        embedding_dim=config.d_model,
        projection_dim=config.head_dim,
        mlp_hidden_dim=config.d_ff,
        vocab_size=config.vocab_size,
        activation_dtype=act_dtype,
    )
    return pz.nn.Sequential(sublayers), metadata
