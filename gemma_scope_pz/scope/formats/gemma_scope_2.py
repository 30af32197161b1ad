"""Gemma Scope 2 SAEs and transcoders: one folder per dictionary (reader and the one writer).

Each folder (e.g. ``google/gemma-scope-2-1b-pt`` / ``resid_post/layer_9_width_16k_l0_small``) holds

* ``config.json``: ``hf_hook_point_in`` / ``hf_hook_point_out`` (HF module paths such as
  ``"model.layers.9.output"``), ``width``, ``l0``, ``architecture`` ("jump_relu"),
  ``type`` ("sae", "transcoder"; "clt" and "crosscoder" have their own loaders), ``affine_connection``
  and ``model_name``;
* ``params.safetensors``: ``w_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``w_dec`` [d_sae, d_out],
  ``b_dec`` [d_out], ``threshold`` [d_sae] and, for affine transcoders,
  ``affine_skip_connection`` [d_in, d_out] (the skip term is ``x @ affine_skip_connection``).

The reader also accepts ``architecture`` "relu" and "topk" (older exports of this package). The writer
`save_gemma_scope_2` writes only what Gemma Scope 2 readers accept (SAELens's ``gemma_3`` loader raises
on anything but "jump_relu"): a ReLU dictionary is written as JumpReLU with threshold 0 (exact, since
``z * (z > 0) == relu(z)``); a TopK dictionary has no exact JumpReLU form and is refused unless the
caller passes ``topk_threshold`` (then it is written as JumpReLU with that threshold, an approximation:
the number of active latents per token is no longer fixed at k).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from gemma_scope_pz.io import write_folder_atomically
from gemma_scope_pz.scope.formats import offline
from gemma_scope_pz.scope.formats.files import (
    CONFIG_FILE,
    NPZ_FILE,
    PARAMS_FILE,
    CheckpointError,
    TensorEntry,
    check_shapes,
    check_tensors,
    check_type,
    fetch_files,
    labels_from_folder,
    load_tensors,
    read_json,
    read_safetensors_header,
    split_source,
)
from gemma_scope_pz.scope.formats.gemma_scope_1 import load_gemma_scope_1, model_from_release
from gemma_scope_pz.scope.formats.hook_names import (
    ARCHITECTURE_NAMES,
    hf_model_id,
    hook_from_site,
    site_from_hook,
)
from gemma_scope_pz.scope.layers import AutoEncoder, AutoEncoderSkip, SaeMeta

__all__ = [
    "gemma_scope_2_config",
    "json_entries",
    "jumprelu_threshold",
    "load_sae",
    "save_gemma_scope_2",
]


def _read_config(config_path: Path) -> tuple[dict, str, str, int | None]:
    """The config, its type, our activation name and k, validated."""
    config = read_json(config_path)
    kind = check_type(config, ("sae", "transcoder"), str(config_path), "an SAE/transcoder")
    arch = str(config.get("architecture", "jump_relu")).lower()
    if arch not in ARCHITECTURE_NAMES:
        raise CheckpointError(f"{config_path}: unsupported architecture {arch!r}")
    activation = ARCHITECTURE_NAMES[arch]
    k = config.get("k")
    if activation == "topk" and (type(k) is not int or k < 1):
        raise CheckpointError(f"{config_path}: architecture 'topk' needs an integer 'k', got {k!r}")
    return config, kind, activation, k if activation == "topk" else None


def _required_tensors(
    params_path: Path, config_path: Path, config: dict, infos: Mapping[str, TensorEntry], activation
) -> list[str]:
    """The tensor names the file must hold, checked against ``affine_connection``."""
    required = ["w_enc", "b_enc", "w_dec", "b_dec"] + (
        ["threshold"] if activation == "jumprelu" else []
    )
    affine = config.get("affine_connection", False)
    if not isinstance(affine, bool):
        raise CheckpointError(
            f"{config_path}: affine_connection must be true or false, got {affine!r}"
        )
    if affine:
        required.append("affine_skip_connection")
    elif "affine_skip_connection" in infos:
        raise CheckpointError(
            f"{params_path}: has 'affine_skip_connection' but {config_path} says affine_connection=false"
        )
    check_tensors(params_path, infos, required)
    return required


def _check_sizes(
    params_path: Path,
    config_path: Path,
    config: dict,
    kind: str,
    shapes: Mapping[str, tuple[int, ...]],
    expected_d_in: int | None,
) -> tuple[int, int, int]:
    """(d_in, d_sae, d_out) from w_enc / w_dec, checked against the config and the caller."""
    w_enc, w_dec = shapes["w_enc"], shapes["w_dec"]
    if len(w_enc) != 2 or len(w_dec) != 2:
        raise CheckpointError(f"{params_path}: w_enc {w_enc} and w_dec {w_dec} must be 2-D")
    (d_in, d_sae), d_out = w_enc, w_dec[1]
    width = config.get("width")
    if width is not None and (type(width) is not int or width != d_sae):
        raise CheckpointError(
            f"{params_path}: w_enc has shape {w_enc} but {config_path} says width={width}"
        )
    if expected_d_in is not None and d_in != expected_d_in:
        raise CheckpointError(
            f"{params_path}: w_enc has shape {w_enc}: d_in={d_in}, expected {expected_d_in}"
        )
    if kind == "sae" and d_out != d_in:
        raise CheckpointError(
            f"{params_path}: SAE with w_enc {w_enc} and w_dec {w_dec}: d_in != d_out"
        )
    expected = {
        "b_enc": (d_sae,),
        "w_dec": (d_sae, d_out),
        "b_dec": (d_out,),
        "threshold": (d_sae,),
        "affine_skip_connection": (d_in, d_out),
    }
    check_shapes(params_path, shapes, expected, f"from w_enc {w_enc} and w_dec {w_dec}")
    return d_in, d_sae, d_out


def _sites(config_path: Path, config: dict) -> tuple[str, str]:
    hook_in = config.get("hf_hook_point_in")
    hook_out = config.get("hf_hook_point_out", hook_in)
    try:
        return (
            site_from_hook(hook_in) if hook_in else "",
            site_from_hook(hook_out) if hook_out else "",
        )
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc


def _is_gemma_scope_1(source: str | os.PathLike, folder: str | None) -> bool:
    """A Gemma Scope 1 hub repo ("google/gemma-scope-2b-pt-res"), or a local params.npz folder."""
    base, sub, local = split_source(source, folder)
    if not local:
        return model_from_release(base) is not None
    root = Path(base) / (sub or "")
    return (root / NPZ_FILE).is_file() and not (root / CONFIG_FILE).is_file()


def load_sae(
    source: str | os.PathLike,
    folder: str | None = None,
    *,
    dtype: jax.typing.DTypeLike = jnp.float32,
    revision: str | None = None,
    expected_d_in: int | None = None,
    name: str = "sae",
) -> AutoEncoder | AutoEncoderSkip:
    """Loads a Gemma Scope 2 SAE or (skip) transcoder folder (Gemma Scope 1 ones too).

    A Gemma Scope 1 hub repo ("google/gemma-scope-2b-pt-res", "layer_20/width_16k/canonical") or a
    local folder holding only ``params.npz`` is read by `load_gemma_scope_1`.

    Args:
      source: A local folder, a hub repo id ("google/gemma-scope-2-1b-pt", with
        ``folder``), a single "repo:folder" string, or "offline" for the dictionaries shipped with
        the package (:mod:`~gemma_scope_pz.scope.formats.offline`, e.g. folder "resid_post/layer_9").
      folder: Sub-folder inside ``source`` holding config.json and params.safetensors.
      dtype: Parameter dtype (tensors are cast one at a time while reading).
      revision: Hub revision (branch, tag or commit) for hub sources.
      expected_d_in: If given, the input width must equal this (e.g. the model's d_model).
      name: Parameter label prefix.

    Returns:
      An `AutoEncoder`, or an `AutoEncoderSkip` for transcoders with an affine skip.

    Raises:
      FileNotFoundError: a file is missing. CheckpointError: the config or the tensors are malformed,
        missing, mis-shaped, non-float, non-finite, or contradict config.json / ``expected_d_in``.
    """
    if source == "offline" and not os.path.exists("offline"):  # the dictionaries shipped with us
        return load_offline(folder or "", dtype=dtype, expected_d_in=expected_d_in)
    if _is_gemma_scope_1(source, folder):
        sae = load_gemma_scope_1(source, folder, dtype=dtype, revision=revision, name=name)
        if expected_d_in is not None and sae.meta.d_in != expected_d_in:
            raise CheckpointError(
                f"{sae.meta.source}: d_in={sae.meta.d_in}, expected {expected_d_in}"
            )
        return sae
    paths, label = fetch_files(source, folder, [CONFIG_FILE], revision)
    config_path = paths[CONFIG_FILE]
    config, kind, activation, k = _read_config(config_path)  # before downloading the weights
    site_in, site_out = _sites(config_path, config)
    params_path = fetch_files(source, folder, [PARAMS_FILE], revision)[0][PARAMS_FILE]
    infos = read_safetensors_header(params_path)
    required = _required_tensors(params_path, config_path, config, infos, activation)
    shapes = {key: infos[key].shape for key in required}
    d_in, d_sae, d_out = _check_sizes(params_path, config_path, config, kind, shapes, expected_d_in)
    meta = SaeMeta(
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        activation=activation,
        k=k,
        site_in=site_in,
        site_out=site_out,
        source=label,
        extra={**config, **labels_from_folder(label)},
    )
    arrays = load_tensors(params_path, infos, required, dtype)
    return AutoEncoder.from_arrays(
        arrays["w_enc"],
        arrays["b_enc"],
        arrays["w_dec"],
        arrays["b_dec"],
        arrays.get("threshold"),
        activation=activation,
        k=k,
        w_skip=arrays.get("affine_skip_connection"),
        dtype=dtype,
        meta=meta,
        name=name,
    )


# ------------------------------------------------------------------------------------------------
# Writing


def jumprelu_threshold(ae: AutoEncoder, topk_threshold: float | np.ndarray | None) -> np.ndarray:
    """The JumpReLU threshold [d_sae] that represents ``ae``'s activation (see the module docstring).

    Raises:
      ValueError: for a TopK dictionary without ``topk_threshold``, or a non-finite threshold.
    """
    meta, arrays = ae.meta, ae.to_arrays()
    if meta.activation == "jumprelu":
        threshold = np.asarray(arrays["threshold"], np.float32)
    elif meta.activation == "relu":
        threshold = np.zeros(meta.d_sae, np.float32)
    elif topk_threshold is None:
        raise ValueError(
            f"a TopK dictionary (k={meta.k}) has no exact JumpReLU form, the only architecture "
            "Gemma Scope 2 and SAELens transcoder readers accept; pass topk_threshold= (e.g. the mean "
            "k-th largest pre-activation on training data) to write it as JumpReLU with that threshold"
        )
    else:
        threshold = np.broadcast_to(np.asarray(topk_threshold, np.float32), (meta.d_sae,)).copy()
    if not np.isfinite(threshold).all():
        raise ValueError(f"threshold for {meta.activation!r} export is not finite")
    return threshold


def json_entries(extra: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-serialisable entries of ``meta.extra`` (structural keys are recomputed later)."""
    config = {}
    for key, value in dict(extra).items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        config[key] = value
    return config


def gemma_scope_2_config(
    ae: AutoEncoder, *, model_name: str | None = None, topk: bool = False
) -> dict[str, Any]:
    """The config.json of ``ae`` (``model_name`` defaults to ``ae.meta.extra["model_name"]``)."""
    meta = ae.meta
    site_in, site_out = meta.site_in, meta.site_out or meta.site_in
    config = json_entries(meta.extra)
    for stale in ("k", "hf_hook_point_in", "hf_hook_point_out", "type", "architecture"):
        config.pop(stale, None)
    name = model_name or config.get("model_name")
    if not name:
        raise ValueError(
            "Gemma Scope 2 configs need a model_name: pass model_name='google/gemma-3-...'"
        )
    skip = isinstance(ae, AutoEncoderSkip)
    transcoder = site_out != site_in or skip or meta.d_in != meta.d_out
    config.update(
        model_name=hf_model_id(name),
        width=meta.d_sae,
        architecture="jump_relu",
        type="transcoder" if transcoder else "sae",
        affine_connection=skip,
    )
    if meta.activation != "jumprelu":
        config["converted_from"] = meta.activation + (f" (k={meta.k})" if topk else "")
    if site_in:
        config["hf_hook_point_in"] = hook_from_site(site_in)
        config["hf_hook_point_out"] = hook_from_site(site_out)
    return config


def save_gemma_scope_2(
    ae: AutoEncoder,
    folder: str | os.PathLike,
    *,
    overwrite: bool = False,
    model_name: str | None = None,
    topk_threshold: float | np.ndarray | None = None,
) -> Path:
    """Writes ``ae`` as a Gemma Scope 2 folder (config.json + params.safetensors), atomically.

    Args:
      ae: An `AutoEncoder` or `AutoEncoderSkip` (its ``meta`` gives sites, sizes; JSON-serialisable
        entries of ``meta.extra`` such as ``l0`` or training information are kept in config.json).
      folder: The folder to write; built in a temporary sibling and renamed into place.
      overwrite: Replace an existing folder (atomically) instead of raising FileExistsError.
      model_name: Gemma 3 model name, written as its Hugging Face id ("google/gemma-3-270m");
        defaults to ``ae.meta.extra["model_name"]``.
      topk_threshold: Required for a TopK dictionary: the JumpReLU threshold to write it with.

    Returns:
      The folder.

    Raises:
      ValueError: no Gemma 3 model name, a TopK dictionary without ``topk_threshold``, or a site
        with no Gemma Scope 2 hook point. FileExistsError: ``folder`` exists and not ``overwrite``.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists (pass overwrite=True to replace it)")
    threshold = jumprelu_threshold(ae, topk_threshold)
    config = gemma_scope_2_config(ae, model_name=model_name, topk=ae.meta.activation == "topk")
    arrays = ae.to_arrays()
    tensors = {key: arrays[key] for key in ("w_enc", "b_enc", "w_dec", "b_dec")}
    tensors["threshold"] = threshold
    if "w_skip" in arrays:
        tensors["affine_skip_connection"] = arrays["w_skip"]

    def fill(tmp: Path) -> None:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(
            {key: np.ascontiguousarray(value) for key, value in tensors.items()},
            str(tmp / PARAMS_FILE),
        )

    return write_folder_atomically(folder, fill, overwrite=overwrite)


def load_offline(
    name: str,
    *,
    dtype: jax.typing.DTypeLike = jnp.float32,
    expected_d_in: int | None = None,
    root: Path | None = None,
):
    """Loads the shipped offline dictionary ``name`` (e.g. ``"resid_post/layer_9"``).

    The files are checked against ``MANIFEST.json`` first (:func:`offline.verify`), then read as a
    Gemma Scope 2 folder; ``sae.meta.source`` reads ``"offline:<name>"`` and the manifest's held-out
    quality figures land in ``sae.meta.extra["offline_quality"]``.
    """
    folder = offline.verify(name, root)
    sae = load_sae(folder, dtype=dtype, expected_d_in=expected_d_in)
    return offline.annotate(sae, name, root)
