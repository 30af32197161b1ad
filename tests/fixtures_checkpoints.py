"""Writers of tiny random Gemma 3 checkpoints in every supported format (for tests).

Each format is built in two steps so that tests can tamper with the stored tensors in between:
``*_tensors(config, params)`` converts canonical params into the format's own names, layouts
and norm convention, and ``write_*`` puts those tensors on disk. ``write_checkpoint`` does both.

The conversions here are written independently of ``gemma_scope_pz.models`` (with explicit
einsum-style index bookkeeping) so that a loader round trip is a real check.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import gguf
import numpy as np

from gemma_scope_pz.models.config import Gemma3Config, param_shapes


def random_params(config: Gemma3Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random canonical params; norms are ``1 + w`` with ``w`` in [-0.4, 0.4].

    Keeping the multipliers in [0.6, 1.4] makes ``(1 + w) - 1`` exact in float32, so the
    ``w`` formats round-trip bit for bit.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for key, shape in param_shapes(config).items():
        if key.endswith("norm"):
            w = rng.uniform(-0.4, 0.4, size=shape).astype(np.float32)
            params[key] = np.float32(1.0) + w
        else:
            params[key] = rng.normal(0.0, 0.5, size=shape).astype(np.float32)
    return params


def _torch_linear(key: str, value: np.ndarray) -> np.ndarray:
    """Canonical tensor -> PyTorch ``[out, in]`` weight, by explicit index order."""
    if key.endswith(("attn.query", "attn.key", "attn.value")):  # [D, N, H] -> [(N H), D]
        d, n, h = value.shape
        return np.ascontiguousarray(np.einsum("dnh->nhd", value).reshape(n * h, d))
    if key.endswith("attn.output"):  # [N, H, D] -> [D, (N H)]
        n, h, d = value.shape
        return np.ascontiguousarray(np.einsum("nhd->dnh", value).reshape(d, n * h))
    if key.endswith(("mlp.gate", "mlp.up", "mlp.down")):  # [in, out] -> [out, in]
        return np.ascontiguousarray(value.T)
    return value


# --------------------------------------------------------------------------------- GGUF
_GGUF_BLOCK = {
    "pre_attention_norm": "attn_norm",
    "post_attention_norm": "post_attention_norm",
    "pre_ffw_norm": "ffn_norm",
    "post_ffw_norm": "post_ffw_norm",
    "attn.query_norm": "attn_q_norm",
    "attn.key_norm": "attn_k_norm",
    "attn.query": "attn_q",
    "attn.key": "attn_k",
    "attn.value": "attn_v",
    "attn.output": "attn_output",
    "mlp.gate": "ffn_gate",
    "mlp.up": "ffn_up",
    "mlp.down": "ffn_down",
}


def gguf_tensors(config: Gemma3Config, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """llama.cpp names, numpy-order ``[out, in]`` arrays, norms already ``1 + w``."""
    out = {"token_embd.weight": params["embedding"], "output_norm.weight": params["final_norm"]}
    for key, value in params.items():
        if key.startswith("blocks."):
            _, layer, rest = key.split(".", 2)
            out[f"blk.{layer}.{_GGUF_BLOCK[rest]}.weight"] = _torch_linear(key, value)
    return out


def write_gguf(
    path: pathlib.Path,
    config: Gemma3Config,
    tensors: dict[str, np.ndarray],
    *,
    arch: str = "gemma3",
    types: dict[str, gguf.GGMLQuantizationType] | None = None,
) -> pathlib.Path:
    """Writes a GGUF with the ``gemma3.*`` metadata llama.cpp's converter emits.

    ``types`` maps tensor names to a storage type other than F32 (F16, BF16, Q8_0, ...).
    """
    types = types or {}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {config.name}")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.d_ff)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_rope_freq_base(config.global_rope_base)
    writer.add_sliding_window(config.sliding_window)
    if config.sliding_window_pattern != 6:  # llama.cpp assumes 6; newer converters list it
        writer.add_sliding_window_pattern([not config.is_global(i) for i in range(config.n_layers)])
    if config.global_rope_scale != 1.0:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(config.global_rope_scale)
    for name, value in tensors.items():
        qtype = types.get(name, gguf.GGMLQuantizationType.F32)
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.asarray(value, np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, np.asarray(value, np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------------------- HF safetensors
_HF_BLOCK = {
    "pre_attention_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn.query_norm": "self_attn.q_norm",
    "attn.key_norm": "self_attn.k_norm",
    "attn.query": "self_attn.q_proj",
    "attn.key": "self_attn.k_proj",
    "attn.value": "self_attn.v_proj",
    "attn.output": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}


def hf_tensors(
    config: Gemma3Config, params: dict[str, np.ndarray], *, prefix: str = "model."
) -> dict[str, np.ndarray]:
    """transformers names under ``prefix``, ``[out, in]`` weights, norms stored as raw ``w``."""

    def stored(key: str, value: np.ndarray) -> np.ndarray:
        return value - np.float32(1.0) if key.endswith("norm") else _torch_linear(key, value)

    out = {
        f"{prefix}embed_tokens.weight": params["embedding"],
        f"{prefix}norm.weight": stored("final_norm", params["final_norm"]),
    }
    for key, value in params.items():
        if key.startswith("blocks."):
            _, layer, rest = key.split(".", 2)
            out[f"{prefix}layers.{layer}.{_HF_BLOCK[rest]}.weight"] = stored(key, value)
    return out


def hf_config(config: Gemma3Config, *, multimodal: bool = False) -> dict[str, Any]:
    """A transformers-style ``config.json`` dict (``gemma3`` + ``text_config`` if multimodal)."""
    text = {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.d_ff,
        "sliding_window": config.sliding_window,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "rope_theta": config.global_rope_base,
        "rope_local_base_freq": config.local_rope_base,
        "rope_scaling": (
            None
            if config.global_rope_scale == 1.0
            else {"factor": config.global_rope_scale, "rope_type": "linear"}
        ),
        "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_seq_len,
        "layer_types": [
            "full_attention" if config.is_global(i) else "sliding_attention"
            for i in range(config.n_layers)
        ],
        "torch_dtype": "float32",
    }
    if not multimodal:
        return text
    return {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
    }


def write_hf_dir(
    directory: pathlib.Path,
    config_json: dict[str, Any],
    tensors: dict[str, np.ndarray],
    *,
    shards: int = 1,
    dtype: Any = None,
) -> pathlib.Path:
    """Writes ``config.json`` and one ``model.safetensors`` or ``shards`` files plus index."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_json, indent=2))
    if dtype is not None:
        tensors = {k: np.asarray(v).astype(dtype) for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
        return directory
    names = list(tensors)
    weight_map = {}
    for s, chunk in enumerate(np.array_split(np.arange(len(names)), shards)):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[i]: tensors[names[i]] for i in chunk}, str(directory / shard))
        weight_map.update({names[i]: shard for i in chunk})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


