"""Loading Gemma Scope 2 weakly causal crosscoders (``crosscoder/layer_A_B_C_D_width_*_l0_*``).

What is confirmed (the release's model card and announcement): the ``crosscoder`` folders of each
base-model repo hold weakly causal crosscoders trained on the concatenated residual streams of four
layers (25%, 50%, 65%, 85% depth), named ``layer_A_B_C_D_width_<W>_l0_<L>``, with
``params_layer_{i}.safetensors`` files, a ``config.json`` with ``type: "crosscoder"``, JumpReLU
activations like the rest of the release.

What could NOT be confirmed from published code or documentation (no public reader exists; SAELens
has none) and is therefore an assumption, checked loudly where the files allow:

* ``i`` in ``params_layer_{i}`` is the position 0..3 in the folder's layer list; files named by the
  model layer (``params_layer_A`` ...) are accepted too.
* Each file holds that layer's slice of the encoder ``w_enc`` [d_model, d_sae] and its decoder
  ``w_dec`` [d_sae, d_model] and ``b_dec`` [d_model]; ``b_enc`` and ``threshold`` [d_sae] are shared
  (present in the first file, and if present in others they must be equal, else an error names the
  layer).
* Encoding sums the per-layer pre-activations (the concatenated input times the stacked encoder), and
  "weakly causal" masking is already in the weights as zeros; nothing extra is applied.
* The layers are read at ``resid_post`` (hook points ``model.layers.{all}.output`` or per layer).

Anything else (another ``type``, another architecture, an unexpected tensor shape) is refused by name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gemma_scope_pz.scope.crosscoder import Crosscoder
from gemma_scope_pz.scope.formats.files import (
    CONFIG_FILE,
    CheckpointError,
    check_jumprelu,
    check_shapes,
    check_tensors,
    check_type,
    fetch_files,
    labels_from_folder,
    list_folder_files,
    load_tensors,
    read_json,
    read_safetensors_header,
    split_source,
)
from gemma_scope_pz.scope.formats.hook_names import site_kind_from_hook
from gemma_scope_pz.scope.layers import SaeMeta

__all__ = ["crosscoder_layers", "load_crosscoder"]

_NAME_RE = re.compile(r"layer_((?:[0-9]+_)+)width_([0-9]+[kmKM]?)(?:_l0_[A-Za-z0-9]+)?.*")
_FILE_RE = re.compile(r"^params_layer_([0-9]+)\.safetensors$")
_SHARED = ("b_enc", "threshold")


def crosscoder_layers(folder: str) -> list[int]:
    """The model layers in a crosscoder folder name: "crosscoder/layer_4_9_11_15_width_65k_l0_big"."""
    name = folder.rstrip("/").rsplit("/", 1)[-1]
    match = _NAME_RE.fullmatch(name)
    if not match:
        raise CheckpointError(
            f"{folder!r} is not a crosscoder folder name 'layer_A_B_..._width_W...'"
        )
    layers = [int(p) for p in match.group(1).strip("_").split("_")]
    if layers != sorted(set(layers)):
        raise CheckpointError(f"{folder!r}: layers {layers} are not increasing")
    return layers


def _check_config(config: dict, where: str) -> str:
    """Validates type / architecture / hook points; returns the site kind read."""
    check_type(config, ("crosscoder",), where, "a crosscoder")
    check_jumprelu(config, where, "crosscoder")
    hooks = config.get("hf_hook_point_in", "model.layers.{all}.output")
    kinds = set()
    for hook in hooks if isinstance(hooks, list) else [hooks]:
        try:
            kinds.add(site_kind_from_hook(str(hook))[0])
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from exc
    if len(kinds) != 1:
        raise CheckpointError(
            f"{where}: hook points {hooks!r} name different site kinds {sorted(kinds)}"
        )
    return kinds.pop()


def _file_indices(source, folder, layers: list[int], revision, label: str) -> list[int]:
    """The ``i`` of the layer files: positions 0..n-1, or the model layers themselves."""
    found = sorted(
        int(m.group(1))
        for m in map(_FILE_RE.match, list_folder_files(source, folder, revision))
        if m
    )
    for candidate in (list(range(len(layers))), layers):
        if found == candidate:
            return candidate
    raise FileNotFoundError(
        f"{label}: expected params_layer_0..{len(layers) - 1}.safetensors (or params_layer_L for the "
        f"layers {layers}), found {found}"
    )


def _read_layer(path: Path, pos: int, layer: int, sizes: dict, dtype) -> dict[str, jax.Array]:
    infos = read_safetensors_header(path)
    shared = [k for k in _SHARED if k in infos]
    if pos == 0 and len(shared) != len(_SHARED):
        check_tensors(path, infos, ["w_enc", "w_dec", "b_dec", *_SHARED])
    check_tensors(path, infos, ["w_enc", "w_dec", "b_dec", *shared])
    if len(infos["w_enc"].shape) != 2:
        raise CheckpointError(
            f"{path}: w_enc has shape {infos['w_enc'].shape}, expected [d_model, d_sae]"
        )
    d_model, d_sae = sizes.setdefault("sizes", infos["w_enc"].shape)
    expected = {
        "w_enc": (d_model, d_sae),
        "w_dec": (d_sae, d_model),
        "b_dec": (d_model,),
        "b_enc": (d_sae,),
        "threshold": (d_sae,),
    }
    check_shapes(
        path,
        {k: infos[k].shape for k in infos if k in expected},
        expected,
        f"layer {layer}, d_model={d_model}, d_sae={d_sae}",
    )
    return load_tensors(path, infos, ["w_enc", "w_dec", "b_dec", *shared], dtype)


def load_crosscoder(
    source: str | os.PathLike,
    folder: str | None = None,
    *,
    dtype: jax.typing.DTypeLike = jnp.float32,
    revision: str | None = None,
) -> Crosscoder:
    """Loads a Gemma Scope 2 weakly causal crosscoder folder (see the module docstring for the layout).

    The config and the folder listing are validated before any layer file is downloaded.

    Raises:
      CheckpointError: not a crosscoder (naming the type), malformed or inconsistent tensors (naming
        the file and layer). FileNotFoundError: missing files.
    """
    base, folder, _ = split_source(source, folder)
    paths, label = fetch_files(base, folder, [], revision, optional=[CONFIG_FILE])
    layers = crosscoder_layers(folder or base)
    config = read_json(paths[CONFIG_FILE]) if CONFIG_FILE in paths else {}
    site_kind = _check_config(config, str(paths.get(CONFIG_FILE, label)))
    indices = _file_indices(base, folder, layers, revision, label)
    parts: dict[str, list[jax.Array]] = {"w_enc": [], "w_dec": [], "b_dec": []}
    shared: dict[str, jax.Array] = {}
    sizes: dict = {}
    for pos, (index, layer) in enumerate(zip(indices, layers, strict=True)):
        name = f"params_layer_{index}.safetensors"
        path = fetch_files(base, folder, [name], revision)[0][name]
        arrays = _read_layer(path, pos, layer, sizes, dtype)
        for key in _SHARED:
            if key in arrays and key in shared and not np.array_equal(arrays[key], shared[key]):
                raise CheckpointError(
                    f"{path}: layer {layer}'s {key!r} differs from the first layer's; a crosscoder shares one {key}"
                )
            shared.setdefault(key, arrays.pop(key, None))
        for key in parts:
            parts[key].append(arrays[key])
    width = config.get("width")
    d_model, d_sae = sizes["sizes"]
    if width is not None and width != d_sae:
        raise CheckpointError(f"{label}: w_enc gives d_sae={d_sae} but config width is {width!r}")
    meta = SaeMeta(
        d_in=d_model,
        d_sae=d_sae,
        d_out=d_model,
        source=label,
        extra={**config, "layers": layers, "site_kind": site_kind, **labels_from_folder(label)},
    )
    return Crosscoder(b_enc=shared["b_enc"], threshold=shared["threshold"], meta=meta, **parts)
