"""Gemma 3 as a Penzai model, built from penzai's own layers.

The tree is laid out so that every place an interpretability tool attaches to has a name:

    Gemma3LM.body = Sequential([
      EmbeddingLookup, (CastToDType), ConstantRescale(sqrt(d_model)),
      TransformerBlock × n_layers,
      NamedGroup("final_norm", [RMSLayerNorm]),
      EmbeddingDecode,
    ])
    TransformerBlock = [
      Residual(Sequential([NamedGroup("pre_attention_norm"), Attention, NamedGroup("post_attention_norm")])),
      Residual(Sequential([NamedGroup("pre_ffw_norm"), TransformerFeedForward, NamedGroup("post_ffw_norm")])),
    ]
    Attention.attn_value_to_output = Sequential([NamedEinsum, NamedGroup("attention_output", [Linear])])

so ``pz.select(model).at_instances_of(TransformerBlock).pick_nth_selected(9).insert_after(layer)`` works as
in the Gemma Scope 2 tutorial, and ``scope/sites.py`` turns site names into such selections.
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

from gemma_scope_pz.models.config import Gemma3Config, param_shapes

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


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)  # pytype: disable=wrong-keyword-args
class Gemma3LM(model_parts.TransformerLM):
    """A Gemma 3 text decoder: ``model(tokens)`` → logits over "vocabulary".

    Attributes:
      config: The architecture hyper-parameters (static).
    """

    config: Gemma3Config = dataclasses.field(default=None, metadata={"pytree_node": False})

    @classmethod
    def from_params(
        cls,
        config: Gemma3Config,
        params: dict[str, np.ndarray],
        *,
        dtype: jax.typing.DTypeLike = jnp.float32,
        activation_dtype: jax.typing.DTypeLike | None = None,
    ) -> Gemma3LM:
        """Builds the model from a canonical parameter dict (see ``param_shapes``).

        Args:
          config: Architecture of the checkpoint.
          params: Canonical arrays; missing, extra or mis-shaped entries raise ``ValueError``.
          dtype: Parameter dtype (float32 by default; bfloat16 halves memory).
          activation_dtype: Dtype of activations; defaults to ``dtype``. Pass ``jnp.float32``
            with bfloat16 parameters to upcast activations.
        """
        check_params(config, params)
        return _build(config, params, jnp.dtype(dtype), jnp.dtype(activation_dtype or dtype))

    @classmethod
    def random(
        cls, config: Gemma3Config, seed: int = 0, *, dtype: jax.typing.DTypeLike = jnp.float32
    ) -> Gemma3LM:
        """A model with random weights (norm scales near 1), for tests and fixtures."""
        return cls.from_params(config, random_params(config, seed), dtype=dtype)

    @property
    def blocks(self) -> list[TransformerBlock]:
        """The decoder blocks in order (``model.blocks[9]`` is block 9)."""
        return list(pz.select(self.body).at_instances_of(TransformerBlock).get_sequence())

    def final_norm(self) -> pz.nn.RMSLayerNorm:
        """The RMSNorm applied after the last block (inside ``NamedGroup("final_norm")``)."""
        group = (
            pz.select(self.body)
            .at_instances_of(pz.nn.NamedGroup)
            .where(lambda g: g.name == "final_norm")
            .get()
        )
        return pz.select(group).at_instances_of(pz.nn.RMSLayerNorm).get()

    def final_norm_scale(self) -> jax.Array:
        """The final RMSNorm's multiplier ``[d_model]`` (the effective ``1 + w``)."""
        scale = pz.select(self.final_norm()).at_instances_of(pz.nn.Linear).get()
        return scale.weights.value.unwrap("embedding")

    def embedding_table(self) -> jax.Array:
        """The tied token embedding ``[vocab, d_model]`` (unscaled; also the unembedding)."""
        lookup = pz.select(self.body).at_instances_of(pz.nn.EmbeddingLookup).get()
        return lookup.table.embeddings.value.unwrap("vocabulary", "embedding")


def check_params(config: Gemma3Config, params: dict[str, np.ndarray]) -> None:
    """Raises ValueError naming every missing, unexpected or mis-shaped parameter."""
    expected = param_shapes(config)
    problems = [f"missing {k} {s}" for k, s in expected.items() if k not in params]
    problems += [f"unexpected {k}" for k in params if k not in expected]
    problems += [
        f"{k}: expected shape {s}, got {tuple(params[k].shape)}"
        for k, s in expected.items()
        if k in params and tuple(params[k].shape) != s
    ]
    if problems:
        raise ValueError("Gemma 3 parameters do not match the config: " + "; ".join(problems[:10]))


