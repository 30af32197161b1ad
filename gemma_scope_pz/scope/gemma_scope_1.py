"""Gemma Scope 1 JumpReLU SAEs, stored as ``params.npz``."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from gemma_scope_pz.scope.checkpoint_files import (
    NPZ_FILE,
    CheckpointError,
    fetch_files,
    labels_from_folder,
)
from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta

__all__ = ["load_gemma_scope_1"]


def load_gemma_scope_1(
    source: str | os.PathLike,
    folder: str | None = None,
    *,
    dtype: jax.typing.DTypeLike = jnp.float32,
    revision: str | None = None,
    site: str = "",
    name: str = "sae",
) -> AutoEncoder:
    """Loads a Gemma Scope 1 JumpReLU SAE from ``params.npz`` (never unpickling).

    Keys W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec, threshold are matched
    case-insensitively. ``site`` defaults to one guessed from "layer_<L>" in the path and
    the repo suffix (-res -> resid_post, -mlp -> mlp_out, -att -> attn_out), else "".
    """
    paths, label = fetch_files(source, folder, [NPZ_FILE], revision)
    path = paths[NPZ_FILE]
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable .npz file: {exc}") from exc
    with npz:
        by_lower = {key.lower(): key for key in npz.files}
        required = ["w_enc", "b_enc", "w_dec", "b_dec", "threshold"]
        missing = [key for key in required if key not in by_lower]
        if missing:
            raise CheckpointError(
                f"{path}: missing array(s) {missing}; file has {sorted(npz.files)}"
            )
        arrays = {}
        for key in required:
            value = npz[by_lower[key]]
            if not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
                raise CheckpointError(
                    f"{path}: array {by_lower[key]!r} {value.shape} is not finite floats"
                )
            arrays[key] = jax.device_put(value.astype(dtype, copy=False))
            del value
    if not site:
        layer = re.search(r"layer_(\d+)", label)
        kind = next(
            (
                k
                for suffix, k in (("-res", "resid_post"), ("-mlp", "mlp_out"), ("-att", "attn_out"))
                if suffix in label
            ),
            None,
        )
        site = f"blocks.{layer.group(1)}.{kind}" if layer and kind else ""
    d_in, d_sae = arrays["w_enc"].shape
    meta = SaeMeta(
        d_in=d_in,
        d_sae=d_sae,
        d_out=arrays["w_dec"].shape[-1],
        site_in=site,
        site_out=site,
        source=label,
        extra={"format": "gemma_scope_1", **labels_from_folder(label)},
    )
    try:
        return AutoEncoder.from_arrays(**arrays, dtype=dtype, meta=meta, name=name)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
