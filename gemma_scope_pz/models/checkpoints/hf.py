"""Hugging Face (transformers) Gemma 3 and Gemma 2 checkpoints: ``config.json`` plus safetensors.

Gemma 2 (``model_type`` "gemma2") stores the same tensor names without ``q_norm`` / ``k_norm``.

Text-only models (270m, 1b; ``model_type`` "gemma3_text") keep their weights under
``model.``; the multimodal ones (4b+; "gemma3" with a ``text_config``) under
``language_model.model.`` or, with newer transformers, ``model.language_model.``. The prefix is
found from the one key ending in ``embed_tokens.weight``; vision-tower, projector and
``lm_head`` tensors are ignored. Linear weights are PyTorch ``[out, in]``; RMSNorm weights are
the raw ``w`` of ``x * (1 + w)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from safetensors import safe_open
from tqdm.auto import tqdm

import gemma_scope_pz.models.checkpoints.layout as layout
from gemma_scope_pz.models.config import Gemma3Config

__all__ = ["config_from_hf", "hf_layout", "load_hf_dir", "tensor_files"]

# HF module path within "layers.{i}." -> canonical name within "blocks.{i}.".
HF_BLOCK_NAMES = {
    "input_layernorm": "pre_attention_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "pre_ffw_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn.query_norm",
    "self_attn.k_norm": "attn.key_norm",
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.o_proj": "attn.output",
    "mlp.gate_proj": "mlp.gate",
    "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.down",
}
# Defaults of transformers' Gemma3TextConfig for keys a config.json may omit.
_HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=262_208,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    max_position_embeddings=131_072,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    query_pre_attn_scalar=256,
    sliding_window=4096,
)
# Sub-trees of multimodal checkpoints that are not part of the text decoder.
_IGNORED_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "lm_head.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "language_model.lm_head.",
)


def config_from_hf(config_json: dict[str, Any], file: Any = "config.json") -> Gemma3Config:
    """Converts a transformers Gemma 3 ``config.json`` dict into a ``Gemma3Config``.

    Handles ``rope_scaling`` / ``rope_theta`` / ``rope_local_base_freq`` as well as the newer
    per-layer-type ``rope_parameters``, and ``layer_types`` or ``sliding_window_pattern``.
    """
    model_type = config_json.get("model_type")
    if model_type == "gemma2":
        return _gemma2_config(config_json, file)
    if model_type == "gemma3":
        text = dict(config_json.get("text_config") or {})
    elif model_type == "gemma3_text":
        text = dict(config_json)
    else:
        raise ValueError(
            f"{file}: model_type is {model_type!r}, expected 'gemma3_text', 'gemma3' or 'gemma2'"
        )
    cfg = {**_HF_DEFAULTS, **{k: v for k, v in text.items() if v is not None}}

    global_base, local_base, scale = _rope_settings(text, cfg, file)
    pattern = _sliding_pattern(text, file)

    n_layers, d_model = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    preset = layout.matching_preset(n_layers, d_model)
    return Gemma3Config(
        vocab_size=int(cfg["vocab_size"]),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=int(cfg["num_attention_heads"]),
        n_kv_heads=int(cfg["num_key_value_heads"]),
        head_dim=int(cfg["head_dim"]),
        d_ff=int(cfg["intermediate_size"]),
        sliding_window=int(cfg["sliding_window"]),
        query_pre_attn_scalar=cfg["query_pre_attn_scalar"],
        local_rope_base=float(local_base),
        global_rope_base=float(global_base),
        global_rope_scale=scale,
        sliding_window_pattern=pattern,
        norm_eps=float(cfg["rms_norm_eps"]),
        max_seq_len=int(cfg["max_position_embeddings"]),
        name=preset.name if preset else "custom",
    )


def _gemma2_config(config_json: dict[str, Any], file: Any) -> Gemma3Config:
    """A transformers ``Gemma2Config`` dict as a ``Gemma3Config`` of family "gemma2".

    Keys the file omits take the Gemma 2 2B values (transformers' defaults); one RoPE base for
    every layer (``rope_theta`` or ``rope_parameters.rope_theta``), every other layer global.
    """
    defaults = Gemma3Config.preset("gemma2-2b")
    cfg = {k: v for k, v in config_json.items() if v is not None}
    rope = config_json.get("rope_parameters") or config_json.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{file}: unsupported rope scaling {rope} for Gemma 2 (only 'default')")
    base = float(rope.get("rope_theta", cfg.get("rope_theta", defaults.global_rope_base)))
    layer_types = config_json.get("layer_types")
    pattern = _sliding_pattern(config_json, file) if layer_types else 2
    n_layers = int(cfg.get("num_hidden_layers", defaults.n_layers))
    d_model = int(cfg.get("hidden_size", defaults.d_model))
    preset = layout.matching_preset(n_layers, d_model, family="gemma2")
    return dataclasses.replace(
        defaults,
        vocab_size=int(cfg.get("vocab_size", defaults.vocab_size)),
        d_model=d_model,
        n_layers=n_layers,
        n_heads=int(cfg.get("num_attention_heads", defaults.n_heads)),
        n_kv_heads=int(cfg.get("num_key_value_heads", defaults.n_kv_heads)),
        head_dim=int(cfg.get("head_dim", defaults.head_dim)),
        d_ff=int(cfg.get("intermediate_size", defaults.d_ff)),
        sliding_window=int(cfg.get("sliding_window", defaults.sliding_window)),
        query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", defaults.query_pre_attn_scalar),
        local_rope_base=base,
        global_rope_base=base,
        sliding_window_pattern=pattern,
        norm_eps=float(cfg.get("rms_norm_eps", defaults.norm_eps)),
        max_seq_len=int(cfg.get("max_position_embeddings", defaults.max_seq_len)),
        attn_logit_softcap=config_json.get("attn_logit_softcapping"),
        final_logit_softcap=config_json.get("final_logit_softcapping"),
        name=preset.name if preset else "custom",
    )


def _rope_settings(text: dict[str, Any], cfg: dict[str, Any], file: Any) -> tuple[Any, Any, float]:
    """(global RoPE base, local RoPE base, linear scale) from old or per-layer-type keys."""
    global_base, local_base = cfg["rope_theta"], cfg["rope_local_base_freq"]
    scaling = text.get("rope_scaling")
    rope_parameters = text.get("rope_parameters")
    if isinstance(rope_parameters, dict) and "full_attention" in rope_parameters:
        scaling = rope_parameters["full_attention"]
        global_base = scaling.get("rope_theta", global_base)
        local_base = rope_parameters.get("sliding_attention", {}).get("rope_theta", local_base)
    scale = 1.0
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        if scaling.get("rope_type", scaling.get("type")) != "linear":
            raise ValueError(f"{file}: unsupported rope scaling {scaling} (only 'linear')")
        scale = float(scaling["factor"])
    return global_base, local_base, scale


def _sliding_pattern(text: dict[str, Any], file: Any) -> int:
    """Every how many layers one is global, from ``layer_types`` or ``sliding_window_pattern``."""
    pattern = int(text.get("sliding_window_pattern") or text.get("_sliding_window_pattern") or 6)
    layer_types = text.get("layer_types")
    if layer_types:
        pattern = (
            layer_types.index("full_attention") + 1
            if "full_attention" in layer_types
            else len(layer_types) + 1
        )
        implied = [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(len(layer_types))
        ]
        if list(layer_types) != implied:
            raise ValueError(
                f"{file}: layer_types are not a periodic 'every {pattern}th layer global' pattern"
            )
    return pattern


def tensor_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """Maps every stored tensor name to its safetensors file (single file, index or glob).

    Shard names in ``model.safetensors.index.json`` must be plain file names inside
    ``directory`` (no absolute paths, no ``..``); every header is parsed (and validated by the
    safetensors reader: offsets in bounds, contiguous, non-overlapping) before any tensor is read.
    """
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = _index_files(index, directory)
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise FileNotFoundError(f"{index}: shard {shard.name} listed but missing")
            with open_safetensors(shard) as f:
                stored = set(f.keys())
            absent = sorted(n for n, file in files.items() if file == shard and n not in stored)
            if absent:
                raise ValueError(
                    f"{index}: {absent[0]!r} is mapped to {shard.name}, which lacks it"
                )
        return files
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{directory}: no *.safetensors files")
    files = {}
    for shard in shards:
        with open_safetensors(shard) as f:
            for name in f.keys():
                files[name] = shard
    return files


def _index_files(index: pathlib.Path, directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """The index's ``weight_map`` as tensor name -> shard path, each shard inside ``directory``."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{index}: not a safetensors index ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: 'weight_map' is not an object")
    root = directory.resolve()
    files = {}
    for name, shard in weight_map.items():
        path = (directory / str(shard)).resolve()
        if (
            not isinstance(shard, str)
            or pathlib.PurePath(shard).name != shard
            or path.parent != root
        ):
            raise ValueError(
                f"{index}: shard path {shard!r} for {name!r} is outside the model folder"
            )
        files[name] = directory / shard
    return files


@contextlib.contextmanager
def open_safetensors(path: pathlib.Path) -> Iterator[Any]:
    """``safe_open(path)`` whose header and read errors name the file."""
    try:
        handle = safe_open(path, framework="numpy")
    except Exception as err:  # SafetensorError has no importable base class besides Exception
        raise ValueError(f"{path}: invalid safetensors file ({err})") from None
    with handle as f:
        yield f


def _text_prefix(names: list[str], directory: pathlib.Path) -> str:
    candidates = [
        n[: -len("embed_tokens.weight")] for n in names if n.endswith("embed_tokens.weight")
    ]
    if len(candidates) != 1:
        raise ValueError(
            f"{directory}: expected one '*embed_tokens.weight' tensor, found {candidates or 'none'}"
        )
    return candidates[0]


def load_hf_dir(
    directory: str | os.PathLike, *, dtype: Any = np.float32
) -> tuple[Gemma3Config, dict[str, np.ndarray]]:
    """Loads a local transformers Gemma 3 directory as ``(config, canonical params)``.

    Tensors are read one at a time with ``safe_open`` and converted (bf16 -> ``dtype``,
    ``[out, in]`` -> canonical layout, norms ``w`` -> ``1 + w``) with a single copy each.
    """
    directory = pathlib.Path(directory)
    config, files, names = hf_layout(directory)
    params: dict[str, np.ndarray] = {}
    by_file: dict[pathlib.Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    progress = tqdm(total=len(names), desc=f"safetensors {directory.name}", leave=False)
    for shard, shard_names in by_file.items():
        with open_safetensors(shard) as f:
            for name in shard_names:
                key = names[name]
                kind = layout.canonical_kind(key)
                shape = tuple(f.get_slice(name).get_shape())
                layout.check_shape(shard, name, shape, layout.out_in_stored_shape(key, config))
                stored = f.get_tensor(name)
                layout.check_finite(shard, name, stored)
                view = layout.out_in_to_canonical(kind, stored, config)
                params[key] = layout.materialize(
                    view, dtype, owned=True, shift=1.0 if kind == "norm" else 0.0
                )
                del stored, view
                progress.update()
    progress.close()
    return config, params


def hf_layout(
    directory: pathlib.Path,
) -> tuple[Gemma3Config, dict[str, pathlib.Path], dict[str, str]]:
    """``(config, stored name -> safetensors file, stored name -> canonical key)`` of a folder.

    Reads ``config.json`` and the safetensors headers only, no tensor data.
    """
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist")
    try:
        config_json = json.loads(config_path.read_text())
    except ValueError as err:
        raise ValueError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config_json, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    config = config_from_hf(config_json, config_path)
    files = tensor_files(directory)
    prefix = _text_prefix(list(files), directory)

    return config, files, _name_table(prefix, config, files, directory)


def _name_table(
    prefix: str, config: Gemma3Config, files: dict[str, pathlib.Path], directory: pathlib.Path
) -> dict[str, str]:
    """Stored tensor name -> canonical key; unexpected or missing tensors are errors."""
    names = {f"{prefix}embed_tokens.weight": "embedding", f"{prefix}norm.weight": "final_norm"}
    for i in range(config.n_layers):
        for short, key in HF_BLOCK_NAMES.items():
            if key.endswith(("query_norm", "key_norm")) and not config.qk_norm:
                continue
            names[f"{prefix}layers.{i}.{short}.weight"] = f"blocks.{i}.{key}"
    extra = [
        n
        for n in files
        if n not in names and n.startswith(prefix) and not n.startswith(_IGNORED_PREFIXES)
    ]
    if extra:
        raise ValueError(f"{files[extra[0]]}: unexpected tensors {extra[:8]}")
    missing = [n for n in names if n not in files]
    if missing:
        raise ValueError(
            f"{directory}: missing tensor {missing[0]!r} ({len(missing)} missing in all)"
        )
    return names