def random_params(config: Gemma3Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random canonical parameters with sensible scales."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("norm"):
            params[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = shape[0] if name != "embedding" else 1
            if name.endswith("attn.output"):
                fan_in = shape[0] * shape[1]
            params[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return params


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


def _attention(config: Gemma3Config, i: int, p: dict, dtype, act_dtype) -> pz.nn.Attention:
    pre = f"blocks.{i}.attn."
    common, query_only = head_axes(config)
    q_heads = (*common, *query_only)
    kv_heads = tuple(common)
    einsum_common = {name: name[:2] for name in common}
    einsum_q = {name: name[:2] for name in query_only}
    glob = config.is_global(i)
    rope = functools.partial(
        ScaledRoPE,
        embedding_axis="projection",
        max_wavelength=config.global_rope_base if glob else config.local_rope_base,
        position_scale=config.global_rope_scale if glob else 1.0,
    )
    masked = jnp.array(_MASKED_OUT, dtype=act_dtype)
    if glob:
        masker = pz.nn.ApplyCausalAttentionMask(masked_out_value=masked)
    else:
        masker = pz.nn.ApplyCausalSlidingWindowAttentionMask(
            sliding_window_size=config.sliding_window, masked_out_value=masked
        )
    kv = p[pre + "key"], p[pre + "value"]
    if not kv_heads:  # multi-query: a single key/value head
        kv = tuple(a[:, 0, :] for a in kv)
    query_w = _split_query_heads(config, p[pre + "query"], 1)
    output_w = _split_query_heads(config, p[pre + "output"], 0)
    name = f"blocks.{i}.attention"
    return pz.nn.Attention(
        input_to_query=pz.nn.Sequential(
            [
                _linear(f"{name}.query", query_w, ("embedding",), (*q_heads, "projection"), dtype),
                _rms_norm(
                    f"{name}.query_norm",
                    p[pre + "query_norm"],
                    "projection",
                    config.norm_eps,
                    dtype,
                ),
                rope(),
                pz.nn.ConstantRescale(by=jnp.array(config.query_scale, dtype=act_dtype)),
            ]
        ),
        input_to_key=pz.nn.Sequential(
            [
                _linear(f"{name}.key", kv[0], ("embedding",), (*kv_heads, "projection"), dtype),
                _rms_norm(
                    f"{name}.key_norm", p[pre + "key_norm"], "projection", config.norm_eps, dtype
                ),
                rope(),
            ]
        ),
        input_to_value=pz.nn.Sequential(
            [
                _linear(f"{name}.value", kv[1], ("embedding",), (*kv_heads, "projection"), dtype),
            ]
        ),
        query_key_to_attn=pz.nn.Sequential(
            [
                pz.nn.NamedEinsum(
                    (
                        {"seq": "tq", **einsum_common, **einsum_q, "projection": "p"},
                        {"seq": "tkv", **einsum_common, "projection": "p"},
                    ),
                    {"seq": "tq", **einsum_common, **einsum_q, "kv_seq": "tkv"},
                ),
                masker,
                pz.nn.Softmax("kv_seq"),
            ]
        ),
        attn_value_to_output=pz.nn.Sequential(
            [
                pz.nn.NamedEinsum(
                    (
                        {"seq": "tq", **einsum_common, **einsum_q, "kv_seq": "tkv"},
                        {"seq": "tkv", **einsum_common, "projection": "p"},
                    ),
                    {"seq": "tq", **einsum_common, **einsum_q, "projection": "p"},
                ),
                pz.nn.NamedGroup(
                    "attention_output",
                    [
                        _linear(
                            f"{name}.output",
                            output_w,
                            (*q_heads, "projection"),
                            ("embedding",),
                            dtype,
                        )
                    ],
                ),
            ]
        ),
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


def _build(config: Gemma3Config, p: dict, dtype, act_dtype) -> Gemma3LM:
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
    return Gemma3LM(body=pz.nn.Sequential(sublayers), metadata=metadata, config=config)


def token_positions(tokens: jax.Array, pad_id: int = 0) -> jax.Array:
    """Positions counting only non-pad tokens (left padding gets -1 and is masked out)."""
    nonpad = tokens != pad_id
    return jnp.where(nonpad, jnp.cumsum(nonpad, axis=-1) - 1, -1).astype(jnp.int32)


@jax.jit
def _forward(model: Gemma3LM, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    named = pz.nx.wrap(tokens).tag("batch", "seq")
    out = model(named, token_positions=pz.nx.wrap(positions).tag("batch", "seq"))
    return out.unwrap("batch", "seq", "vocabulary")


def forward(model: Gemma3LM, tokens, *, pad_id: int | None = None) -> jax.Array:
    """Jitted logits [batch, seq, vocabulary] for int tokens [batch, seq].

    With ``pad_id`` set, pad tokens get position -1 and are masked out of attention, so left-padded
    batches score like unpadded prompts; by default positions are 0..seq-1.
    """
    tokens = jnp.asarray(tokens, dtype=jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, seq], got shape {tokens.shape}")
    return _forward(pz.freeze_params(model), tokens, positions_for(tokens, pad_id))


def positions_for(tokens: jax.Array, pad_id: int | None) -> jax.Array:
    """0..seq-1 per row, or pad-aware positions (pads at -1) when ``pad_id`` is given."""
    if pad_id is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return token_positions(tokens, pad_id)
