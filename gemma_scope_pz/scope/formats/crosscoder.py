"""Loading Gemma Scope 2 weakly causal crosscoders (``crosscoder/layer_A_B_C_D_width_*_l0_*``).

Confirmed by Google (model card / announcement "Announcing Gemma Scope 2", Dec 2025): the
``crosscoder`` folders of every base-model repo hold JumpReLU "weakly causal crosscoders trained on
the concatenation of 4 layers" (25%, 50%, 65%, 85% depth). "Weakly causal" is the term of Lindsey
et al. 2024 ("Sparse Crosscoders", transformer-circuits.pub): each latent is assigned an encoder
layer ``i``, reads the residual stream at layer ``i`` alone and reconstructs layer ``i`` and every
later one. No reader from Google or SAELens exists (SAELens 6.54 has none).

Seen in public third-party code that reads the released files (not Google's; recorded values, not a
specification), all consistent with each other and with the definition above:

* folders ``layer_A_B_C_D_width_{16k,65k,262k,1m}_l0_{small,medium,big}`` with files
  ``params_layer_{0..3}.safetensors`` (``i`` is the position in the layer list);
* ``config.json`` of ``google/gemma-scope-2-270m-pt`` ``crosscoder/layer_5_9_12_15_width_1m_l0_big``:
  ``type: "crosscoder"``, ``architecture: "jump_relu"``, ``affine_connection: false``,
  ``hf_hook_point_in``/``_out``: ``"model.layers.{5,9,12,15}.output"`` (a brace list of the layers:
  resid_post), ``width: 1048576`` (the total over the four layers);
* 262,144 latents = 65,536 per layer x 4 (1B, width 262k): file ``i`` holds ``w_enc``
  [d_model, m], ``b_enc`` and ``threshold`` [m] of the latents that read layer ``i``, ``w_dec``
  [m, 4, d_model] (decoder to each of the four layers, indexed by position) and ``b_dec`` [d_model]
  (the bias of layer ``i``'s reconstruction).

What we therefore do (the "released layout", recognised by a 3-D ``w_dec``): the files' latents are
concatenated in file order into one latent space; layer ``k``'s encoder is zero outside the latents of
file ``k``, and the decoder of file ``i``'s latents to a layer ``k < i`` is dropped (set to zero), as
weakly causal latents write only to their own and later layers (as the CLT loader keeps targets
``>= i``). Still assumed, not confirmed: that those earlier-layer decoder entries are unused (rather
than trained), the order of latents (file order) and that no normalisation is applied. The encoder
is held densely: n times its size on disk.

The shared-latent layout this module accepted before the released one was known (every file a
2-D ``w_dec`` [d_sae, d_model] over ONE set of latents, ``b_enc``/``threshold`` in the first file
and, if repeated, equal) is still read; it has no published source.

Anything else (another ``type``, an ``affine_connection``, a hook list that disagrees with the
folder name, an unexpected tensor shape) is refused by name.
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
_LIST_RE = re.compile(r"\{([0-9]+(?:,[0-9]+)*)\}")


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


def _check_config(config: dict, where: str, layers: list[int]) -> str:
    """Validates type / architecture / hook points; returns the site kind read."""
    check_type(config, ("crosscoder",), where, "a crosscoder")
    check_jumprelu(config, where, "crosscoder")
    if config.get("affine_connection", False) is not False:
        raise CheckpointError(
            f"{where}: affine_connection={config['affine_connection']!r}: crosscoders with a skip "
            "connection are not supported"
        )
    hooks = config.get("hf_hook_point_in", "model.layers.{all}.output")
    kinds = set()
    for hook in hooks if isinstance(hooks, list) else [hooks]:
        hook = str(hook)
        listed = _LIST_RE.search(hook)  # "model.layers.{5,9,12,15}.output", as released
        if listed:
            named = [int(n) for n in listed.group(1).split(",")]
            if named != layers:
                raise CheckpointError(
                    f"{where}: hook point {hook!r} lists layers {named}, the folder name {layers}"
                )
            hook = hook[: listed.start()] + "{all}" + hook[listed.end() :]
        try:
            kinds.add(site_kind_from_hook(hook)[0])
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


def _read_partitioned(path: Path, pos: int, n: int, d_model, dtype) -> dict[str, jax.Array]:
    """One file of the released layout: the latents that read layer ``pos`` (module docstring)."""
    infos = read_safetensors_header(path)
    keys = ["w_enc", "w_dec", "b_dec", *_SHARED]
    check_tensors(path, infos, keys)
    if len(infos["w_enc"].shape) != 2:
        raise CheckpointError(
            f"{path}: w_enc has shape {infos['w_enc'].shape}, expected [d_model, d_sae]"
        )
    d, m = infos["w_enc"].shape
    if d_model is not None and d != d_model:
        raise CheckpointError(f"{path}: w_enc has d_model={d}, the first file {d_model}")
    expected = {"w_dec": (m, n, d), "b_dec": (d,), "b_enc": (m,), "threshold": (m,)}
    check_shapes(
        path,
        {k: infos[k].shape for k in expected},
        expected,
        f"position {pos} of {n} layers, d_model={d}, {m} latents",
    )
    return load_tensors(path, infos, keys, dtype)


def _assemble_partitioned(parts: list[dict[str, jax.Array]]) -> dict:
    """Per-file latents → one latent space: encoders block-diagonal, decoders to layers >= own."""
    n = len(parts)
    widths = [p["w_enc"].shape[1] for p in parts]
    starts = np.cumsum([0, *widths])
    total, d_model = int(starts[-1]), parts[0]["w_enc"].shape[0]
    w_enc, w_dec = [], []
    for k in range(n):
        enc = jnp.zeros((d_model, total), parts[k]["w_enc"].dtype)
        w_enc.append(enc.at[:, starts[k] : starts[k + 1]].set(parts[k]["w_enc"]))
        # Latents of file i write to layers i, i+1, ... (weakly causal); earlier targets dropped.
        blocks = [
            p["w_dec"][:, k, :] if i <= k else jnp.zeros_like(p["w_dec"][:, k, :])
            for i, p in enumerate(parts)
        ]
        w_dec.append(jnp.concatenate(blocks, axis=0))
    return {
        "w_enc": w_enc,
        "w_dec": w_dec,
        "b_dec": [p["b_dec"] for p in parts],
        "b_enc": jnp.concatenate([p["b_enc"] for p in parts]),
        "threshold": jnp.concatenate([p["threshold"] for p in parts]),
    }


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
    site_kind = _check_config(config, str(paths.get(CONFIG_FILE, label)), layers)
    indices = _file_indices(base, folder, layers, revision, label)
    names = [f"params_layer_{i}.safetensors" for i in indices]
    first = fetch_files(base, folder, names[:1], revision)[0][names[0]]
    dec = read_safetensors_header(first).get("w_dec")
    if dec is not None and len(dec.shape) == 3:  # the released layout
        files = [fetch_files(base, folder, [nm], revision)[0][nm] for nm in names]
        per_file, d_model = [], None
        for pos, path in enumerate(files):
            per_file.append(_read_partitioned(path, pos, len(layers), d_model, dtype))
            d_model = per_file[0]["w_enc"].shape[0]
        arrays = _assemble_partitioned(per_file)
        extra = {"latents_per_layer": [p["w_enc"].shape[1] for p in per_file]}
        return _finish(arrays, config, layers, site_kind, label, extra)
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
    arrays = {**parts, "b_enc": shared["b_enc"], "threshold": shared["threshold"]}
    return _finish(arrays, config, layers, site_kind, label, {})


def _finish(arrays: dict, config: dict, layers, site_kind: str, label: str, extra) -> Crosscoder:
    d_model, d_sae = arrays["w_enc"][0].shape
    width = config.get("width")
    if width is not None and width != d_sae:
        raise CheckpointError(
            f"{label}: the files hold {d_sae} latents but config width is {width!r}"
        )
    meta = SaeMeta(
        d_in=d_model,
        d_sae=d_sae,
        d_out=d_model,
        source=label,
        extra={
            **config,
            "layers": layers,
            "site_kind": site_kind,
            **extra,
            **labels_from_folder(label),
        },
    )
    return Crosscoder(meta=meta, **arrays)
