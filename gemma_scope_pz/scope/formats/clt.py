"""Loading Gemma Scope 2 cross-layer transcoders (CLTs) as released.

A CLT folder (``clt/width_262k_l0_medium_affine`` ...) holds ``config.json`` and one
``params_layer_{i}.safetensors`` per source layer ``i``: ``w_enc`` [d_model, d_sae], ``b_enc`` and
``threshold`` [d_sae], ``b_dec`` [d_model], ``w_dec`` [d_sae, n_layers, d_model] (a decoder to every
layer, of which only targets ``i, i+1, ...`` are used and kept) and, for affine CLTs,
``affine_skip_connection`` [d_model, d_model] in every layer.

The released config.json names the hook points with a placeholder for the layer
(``model.layers.{all}.pre_feedforward_layernorm.output``), its ``width`` is the total number of
latents over all layers and its ``type`` is "clt". The config and the folder listing are validated
before any layer file is downloaded (a 270M CLT is several GB); each layer's header is checked as soon
as that file arrives, before the next one is fetched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp

from gemma_scope_pz.scope.cross_layer_transcoder import CrossLayerTranscoder
from gemma_scope_pz.scope.formats.files import (
    CONFIG_FILE,
    CheckpointError,
    TensorEntry,
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

__all__ = ["clt_config", "load_clt"]

_CLT_FILE_RE = re.compile(r"^params_layer_([0-9]+)\.safetensors$")
_KEYS = ("w_enc", "b_enc", "threshold", "w_dec", "b_dec")
_SKIP = "affine_skip_connection"


def clt_config(config: dict, where: str) -> dict[str, str | bool | int | None]:
    """Validated facts of a CLT config.json: site kinds, affine flag and total width.

    Raises:
      CheckpointError: naming ``where`` for a wrong ``type`` or ``architecture``, an unknown hook point,
        or a width that is not a positive integer.
    """
    check_type(config, ("clt",), where, "a cross-layer transcoder")
    check_jumprelu(config, where, "CLT")
    facts: dict[str, str | bool | int | None] = {}
    for end, default in (("in", "mlp_in"), ("out", "mlp_out")):
        hook = config.get(f"hf_hook_point_{end}")
        try:
            facts[f"site_kind_{end}"] = site_kind_from_hook(hook)[0] if hook else default
        except ValueError as exc:
            raise CheckpointError(f"{where}: {exc}") from exc
    width = config.get("width")
    if width is not None and (type(width) is not int or width < 1):
        raise CheckpointError(f"{where}: width must be a positive integer, got {width!r}")
    affine = config.get("affine_connection")
    if affine is not None and not isinstance(affine, bool):
        raise CheckpointError(f"{where}: affine_connection must be true or false, got {affine!r}")
    facts.update(width=width, affine=affine)
    return facts


def _layer_count(source, folder, n_layers: int | None, revision, label: str) -> int:
    """``n_layers``, or the number of ``params_layer_{i}`` files listed (which must be 0..N-1)."""
    if n_layers is not None:
        return n_layers
    names = list_folder_files(source, folder, revision)
    indices = sorted(int(m.group(1)) for m in map(_CLT_FILE_RE.match, names) if m)
    if not indices or indices != list(range(len(indices))):
        raise FileNotFoundError(
            f"{label}: expected params_layer_0..N-1.safetensors, found {indices}"
        )
    return len(indices)


def _check_layer(
    path: Path, infos: dict[str, TensorEntry], i: int, n: int, first: dict
) -> tuple[int, int, bool]:
    """Checks one layer file against the first one (sizes, skip present in all or none)."""
    skip = _SKIP in infos
    check_tensors(path, infos, [*_KEYS, *([_SKIP] if skip else [])])
    if len(infos["w_enc"].shape) != 2:
        raise CheckpointError(
            f"{path}: w_enc has shape {infos['w_enc'].shape}, expected [d_model, d_sae]"
        )
    d_model, d_sae = first.setdefault("sizes", infos["w_enc"].shape)
    want_skip = first.setdefault("skip", skip)
    if skip != want_skip:
        have = "has" if skip else "lacks"
        raise CheckpointError(
            f"{path}: layer {i} {have} {_SKIP!r} but layer 0 {'lacks' if skip else 'has'} it; "
            "a CLT's per-layer skips must be all present or all absent"
        )
    expected = {
        "w_enc": (d_model, d_sae),
        "b_enc": (d_sae,),
        "threshold": (d_sae,),
        "w_dec": (d_sae, n, d_model),
        "b_dec": (d_model,),
        _SKIP: (d_model, d_model),
    }
    shapes = {k: infos[k].shape for k in expected if k in infos}
    check_shapes(path, shapes, expected, f"{n} layers, d_model={d_model}, d_sae={d_sae}")
    return d_model, d_sae, skip


def load_clt(
    source: str | os.PathLike,
    folder: str | None = None,
    *,
    n_layers: int | None = None,
    dtype: jax.typing.DTypeLike = jnp.float32,
    revision: str | None = None,
) -> CrossLayerTranscoder:
    """Loads a Gemma Scope 2 cross-layer transcoder (``params_layer_{i}.safetensors`` files).

    Only the used part ``w_dec[:, i:, :]`` of each source layer's decoder is kept. ``n_layers``
    defaults to the number of layer files found (locally or on the hub).

    Raises:
      CheckpointError: the config is not a CLT's, its width is not n_layers × d_sae, a layer file is
        malformed, or the per-layer skips are partial (naming the layer). FileNotFoundError: files
        missing.
    """
    base, folder, _ = split_source(source, folder)
    paths, label = fetch_files(base, folder, [], revision, optional=[CONFIG_FILE])
    config = read_json(paths[CONFIG_FILE]) if CONFIG_FILE in paths else {}
    facts = clt_config(config, str(paths.get(CONFIG_FILE, label)))
    n = _layer_count(base, folder, n_layers, revision, label)
    width = facts["width"]
    if width is not None and width % n:
        raise CheckpointError(f"{label}: config width {width} is not a multiple of {n} layers")
    parts: dict[str, list[jax.Array]] = {k: [] for k in (*_KEYS, _SKIP)}
    first: dict = {}
    for i in range(n):
        name = f"params_layer_{i}.safetensors"
        path = fetch_files(base, folder, [name], revision)[0][name]
        infos = read_safetensors_header(path)
        d_model, d_sae, skip = _check_layer(path, infos, i, n, first)
        if width is not None and width != n * d_sae:
            raise CheckpointError(
                f"{path}: w_enc {infos['w_enc'].shape} gives {n} x {d_sae} = {n * d_sae} latents "
                f"but config width is {width}"
            )
        if facts["affine"] is not None and skip != facts["affine"]:
            raise CheckpointError(
                f"{path}: layer {i} {'has' if skip else 'lacks'} {_SKIP!r} but config.json says "
                f"affine_connection={str(facts['affine']).lower()}"
            )
        keys = [*_KEYS, *([_SKIP] if skip else [])]
        for key, value in load_tensors(path, infos, keys, dtype, tail_start={"w_dec": i}).items():
            parts[key].append(value)
    meta = SaeMeta(
        d_in=first["sizes"][0],
        d_sae=first["sizes"][1],
        d_out=first["sizes"][0],
        source=label,
        extra={**config, "n_layers": n, **_site_kinds(facts), **labels_from_folder(label)},
    )
    w_skip = parts.pop(_SKIP) or None
    return CrossLayerTranscoder(w_skip=w_skip, meta=meta, **parts)


def _site_kinds(facts: dict) -> dict[str, str]:
    return {key: facts[key] for key in ("site_kind_in", "site_kind_out")}