# ------------------------------------------------------------------------------ orbax
def orbax_tree(
    config: Gemma3Config, params: dict[str, np.ndarray], *, layout: str = "flat"
) -> dict[str, Any]:
    """The ``gemma`` library parameter tree: layout "flat" (released) or "nested" (init)."""
    c = config
    flat: dict[str, Any] = {
        "transformer/embedder": {"input_embedding": params["embedding"]},
        "transformer/final_norm": {"scale": params["final_norm"] - np.float32(1.0)},
    }
    for i in range(c.n_layers):
        p, b = f"transformer/layer_{i}/", f"blocks.{i}."
        for norm in ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"):
            flat[p + norm] = {"scale": params[b + norm] - np.float32(1.0)}
        if c.qk_norm:  # Gemma 2 trees have no query/key norms
            for norm in ("query_norm", "key_norm"):
                flat[p + f"attn/_{norm}"] = {"scale": params[b + f"attn.{norm}"] - np.float32(1.0)}
        q, k, v = (
            np.einsum("dnh->ndh", params[b + f"attn.{x}"]) for x in ("query", "key", "value")
        )
        if c.n_kv_heads == c.n_heads:
            flat[p + "attn/qkv_einsum"] = {"w": np.stack([q, k, v])}  # [3, N, D, H]
        else:
            flat[p + "attn/q_einsum"] = {"w": np.ascontiguousarray(q)}  # [N, D, H]
            flat[p + "attn/kv_einsum"] = {"w": np.stack([k, v])}  # [2, K, D, H]
        flat[p + "attn/attn_vec_einsum"] = {"w": params[b + "attn.output"]}  # [N, H, D]
        gate, up = (np.einsum("df->fd", params[b + f"mlp.{x}"]) for x in ("gate", "up"))
        flat[p + "mlp/gating_einsum"] = {"w": np.stack([gate, up])}  # [2, F, D]
        flat[p + "mlp/linear"] = {"w": params[b + "mlp.down"]}  # [F, D]
    if layout == "flat":
        return flat
    nested: dict[str, Any] = {}
    for path, leaf in flat.items():
        parts = path.removeprefix("transformer/").split("/")
        if parts[-1] in ("gating_einsum", "linear"):  # the MLP's bare arrays
            leaf = leaf["w"]
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = leaf
    return nested


def write_orbax_dir(
    directory: pathlib.Path, tree: dict[str, Any], config: Gemma3Config | None = None
) -> pathlib.Path:
    """Saves ``tree`` with orbax to ``directory``; writes ``gemma3_config.json`` beside it."""
    import orbax.checkpoint as ocp

    ocp.PyTreeCheckpointer().save(directory.resolve(), tree)
    if config is not None:
        (directory.parent / "gemma3_config.json").write_text(config.to_json())
    return directory


def write_checkpoint(
    kind: str,
    root: pathlib.Path,
    config: Gemma3Config | None = None,
    seed: int = 0,
    params: dict[str, np.ndarray] | None = None,
) -> tuple[pathlib.Path, Gemma3Config, dict[str, np.ndarray]]:
    """Writes a tiny checkpoint of ``kind`` ("gguf", "hf", "orbax") under ``root``.

    ``params`` default to ``random_params(config, seed)``.
    Returns ``(path to pass to load_params, config, canonical params)``.
    """
    config = config or Gemma3Config.tiny()
    params = random_params(config, seed) if params is None else params
    root.mkdir(parents=True, exist_ok=True)
    if kind == "gguf":
        path = write_gguf(root / "tiny.gguf", config, gguf_tensors(config, params))
    elif kind == "hf":
        path = write_hf_dir(root / "hf", hf_config(config), hf_tensors(config, params))
    elif kind == "orbax":
        path = write_orbax_dir(root / "orbax" / "ckpt", orbax_tree(config, params), config)
    else:
        raise ValueError(f"unknown checkpoint kind {kind!r}")
    return path, config, params
