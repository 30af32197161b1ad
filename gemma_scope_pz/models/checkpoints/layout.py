"""The canonical Gemma 3 parameter layout and the helpers every checkpoint reader shares.

Every reader returns the same *canonical* parameter dictionary, whose keys and shapes are
``param_shapes(config)``:

* ``embedding`` ``[vocab, d_model]`` (tied input/output embedding, unscaled);
* ``final_norm`` and per block ``pre_attention_norm``, ``post_attention_norm``,
  ``pre_ffw_norm``, ``post_ffw_norm`` ``[d_model]``, ``attn.query_norm`` and
  ``attn.key_norm`` ``[head_dim]``: RMSNorm scales as the *effective multiplier*
  ``1 + w`` (Hugging Face and orbax store ``w``; llama.cpp's converter already adds 1);
* ``attn.query`` ``[d_model, n_heads, head_dim]``, ``attn.key`` / ``attn.value``
  ``[d_model, n_kv_heads, head_dim]``, ``attn.output`` ``[n_heads, head_dim, d_model]``;
* ``mlp.gate`` / ``mlp.up`` ``[d_model, d_ff]``, ``mlp.down`` ``[d_ff, d_model]``.

This module imports no reader, so the readers (``gguf``, ``hf``, ``orbax``) and the entry point
(``checkpoints.load_params``) all import it without a circle.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gemma_scope_pz.models.config import (
    GEMMA2_PRESET_NAMES,
    PRESET_NAMES,
    Gemma3Config,
    param_shapes,
)

__all__ = [
    "BLOCK_KINDS",
    "canonical_kind",
    "check_finite",
    "check_shape",
    "materialize",
    "matching_preset",
    "out_in_stored_shape",
    "out_in_to_canonical",
    "validate_params",
]

# Role of every per-block canonical tensor; decides how stored layouts are converted.
BLOCK_KINDS: dict[str, str] = {
    "pre_attention_norm": "norm",
    "post_attention_norm": "norm",
    "pre_ffw_norm": "norm",
    "post_ffw_norm": "norm",
    "attn.query_norm": "norm",
    "attn.key_norm": "norm",
    "attn.query": "query",
    "attn.key": "kv",
    "attn.value": "kv",
    "attn.output": "output",
    "mlp.gate": "ffw_in",
    "mlp.up": "ffw_in",
    "mlp.down": "ffw_out",
}


def matching_preset(n_layers: int, d_model: int, *, family: str = "gemma3") -> Gemma3Config | None:
    """The released preset of ``family`` with this depth and width, if any."""
    for name in GEMMA2_PRESET_NAMES if family == "gemma2" else PRESET_NAMES:
        preset = Gemma3Config.preset(name)
        if preset.n_layers == n_layers and preset.d_model == d_model:
            return preset
    return None


def check_shape(file: Any, tensor: str, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    """Raises a ValueError naming ``file`` and ``tensor`` when the shapes differ."""
    if tuple(got) != tuple(expected):
        raise ValueError(
            f"{file}: tensor {tensor!r} has shape {tuple(got)}, expected {tuple(expected)}"
        )


def materialize(
    view: np.ndarray, dtype: np.dtype, *, owned: bool, shift: float = 0.0
) -> np.ndarray:
    """A C-contiguous ``dtype`` array equal to ``view`` (+ ``shift``), copying at most once.

    Args:
      view: The canonical-layout view of a stored tensor (may be transposed / memory-mapped).
      dtype: Target dtype.
      owned: Whether ``view``'s memory is a private temporary that may be returned as is.
      shift: Added in float32 before the cast (``1.0`` turns a stored ``w`` into ``1 + w``).
    """
    if shift:
        shifted = np.asarray(view, dtype=np.float32) + np.float32(shift)
        return shifted.astype(dtype, copy=False)
    if owned and view.dtype == dtype and view.flags.c_contiguous:
        return view
    out = np.empty(view.shape, dtype=dtype)
    out[...] = view
    return out


def canonical_kind(key: str) -> str:
    """Role of a canonical key: "embedding", "norm", "query", "kv", "output", "ffw_in/out"."""
    if key == "embedding":
        return "embedding"
    if key == "final_norm":
        return "norm"
    return BLOCK_KINDS[key.split(".", 2)[2]]


def out_in_stored_shape(key: str, config: Gemma3Config) -> tuple[int, ...]:
    """Stored shape of canonical ``key`` in the PyTorch ``[out, in]`` convention (HF, GGUF)."""
    kind, c = canonical_kind(key), config
    if kind == "embedding":
        return (c.vocab_size, c.d_model)
    if kind == "norm":
        return (c.head_dim,) if key.endswith(("query_norm", "key_norm")) else (c.d_model,)
    return {
        "query": (c.n_heads * c.head_dim, c.d_model),
        "kv": (c.n_kv_heads * c.head_dim, c.d_model),
        "output": (c.d_model, c.n_heads * c.head_dim),
        "ffw_in": (c.d_ff, c.d_model),
        "ffw_out": (c.d_model, c.d_ff),
    }[kind]


def out_in_to_canonical(kind: str, stored: np.ndarray, config: Gemma3Config) -> np.ndarray:
    """View of an ``[out, in]`` stored tensor in the canonical layout (no copy)."""
    c = config
    if kind == "query":
        return stored.reshape(c.n_heads, c.head_dim, c.d_model).transpose(2, 0, 1)
    if kind == "kv":
        return stored.reshape(c.n_kv_heads, c.head_dim, c.d_model).transpose(2, 0, 1)
    if kind == "output":
        return stored.reshape(c.d_model, c.n_heads, c.head_dim).transpose(1, 2, 0)
    if kind in ("ffw_in", "ffw_out"):
        return stored.T
    return stored


def validate_params(params: dict[str, np.ndarray], config: Gemma3Config, file: Any) -> None:
    """Checks ``params`` against ``param_shapes(config)``; ValueError names what is wrong."""
    expected = param_shapes(config)
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing:
        raise ValueError(f"{file}: missing tensors for {missing[:8]} ({len(missing)} in all)")
    if extra:
        raise ValueError(f"{file}: unexpected tensors {extra[:8]} ({len(extra)} in all)")
    for key, shape in expected.items():
        check_shape(file, key, params[key].shape, shape)


def check_finite(file: Any, tensor: str, values: np.ndarray) -> None:
    """Raises a ValueError naming ``file`` and ``tensor`` when ``values`` hold NaN or Inf.

    Checked in chunks of rows so that a large memory-mapped tensor is not copied whole.
    """
    flat = values.reshape(values.shape[0], -1) if values.ndim > 1 else values.reshape(1, -1)
    step = max(1, (1 << 24) // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], step):
        chunk = np.asarray(flat[start : start + step], dtype=np.float32)
        if not np.isfinite(chunk).all():
            bad = "NaN" if np.isnan(chunk).any() else "Inf"
            raise ValueError(f"{file}: tensor {tensor!r} contains {bad} values")
