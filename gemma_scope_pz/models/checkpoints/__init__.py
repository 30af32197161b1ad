"""Load Gemma 3 text-model weights from GGUF, Hugging Face or Kaggle/orbax checkpoints.

``load_params(source)`` resolves ``source`` with ``models.sources.resolve_source`` and hands
the local path to one reader; every reader returns the canonical parameter dictionary described
in ``checkpoints.layout``. The readers:

* ``checkpoints.gguf``: llama.cpp GGUF files (dequantized tensor by tensor);
* ``checkpoints.hf``: transformers folders (``config.json`` + safetensors, sharded or not);
* ``checkpoints.orbax``: Kaggle / ``gemma`` library orbax checkpoints.

Readers are imported lazily so that importing this package stays cheap.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from gemma_scope_pz.models.checkpoints.layout import validate_params
from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.sources import (
    HF_WEIGHT_PATTERNS,
    ResolvedSource,
    detect_format,
    resolve_default_gguf,
    resolve_source,
)

__all__ = ["detect_format", "load_params", "resolve_default_gguf", "validate_params"]

# Kept for callers of the old module: the files ``hf:`` sources fetch for weights.
HF_ALLOW_PATTERNS = HF_WEIGHT_PATTERNS


def load_params(
    source: str | os.PathLike | ResolvedSource | None = None,
    *,
    dtype: Any = np.float32,
    revision: str | None = None,
) -> tuple[Gemma3Config, dict[str, np.ndarray]]:
    """Loads a Gemma 3 text model as ``(config, canonical parameter dict)``.

    Args:
      source: Where the weights are. One of

        * ``None``: the offline Gemma 3 270M GGUF (the ``offline`` extra);
        * a path to a ``.gguf`` file (F32/F16/BF16 or any type ``gguf.quants`` dequantizes);
        * a local Hugging Face directory: ``config.json`` plus ``model.safetensors`` or
          sharded ``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``;
        * a local orbax checkpoint directory in the Kaggle/``gemma`` library layout (or a
          directory containing one);
        * ``"hf:<repo_id>"``, or a bare ``"google/gemma-3-1b-pt"``-style id that is not an
          existing path: downloaded with ``huggingface_hub.snapshot_download``;
        * ``"kaggle:<handle>"``: downloaded with ``kagglehub.model_download``;
        * a ``ResolvedSource`` from ``models.sources.resolve_source``.
      dtype: Floating dtype of the returned arrays (e.g. ``np.float32``,
        ``ml_dtypes.bfloat16``). Conversion happens one tensor at a time.
      revision: Hub revision for ``hf:`` sources; for ``kaggle:`` sources a version number
        appended to the handle. Must be ``None`` for local paths.

    Returns:
      The configuration read from (or, for fields the format lacks, matched to a preset for)
      the checkpoint, and a dict with exactly the keys and shapes of ``param_shapes(config)``.

    Raises:
      FileNotFoundError: ``source`` is a path that does not exist.
      ModuleNotFoundError: ``source`` is None and the ``offline`` extra is not installed.
      ValueError: Unknown format or architecture, a missing, extra or mis-shaped tensor, or a
        tensor holding NaN/Inf (every reader checks each stored tensor); the message names the
        file and tensor.
    """
    dtype = np.dtype(dtype)
    if dtype.kind != "f" and dtype.name != "bfloat16":
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if isinstance(source, ResolvedSource):
        resolved = source
    else:
        resolved = resolve_source(source, revision=revision, want="weights")
    config, params = read_checkpoint(resolved.format, resolved.path, dtype)
    validate_params(params, config, resolved.path)
    return config, params


def read_checkpoint(
    fmt: str, path: pathlib.Path, dtype: np.dtype
) -> tuple[Gemma3Config, dict[str, np.ndarray]]:
    """Runs the reader of ``fmt`` ("gguf", "hf" or "orbax") on a local ``path``."""
    if fmt == "gguf":
        from gemma_scope_pz.models.checkpoints import gguf

        return gguf.load_gguf(path, dtype=dtype)
    if fmt == "hf":
        from gemma_scope_pz.models.checkpoints import hf

        return hf.load_hf_dir(path, dtype=dtype)
    if fmt == "orbax":
        from gemma_scope_pz.models.checkpoints import orbax

        return orbax.load_orbax(path, dtype=dtype)
    raise ValueError(f"{path}: {fmt!r} is not a weight checkpoint format")
