"""Kaggle / ``gemma`` library (Flax) Gemma 3 and Gemma 2 checkpoints stored with orbax.

Two tree layouts exist (``gemma.gm.ckpts``): the released FLAT one, whose top-level keys are
paths such as ``"transformer/layer_0/attn/q_einsum"`` mapping to ``{"w": array}``, and the
NESTED one of ``model.init()`` (``{"layer_0": {"attn": {"q_einsum": {"w": ...}}}}``, where the
MLP weights are bare arrays). Both are flattened to ``"layer_0/attn/q_einsum"``-style paths.

Stored shapes (``gemma/gm/nn/_modules.py``): ``embedder/input_embedding`` ``[V, D]``;
``attn/q_einsum`` ``[H, D, Hd]`` and ``attn/kv_einsum`` ``[2, KV, D, Hd]``, or
``attn/qkv_einsum`` ``[3, H, D, Hd]`` when ``KV == H``; ``attn/attn_vec_einsum`` ``[H, Hd, D]``;
``mlp/gating_einsum`` ``[2, F, D]`` (Gemma 2/3, "transpose_gating_einsum") or ``[2, D, F]``;
``mlp/linear`` ``[F, D]``; RMSNorm ``scale`` is the raw ``w`` of ``x * (1 + w)``.

Orbax checkpoints carry no hyper-parameters besides shapes. The remaining fields come from a
``gemma3_config.json`` (``Gemma3Config.to_json()``) next to or inside the checkpoint directory
when present, else from the preset with the same depth and width. Gemma 2 trees are the same
but for the missing ``attn/_query_norm`` / ``attn/_key_norm``; that absence selects the Gemma 2
presets.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any

import numpy as np

import gemma_scope_pz.models.checkpoints.layout as layout
from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.sources import find_orbax_dir

__all__ = ["CONFIG_SIDECAR", "find_orbax_dir", "load_orbax", "orbax_layout", "restore_sharded"]

CONFIG_SIDECAR = "gemma3_config.json"
_NORMS = {
    "pre_attention_norm": "pre_attention_norm",
    "post_attention_norm": "post_attention_norm",
    "pre_ffw_norm": "pre_ffw_norm",
    "post_ffw_norm": "post_ffw_norm",
    "attn/_query_norm": "attn.query_norm",
    "attn/_key_norm": "attn.key_norm",
}
_LAYER = re.compile(r"^layer_(\d+)/(.+)$")
_SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff")


def _restore(directory: pathlib.Path) -> dict[str, Any]:
    """Restores the whole tree as numpy arrays in their stored dtype."""
    import jax
    import orbax.checkpoint as ocp

    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(directory)
    tree = getattr(getattr(metadata, "item_metadata", None), "tree", metadata)
    if not isinstance(tree, dict):
        raise ValueError(f"{directory}: orbax metadata has no parameter tree ({type(metadata)})")
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))


def orbax_layout(
    directory: pathlib.Path,
) -> tuple[Gemma3Config, dict[str, tuple[str, tuple, _Pick]], dict[str, Any]]:
    """``(config, canonical key -> (stored path, stored shape, converter), metadata tree)``.

    From the checkpoint's metadata only (shapes and dtypes, no tensor data); the metadata tree
    has the checkpoint's own nesting, for ``restore_sharded``.
    """
    import orbax.checkpoint as ocp

    metadata = ocp.PyTreeCheckpointer().metadata(directory)
    tree = getattr(getattr(metadata, "item_metadata", None), "tree", metadata)
    if not isinstance(tree, dict):
        raise ValueError(f"{directory}: orbax metadata has no parameter tree ({type(metadata)})")
    config, table = _checked_layout(_flatten(tree), directory)
    return config, table, tree


def _checked_layout(
    flat: dict[str, Any], directory: pathlib.Path
) -> tuple[Gemma3Config, dict[str, tuple[str, tuple, _Pick]]]:
    """The config and layout table of a flattened tree (arrays or metadata), after checking that
    it holds no unexpected tensor, misses none, and every shape is the one the config implies."""
    config = _config(flat, directory)
    table = _layout(flat, config)
    used = {stored for stored, _, _ in table.values()}
    unexpected = [n for n in flat if n not in used and not _ignored(n)]
    if unexpected:
        raise ValueError(f"{directory}: unexpected tensors {unexpected[:8]}")
    for key, (stored, shape, _) in table.items():
        if stored not in flat:
            raise ValueError(f"{directory}: missing tensor {stored!r} (for {key})")
        layout.check_shape(directory, stored, tuple(flat[stored].shape), shape)
    return config, table


def restore_sharded(directory: pathlib.Path, tree: dict[str, Any], shardings: dict[str, Any]):
    """The stored tensors at ``shardings``' paths as ``jax.Array``s placed by those shardings.

    Orbax reads, for each device, the part of each tensor its shard covers; paths not in
    ``shardings`` (e.g. a vision encoder) are not read.
    """
    import jax
    import orbax.checkpoint as ocp

    def args(path, _):
        key = _normalize("/".join(str(getattr(k, "key", k)) for k in path))
        if key not in shardings:
            return ocp.PLACEHOLDER
        return ocp.ArrayRestoreArgs(sharding=shardings[key])

    restore_args = jax.tree_util.tree_map_with_path(args, tree)
    item = jax.tree_util.tree_map(
        lambda a: ocp.PLACEHOLDER if a is ocp.PLACEHOLDER else a,
        restore_args,
        is_leaf=lambda a: a is ocp.PLACEHOLDER,
    )
    restored = ocp.PyTreeCheckpointer().restore(
        directory, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args)
    )
    return {k: v for k, v in _flatten(restored).items() if k in shardings}


def _normalize(path: str) -> str:
    for root in ("params/", "transformer/"):
        path = path.removeprefix(root)
    return path.removesuffix("/w").removesuffix("/scale")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """Flattens nested dicts into "a/b/c" paths, dropping "transformer/" / "params/" roots."""
    flat: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, path + "/"))
        else:
            flat[path] = value
    if prefix:
        return flat
    return {_normalize(path): value for path, value in flat.items()}


def _config(flat: dict[str, np.ndarray], directory: pathlib.Path) -> Gemma3Config:
    """Shape fields from the tensors; the rest from a sidecar JSON or the matching preset."""
    if any("stacked_layers" in path for path in flat):
        raise ValueError(
            f"{directory}: STACKED orbax layout is not supported; use a FLAT/NESTED one"
        )
    for required in (
        "embedder/input_embedding",
        "layer_0/attn/attn_vec_einsum",
        "layer_0/mlp/linear",
    ):
        if required not in flat:
            raise ValueError(f"{directory}: missing tensor {required!r}")
    vocab, d_model = flat["embedder/input_embedding"].shape
    n_layers = 1 + max(int(m.group(1)) for p in flat if (m := _LAYER.match(p)))
    n_heads, head_dim, _ = flat["layer_0/attn/attn_vec_einsum"].shape
    if "layer_0/attn/qkv_einsum" in flat:
        n_kv = n_heads
    elif "layer_0/attn/kv_einsum" in flat:
        n_kv = flat["layer_0/attn/kv_einsum"].shape[1]
    else:
        raise ValueError(f"{directory}: missing tensor 'layer_0/attn/kv_einsum'")
    shapes = dict(
        vocab_size=vocab,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        d_ff=flat["layer_0/mlp/linear"].shape[0],
    )
    shapes = {k: int(v) for k, v in shapes.items()}
    for sidecar in (directory / CONFIG_SIDECAR, directory.parent / CONFIG_SIDECAR):
        if sidecar.is_file():
            config = Gemma3Config.from_dict(json.loads(sidecar.read_text()))
            for field in _SHAPE_FIELDS:
                if getattr(config, field) != shapes[field] and field != "vocab_size":
                    raise ValueError(
                        f"{sidecar}: {field}={getattr(config, field)} but the checkpoint "
                        f"tensors imply {shapes[field]}"
                    )
            return Gemma3Config(**{**config.to_dict(), **shapes})
    family = "gemma3" if "layer_0/attn/_query_norm" in flat else "gemma2"
    preset = layout.matching_preset(n_layers, d_model, family=family)
    if preset is None:
        raise ValueError(
            f"{directory}: no Gemma {family[-1]} preset has n_layers={n_layers}, d_model={d_model}, and no "
            f"{CONFIG_SIDECAR} gives sliding_window, query_pre_attn_scalar and RoPE settings"
        )
    return Gemma3Config(**{**preset.to_dict(), **shapes})


@dataclasses.dataclass(frozen=True)
class _Pick:
    """Converter taking slice ``j`` of a stacked tensor and permuting its axes.

    Attributes:
      j: Index into the stacked first axis, or None (not stacked).
      transpose: Axis permutation after the pick, or None.
    """

    j: int | None
    transpose: tuple[int, ...] | None

    def __call__(self, stored: Any) -> Any:
        part = stored if self.j is None else stored[self.j]
        return part if self.transpose is None else part.transpose(self.transpose)

    def stored_axis(self, canonical_axis: int) -> int:
        """The stored axis that canonical axis ``canonical_axis`` comes from."""
        axis = canonical_axis if self.transpose is None else self.transpose[canonical_axis]
        return axis + (self.j is not None)


_pick = _Pick


def _layout(flat: dict[str, np.ndarray], c: Gemma3Config) -> dict[str, tuple[str, tuple, Any]]:
    """Canonical key -> (stored path, stored shape, stored-to-canonical converter)."""
    table: dict[str, tuple[str, tuple, Any]] = {
        "embedding": ("embedder/input_embedding", (c.vocab_size, c.d_model), _pick(None, None)),
        "final_norm": ("final_norm", (c.d_model,), _pick(None, None)),
    }
    heads_first = (1, 0, 2)  # [N, D, H] -> [D, N, H]
    for i in range(c.n_layers):
        p, b = f"layer_{i}/", f"blocks.{i}."
        for stored, key in _NORMS.items():
            if key.startswith("attn.") and not c.qk_norm:
                continue
            width = c.head_dim if key.startswith("attn.") else c.d_model
            table[b + key] = (p + stored, (width,), _pick(None, None))
        if p + "attn/qkv_einsum" in flat:
            shape = (3, c.n_heads, c.d_model, c.head_dim)
            for j, key in enumerate(("attn.query", "attn.key", "attn.value")):
                table[b + key] = (p + "attn/qkv_einsum", shape, _pick(j, heads_first))
        else:
            shape = (c.n_heads, c.d_model, c.head_dim)
            table[b + "attn.query"] = (p + "attn/q_einsum", shape, _pick(None, heads_first))
            shape = (2, c.n_kv_heads, c.d_model, c.head_dim)
            for j, key in enumerate(("attn.key", "attn.value")):
                table[b + key] = (p + "attn/kv_einsum", shape, _pick(j, heads_first))
        shape = (c.n_heads, c.head_dim, c.d_model)
        table[b + "attn.output"] = (p + "attn/attn_vec_einsum", shape, _pick(None, None))
        gating = flat.get(p + "mlp/gating_einsum")
        if gating is not None and gating.shape == (2, c.d_model, c.d_ff) and c.d_model != c.d_ff:
            shape, transpose = (2, c.d_model, c.d_ff), None  # "...F,NFH->...NH" variant
        else:
            shape, transpose = (2, c.d_ff, c.d_model), (1, 0)  # Gemma 2/3 [2, F, D]
        for j, key in enumerate(("mlp.gate", "mlp.up")):
            table[b + key] = (p + "mlp/gating_einsum", shape, _pick(j, transpose))
        table[b + "mlp.down"] = (p + "mlp/linear", (c.d_ff, c.d_model), _pick(None, None))
    return table


def load_orbax(
    directory: str | os.PathLike, *, dtype: Any = np.float32
) -> tuple[Gemma3Config, dict[str, np.ndarray]]:
    """Loads an orbax Gemma 3 checkpoint directory as ``(config, canonical params)``.

    The tree is restored to numpy in its stored dtype, then converted tensor by tensor; each
    stored array is released once the canonical tensors taken from it are built.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"orbax checkpoint directory {directory} does not exist")
    flat = _flatten(_restore(directory))
    config, table = _checked_layout(flat, directory)
    remaining_uses: dict[str, int] = {}
    for stored, _, _ in table.values():
        remaining_uses[stored] = remaining_uses.get(stored, 0) + 1
    params: dict[str, np.ndarray] = {}
    checked: set[str] = set()
    for key, (stored, _, to_canonical) in table.items():
        if stored not in checked:
            layout.check_finite(directory, stored, flat[stored])
            checked.add(stored)
        shift = 1.0 if layout.canonical_kind(key) == "norm" else 0.0
        params[key] = layout.materialize(to_canonical(flat[stored]), dtype, owned=True, shift=shift)
        remaining_uses[stored] -= 1
        if not remaining_uses[stored]:
            del flat[stored]
    return config, params


def _ignored(path: str) -> bool:
    """Multimodal parts of the tree that the text decoder does not use."""
    return path.startswith(
        (
            "embedder/mm_",
            "vision_encoder/",
            "SigLiPFromPatches_0/",
            "opt_state",
            "step",
            "collections",
        )
    )
