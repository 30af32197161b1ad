"""Gemma Scope 1 (Gemma 2) JumpReLU SAEs and transcoders, stored as ``params.npz``.

The site comes from the release name, as SAELens reads it (its ``gemma_2`` and ``gemma_2_transcoder``
loaders), never from substrings of a local path:

=====================================  ==========================================================
release (hub repo name)                 site
=====================================  ==========================================================
``gemma-scope-2b-pt-res[-canonical]``   ``blocks.L.resid_post``; ``embedding/...`` folders: the
                                        embedding SAE at ``blocks.0.resid_pre`` (see below)
``gemma-scope-2b-pt-mlp[-canonical]``   ``blocks.L.mlp_out``
``gemma-scope-2b-pt-att[-canonical]``   ``blocks.L.attn_out`` (SAELens: ``blocks.L.attn.hook_z``)
``gemma-scope-2b-pt-transcoders``       ``blocks.L.mlp_in`` -> ``blocks.L.mlp_out`` (SAELens:
                                        ``blocks.L.ln2.hook_normalized`` -> ``hook_mlp_out``)
=====================================  ==========================================================

The layer is read from the SAE id (``layer_12/width_16k/average_l0_82``); the model (recorded as
``meta.extra["model_name"]``, e.g. "google/gemma-2-2b") from the release, so that attaching the SAE
to a Gemma 3 model is refused. ``layer_L/width_W/canonical`` ids name the ``average_l0_N`` folder
SAELens's "-canonical" releases point to (``gemma_scope_1_canonical.json``, recorded from SAELens by
``scripts/reference_gemma_scope_1.py``); the Hub repos hold only the L0 folders.

Embedding SAEs are rescaled exactly as SAELens rescales them (``W_enc / sqrt(d_in)``,
``W_dec * sqrt(d_in)``) so that they compute what SAELens computes on its ``hook_embed``, which in
TransformerLens's Gemma 2 is the embedding already multiplied by ``sqrt(d_model)``: our
``blocks.0.resid_pre``.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import zipfile
import zlib
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np

from gemma_scope_pz.scope.formats.files import (
    NPZ_FILE,
    CheckpointError,
    fetch_files,
    labels_from_folder,
    split_source,
)
from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta

__all__ = ["canonical_folder", "load_gemma_scope_1", "model_from_release", "sites_from_release"]

_RELEASE_RE = re.compile(
    r"gemma-scope-(2b|9b|27b)-(pt|it)-(res|mlp|att|transcoders)(?:-canonical)?"
)
_KINDS = {
    "res": ("resid_post", "resid_post"),
    "mlp": ("mlp_out", "mlp_out"),
    "att": ("attn_out", "attn_out"),
    "transcoders": ("mlp_in", "mlp_out"),
}
_REQUIRED = ("w_enc", "b_enc", "w_dec", "b_dec", "threshold")


def sites_from_release(release: str, sae_id: str) -> tuple[str, str, bool]:
    """(site_in, site_out, is_embedding) for a Gemma Scope 1 release name and SAE id.

    Raises:
      ValueError: naming the release or SAE id when they do not say the site.
    """
    name = release.rsplit("/", 1)[-1]
    match = _RELEASE_RE.fullmatch(name)
    if not match:
        raise ValueError(
            f"unknown Gemma Scope 1 release {release!r}; expected e.g. 'gemma-scope-2b-pt-res' "
            "(-res, -mlp, -att, -transcoders); or pass site= explicitly"
        )
    kind_in, kind_out = _KINDS[match.group(3)]
    first = sae_id.strip("/").split("/", 1)[0]
    if match.group(3) == "res" and first == "embedding":
        return "blocks.0.resid_pre", "blocks.0.resid_pre", True
    layer = re.fullmatch(r"layer_([0-9]+)", first)
    if not layer:
        raise ValueError(f"SAE id {sae_id!r} of {release!r} does not start with 'layer_<L>/'")
    n = int(layer.group(1))
    return f"blocks.{n}.{kind_in}", f"blocks.{n}.{kind_out}", False


def model_from_release(release: str) -> str | None:
    """The Hugging Face id of the Gemma 2 model a release was trained on, None if not a release.

    "gemma-scope-2b-pt-res" -> "google/gemma-2-2b"; "gemma-scope-9b-it-res" -> "google/gemma-2-9b-it".
    """
    match = _RELEASE_RE.fullmatch(release.rsplit("/", 1)[-1])
    if not match:
        return None
    size, kind = match.group(1), match.group(2)
    return f"google/gemma-2-{size}" + ("-it" if kind == "it" else "")


@functools.cache
def _canonical_table() -> dict[str, dict[str, str]]:
    text = resources.files(__package__).joinpath("gemma_scope_1_canonical.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def canonical_folder(repo: str, sae_id: str) -> str:
    """The ``average_l0_N`` folder a ``layer_L/width_W/canonical`` id names (others unchanged).

    Raises:
      ValueError: naming the repo and id when SAELens lists no canonical SAE for them.
    """
    if not sae_id.strip("/").endswith("/canonical"):
        return sae_id
    repo_id = repo.removesuffix("-canonical")
    prefix = sae_id.strip("/").removesuffix("/canonical")
    entries = _canonical_table().get(repo_id if "/" in repo_id else f"google/{repo_id}", {})
    if prefix not in entries:
        known = sorted(entries)[:4]
        raise ValueError(
            f"{repo}: no canonical SAE {sae_id!r} (canonical ids exist for "
            f"{[k + '/canonical' for k in known] or 'no folder of this repo'}...)"
        )
    return f"{prefix}/{entries[prefix]}"


def _release_extra(release: str, site_in: str, site_out: str) -> dict[str, str]:
    """The model a release belongs to and, for transcoders, SAELens's own hook names."""
    extra = {}
    model = model_from_release(release)
    if model:
        extra["model_name"] = model
    if site_in.endswith(".mlp_in") and site_out.endswith(".mlp_out"):
        layer = site_in.split(".")[1]
        extra["saelens_hook_name"] = f"blocks.{layer}.ln2.hook_normalized"
        extra["saelens_hook_name_out"] = f"blocks.{layer}.hook_mlp_out"
    return extra


