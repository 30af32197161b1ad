"""Gemma Scope 2 SAEs and transcoders: one folder per dictionary.

Each folder (e.g. ``google/gemma-scope-2-1b-pt`` / ``resid_post/layer_9_width_16k_l0_small``)
holds

* ``config.json``: ``hf_hook_point_in`` / ``hf_hook_point_out`` (HF module paths such as
  ``"model.layers.9.output"``), ``width``, ``l0``, ``architecture`` ("jump_relu"),
  ``type`` ("sae", "transcoder" or "clt"), ``affine_connection`` and ``model_name``;
* ``params.safetensors``: ``w_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``w_dec`` [d_sae, d_out],
  ``b_dec`` [d_out], ``threshold`` [d_sae] and, for affine transcoders,
  ``affine_skip_connection`` [d_in, d_out].
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from gemma_scope_pz.scope.checkpoint_files import (
    CONFIG_FILE,
    PARAMS_FILE,
    CheckpointError,
    fetch_files,
    labels_from_folder,
)
from gemma_scope_pz.scope.hook_points import hook_from_site, site_from_hook
from gemma_scope_pz.scope.layers import AutoEncoder, AutoEncoderSkip, SaeMeta
from gemma_scope_pz.scope.safetensors_io import (
    check_shapes,
    check_tensors,
    load_tensors,
    read_safetensors_header,
)

__all__ = ["load_sae", "save_gemma_scope_2"]

_ARCHITECTURES = {"jump_relu": "jumprelu", "jumprelu": "jumprelu", "relu": "relu", "topk": "topk"}


def load_sae(
    source: str | os.PathLike,
    folder: str | None = None,
    *,
    dtype: jax.typing.DTypeLike = jnp.float32,
    revision: str | None = None,
    expected_d_in: int | None = None,
    name: str = "sae",
) -> AutoEncoder | AutoEncoderSkip:
    """Loads a Gemma Scope 2 SAE or (skip) transcoder folder.

    Args:
      source: A local folder, a hub repo id ("google/gemma-scope-2-1b-pt", with
        ``folder``) or a single "repo:folder" string.
      folder: Sub-folder inside ``source`` holding config.json and params.safetensors.
      dtype: Parameter dtype (tensors are cast one at a time while reading).
      revision: Hub revision (branch, tag or commit) for hub sources.
      expected_d_in: If given, the input width must equal this (e.g. the model's d_model).
      name: Parameter label prefix.

    Returns:
      An `AutoEncoder`, or an `AutoEncoderSkip` for transcoders with an affine skip.

    Raises:
      FileNotFoundError: a file is missing. CheckpointError: tensors are missing,
        mis-shaped, non-float, non-finite, or contradict config.json / ``expected_d_in``.
    """
    paths, label = fetch_files(source, folder, [CONFIG_FILE, PARAMS_FILE], revision)
    config_path, params_path = paths[CONFIG_FILE], paths[PARAMS_FILE]
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: not valid JSON: {exc}") from exc
    kind = config.get("type", "sae")
    if kind not in ("sae", "transcoder"):
        raise CheckpointError(
            f"{config_path}: type {kind!r} is not an SAE/transcoder (use load_clt for 'clt')"
        )
    arch = str(config.get("architecture", "jump_relu")).lower()
    if arch not in _ARCHITECTURES:
        raise CheckpointError(f"{config_path}: unsupported architecture {arch!r}")
    activation = _ARCHITECTURES[arch]
    k = config.get("k")
    if activation == "topk" and not isinstance(k, int):
        raise CheckpointError(f"{config_path}: architecture 'topk' needs an integer 'k', got {k!r}")

    infos = read_safetensors_header(params_path)
    required = ["w_enc", "b_enc", "w_dec", "b_dec"] + (
        ["threshold"] if activation == "jumprelu" else []
    )
    affine = bool(config.get("affine_connection", False))
    if affine:
        required.append("affine_skip_connection")
    elif "affine_skip_connection" in infos:
        raise CheckpointError(
            f"{params_path}: has 'affine_skip_connection' but {config_path} says affine_connection=false"
        )
    check_tensors(params_path, infos, required)
    shapes = {key: infos[key].shape for key in required}
    if len(shapes["w_enc"]) != 2 or len(shapes["w_dec"]) != 2:
        raise CheckpointError(
            f"{params_path}: w_enc {shapes['w_enc']} and w_dec {shapes['w_dec']} must be 2-D"
        )
    d_in, d_sae = shapes["w_enc"]
    d_out = shapes["w_dec"][1]
    width = config.get("width")
    if width is not None and int(width) != d_sae:
        raise CheckpointError(
            f"{params_path}: w_enc has shape {shapes['w_enc']} but {config_path} says width={width}"
        )
    if expected_d_in is not None and d_in != expected_d_in:
        raise CheckpointError(
            f"{params_path}: w_enc has shape {shapes['w_enc']}: d_in={d_in}, expected {expected_d_in}"
        )
    if kind == "sae" and d_out != d_in:
        raise CheckpointError(
            f"{params_path}: SAE with w_enc {shapes['w_enc']} and w_dec {shapes['w_dec']}: d_in != d_out"
        )
    check_shapes(
        params_path,
        shapes,
        {
            "b_enc": (d_sae,),
            "w_dec": (d_sae, d_out),
            "b_dec": (d_out,),
            "threshold": (d_sae,),
            "affine_skip_connection": (d_in, d_out),
        },
        f"from w_enc {shapes['w_enc']} and w_dec {shapes['w_dec']}",
    )

    hook_in = config.get("hf_hook_point_in")
    hook_out = config.get("hf_hook_point_out", hook_in)
    meta = SaeMeta(
        d_in=d_in,
        d_sae=d_sae,
        d_out=d_out,
        activation=activation,
        k=k,
        site_in=site_from_hook(hook_in) if hook_in else "",
        site_out=site_from_hook(hook_out) if hook_out else "",
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


def save_gemma_scope_2(
    sae: AutoEncoder, folder: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Writes ``sae`` as a Gemma Scope 2 folder (config.json + params.safetensors).

    The folder is written under a temporary name next to ``folder`` and renamed into
    place, so a crash never leaves a half-written folder. JSON-serialisable entries of
    ``sae.meta.extra`` are kept in config.json; the structural keys are recomputed.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists (pass overwrite=True)")
    meta = sae.meta
    arrays = sae.to_arrays()
    tensors = {
        key: arrays[key]
        for key in ("w_enc", "b_enc", "w_dec", "b_dec", "threshold")
        if key in arrays
    }
    if "w_skip" in arrays:
        tensors["affine_skip_connection"] = arrays["w_skip"]
    config: dict[str, Any] = {}
    for key, value in dict(meta.extra).items():
        try:
            json.dumps(value)
        except TypeError:
            continue
        config[key] = value
    site_in, site_out = meta.site_in, meta.site_out or meta.site_in
    config.update(
        width=meta.d_sae,
        architecture={"jumprelu": "jump_relu"}.get(meta.activation, meta.activation),
        type="transcoder"
        if (site_out != site_in or "w_skip" in arrays or meta.d_in != meta.d_out)
        else "sae",
        affine_connection="w_skip" in arrays,
    )
    if site_in:
        config["hf_hook_point_in"] = hook_from_site(site_in)
        config["hf_hook_point_out"] = hook_from_site(site_out)
    if meta.k is not None:
        config["k"] = meta.k
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(
            {key: np.ascontiguousarray(value) for key, value in tensors.items()},
            str(tmp / PARAMS_FILE),
        )
        os.chmod(tmp, 0o755)
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
            os.replace(folder, old / "previous")
            try:
                os.replace(tmp, folder)
            except OSError:
                os.replace(old / "previous", folder)  # put the previous version back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
