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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts
from penzai.models.transformer.model_parts import TransformerBlock

from gemma_scope_pz.models import stateful
from gemma_scope_pz.models.builder import ScaledRoPE, build_body, head_axes
from gemma_scope_pz.models.config import Gemma3Config, param_shapes
from gemma_scope_pz.models.inputs import (
    as_token_batch,
    bucket_length,
    check_token_ids,
    pad_columns,
)
from gemma_scope_pz.models.special_tokens import PAD_ID
from gemma_scope_pz.models.stateful import frozen, model_mesh, model_state_variables
from gemma_scope_pz.parallel.shard import batch_on_mesh

__all__ = [
    "Gemma3LM",
    "ScaledRoPE",
    "check_params",
    "check_token_ids",
    "forward",
    "head_axes",
    "positions_for",
    "random_params",
    "token_positions",
    "vocab_size_of",
]


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)  # pytype: disable=wrong-keyword-args
class Gemma3LM(model_parts.TransformerLM):
    """A Gemma 3 text decoder: ``model(tokens)`` → logits over "vocabulary".

    Attributes:
      config: The architecture hyper-parameters (static).
      source: Where the weights were read from (a local file or folder; ``load_tokenizer``
        accepts it), or None for the offline 270M and for models built in memory. Text inputs
        to the runners are tokenized with this source's tokenizer.
    """

    config: Gemma3Config = dataclasses.field(default=None, metadata={"pytree_node": False})
    source: str | None = dataclasses.field(default=None, metadata={"pytree_node": False})

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
        body, metadata = build_body(
            config, params, jnp.dtype(dtype), jnp.dtype(activation_dtype or dtype)
        )
        return cls(body=body, metadata=metadata, config=config)

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


def token_positions(tokens: jax.Array, pad_id: int = 0) -> jax.Array:
    """Positions counting only non-pad tokens (left padding gets -1 and is masked out)."""
    nonpad = tokens != pad_id
    return jnp.where(nonpad, jnp.cumsum(nonpad, axis=-1) - 1, -1).astype(jnp.int32)


def vocab_size_of(model: pz.nn.Layer) -> int:
    """The vocabulary size of a Gemma3LM (or any penzai TransformerLM)."""
    config = getattr(model, "config", None)
    if config is not None:
        return config.vocab_size
    return model.metadata.vocab_size


# stateful.jit, not jax.jit: a model holding pz.StateVariables (the tutorial's SaveIntermediate)
# runs too, and its variables are updated as by a direct call (see models/stateful.py).
@stateful.jit
def _forward(model: Gemma3LM, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    named = pz.nx.wrap(tokens).tag("batch", "seq")
    out = model(named, token_positions=pz.nx.wrap(positions).tag("batch", "seq"))
    return out.unwrap("batch", "seq", "vocabulary")


def forward(
    model: Gemma3LM,
    tokens: Any,
    *,
    pad_id: int | None = None,
    bucket: bool = True,
) -> jax.Array:
    """Jitted logits ``[batch, seq, vocabulary]``.

    Args:
      model: The model (any edit of it that stays a ``Gemma3LM``).
      tokens: Anything ``models.inputs.as_token_batch`` accepts: a string or list of strings
        (the model's tokenizer, BOS added), ids, ragged lists of ids (right-padded here), or an
        int ``[batch, seq]`` array.
      pad_id: With ``pad_id`` set, pad tokens of an array get position -1 and are masked out
        of attention, so left-padded batches score like unpadded prompts; by default positions
        are 0..seq-1.
      bucket: Round the length up to a few shapes (``models.inputs.bucket_length``) so new
        prompt lengths reuse compiled code; the extra columns are causally invisible and cut
        off, so the logits are those of the unpadded input.

    Raises:
      ValueError: A token id outside ``[0, vocab)``, or an input of the wrong shape.
    """
    array, _ = as_token_batch(tokens, model)
    array = check_token_ids(array, vocab_size_of(model))
    length = array.shape[1]
    limit = getattr(getattr(model, "config", None), "max_seq_len", None)
    # No bucketing for a model holding state variables: they must record the unpadded input.
    bucket = bucket and not model_state_variables(model)
    width = bucket_length(length, limit) if bucket else length
    fill = PAD_ID if pad_id is None else pad_id
    padded = batch_on_mesh(jnp.asarray(pad_columns(array, width, fill)), model_mesh(model))
    logits = _forward(frozen(model), padded, positions_for(padded, pad_id))
    return logits[:, :length]


def positions_for(tokens: jax.Array, pad_id: int | None) -> jax.Array:
    """0..seq-1 per row, or pad-aware positions (pads at -1) when ``pad_id`` is given."""
    if pad_id is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return token_positions(tokens, pad_id)