def _read_npz(path) -> dict[str, np.ndarray]:
    """The five arrays (keys matched case-insensitively), refusing object arrays and non-finite values."""
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable .npz file: {exc}") from exc
    with npz:
        by_lower = {key.lower(): key for key in npz.files}
        missing = [key for key in _REQUIRED if key not in by_lower]
        if missing:
            raise CheckpointError(
                f"{path}: missing array(s) {missing}; file has {sorted(npz.files)}"
            )
        arrays = {}
        for key in _REQUIRED:
            try:
                value = npz[by_lower[key]]
            except ValueError as exc:  # object arrays need pickle, which we never allow
                raise CheckpointError(
                    f"{path}: array {by_lower[key]!r} is not a plain numeric array ({exc})"
                ) from exc
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise CheckpointError(
                    f"{path}: array {by_lower[key]!r} is unreadable: {exc}"
                ) from exc
            if not np.issubdtype(value.dtype, np.floating):
                raise CheckpointError(
                    f"{path}: array {by_lower[key]!r} {value.shape} has dtype {value.dtype}, "
                    "expected floats"
                )
            if not np.isfinite(value).all():
                raise CheckpointError(
                    f"{path}: array {by_lower[key]!r} {value.shape} contains NaN or Inf"
                )
            arrays[key] = value
    return arrays


def load_gemma_scope_1(
    source: str | os.PathLike,
    folder: str | None = None,
    *,
    dtype: jax.typing.DTypeLike = jnp.float32,
    revision: str | None = None,
    release: str | None = None,
    site: str | None = None,
    name: str = "sae",
) -> AutoEncoder:
    """Loads a Gemma Scope 1 JumpReLU SAE or transcoder from ``params.npz`` (never unpickling).

    Args:
      source: A hub repo id ("google/gemma-scope-2b-pt-res", with ``folder``), "repo:folder", or a
        local folder.
      folder: The SAE id inside the repo ("layer_12/width_16k/average_l0_82").
      dtype: Parameter dtype.
      revision: Hub revision.
      release: The release name for a local folder (a hub source's repo name is its release).
      site: The site, overriding the one read from the release (an SAE, so site_in == site_out).
      name: Parameter label prefix.

    Keys W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_out], b_dec, threshold are matched
    case-insensitively. Without ``release``/``site`` a local folder gets an empty site.
    """
    base, sub, local = split_source(source, folder)
    if not local:  # SAELens's "-canonical" release names and ids, resolved to the hub folder
        try:
            sub = canonical_folder(base, sub or "")
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
        base = base.removesuffix("-canonical")
    paths, label = fetch_files(base, sub, [NPZ_FILE], revision)
    release = release or (None if local else base)
    site_in = site_out = site or ""
    embedding = False
    if site is None and release is not None:
        try:
            site_in, site_out, embedding = sites_from_release(release, sub or "")
        except ValueError as exc:
            raise CheckpointError(f"{label}: {exc}") from exc
    arrays = _read_npz(paths[NPZ_FILE])
    d_in, d_sae = arrays["w_enc"].shape if arrays["w_enc"].ndim == 2 else (0, 0)
    extra = {"format": "gemma_scope_1", **labels_from_folder(label)}
    if release:
        extra["release"] = release
        extra.update(_release_extra(release, site_in, site_out))
    if embedding:  # as SAELens's gemma_2 loader
        scale = math.sqrt(d_in)
        arrays["w_enc"] = arrays["w_enc"] / scale
        arrays["w_dec"] = arrays["w_dec"] * scale
        extra.update(saelens_hook_name="hook_embed", embedding_scale=scale)
    meta = SaeMeta(
        d_in=d_in,
        d_sae=d_sae,
        d_out=arrays["w_dec"].shape[-1],
        site_in=site_in,
        site_out=site_out,
        source=label,
        extra=extra,
    )
    try:
        return AutoEncoder.from_arrays(
            **{k: jax.device_put(v.astype(dtype, copy=False)) for k, v in arrays.items()},
            dtype=dtype,
            meta=meta,
            name=name,
        )
    except ValueError as exc:
        raise CheckpointError(f"{paths[NPZ_FILE]}: {exc}") from exc
