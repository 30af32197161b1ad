"""Gemma Scope 2 cross-layer transcoders (CLTs).

A CLT stores one ``params_layer_{i}.safetensors`` per source layer ``i``, with ``w_enc``
[d_model, d_sae], ``b_enc``/``threshold`` [d_sae], ``b_dec`` [d_model], an optional
``affine_skip_connection`` [d_model, d_model] and a decoder ``w_dec`` [d_sae, n_layers, d_model]
to every layer, of which only the targets ``i, i+1, ...`` are used (and kept when loading).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from penzai import pz

from gemma_scope_pz.scope import sae as sae_math
from gemma_scope_pz.scope.checkpoint_files import (
    CONFIG_FILE,
    CheckpointError,
    fetch_files,
    labels_from_folder,
    list_folder_files,
    split_source,
)
from gemma_scope_pz.scope.hook_points import site_from_hook
from gemma_scope_pz.scope.layers import SaeMeta
from gemma_scope_pz.scope.safetensors_io import (
    check_shapes,
    check_tensors,
    load_tensors,
    read_safetensors_header,
)

__all__ = ["CrossLayerTranscoder", "load_clt"]

_CLT_FILE_RE = re.compile(r"^params_layer_(\d+)\.safetensors$")


@pz.pytree_dataclass
class CrossLayerTranscoder(pz.Struct):
    """A Gemma Scope 2 cross-layer transcoder (CLT) on plain ``[..., d]`` arrays.

    Source layer ``i`` encodes its MLP input ``x_i`` into latents ``f_i``; the output for
    target layer ``j`` is ``sum_{i <= j} f_i @ w_dec[i][:, j - i] + b_dec[j]`` plus the
    affine skip ``x_j @ w_skip[j]`` when present.

    Attributes:
      w_enc: Per source layer, [d_model, d_sae].
      b_enc: Per source layer, [d_sae].
      threshold: Per source layer, [d_sae] (JumpReLU).
      w_dec: Per source layer i, [d_sae, n_layers - i, d_model] (targets i, i+1, ...).
      b_dec: Per target layer, [d_model].
      w_skip: Per layer [d_model, d_model], or None.
      meta: Static `SaeMeta` shared by all layers (d_in = d_out = d_model); its extra holds
        "n_layers" and the site kinds read and written ("mlp_in" / "mlp_out" by default).
    """

    w_enc: list[jax.Array]
    b_enc: list[jax.Array]
    threshold: list[jax.Array]
    w_dec: list[jax.Array]
    b_dec: list[jax.Array]
    w_skip: list[jax.Array] | None
    meta: SaeMeta = dataclasses.field(metadata={"pytree_node": False})

    @property
    def n_layers(self) -> int:
        return len(self.w_enc)

    def sites(self, layer: int) -> tuple[str, str]:
        """(input site, output site) of ``layer``, e.g. ("blocks.3.mlp_in", "blocks.3.mlp_out")."""
        kind_in = self.meta.extra.get("site_kind_in", "mlp_in")
        kind_out = self.meta.extra.get("site_kind_out", "mlp_out")
        return f"blocks.{layer}.{kind_in}", f"blocks.{layer}.{kind_out}"

    def encode(self, x: jax.Array, layer: int) -> jax.Array:
        """Latents [..., d_sae] of source layer ``layer`` for its input ``x`` [..., d_model]."""
        z = sae_math.pre_activations(x, self.w_enc[layer], self.b_enc[layer])
        return sae_math.jumprelu(z, self.threshold[layer])

    def decode_to_layer(self, latents_by_layer: Sequence[jax.Array], target: int) -> jax.Array:
        """Reconstruction at ``target`` from latents of source layers 0..target (skip excluded)."""
        if len(latents_by_layer) <= target:
            raise ValueError(
                f"need latents of layers 0..{target}, got {len(latents_by_layer)} layers"
            )
        out = sae_math.decode(latents_by_layer[0], self.w_dec[0][:, target], self.b_dec[target])
        for i in range(1, target + 1):
            out = out + sae_math.matmul(latents_by_layer[i], self.w_dec[i][:, target - i])
        return out

    def skip_to_layer(self, x: jax.Array, layer: int) -> jax.Array:
        """The affine skip term ``x @ w_skip[layer]`` (zeros when there is no skip)."""
        return jnp.zeros_like(x) if self.w_skip is None else sae_math.skip(x, self.w_skip[layer])

    def __call__(self, inputs_by_layer: Sequence[jax.Array]) -> list[jax.Array]:
        """Outputs for every layer, given the MLP inputs of every layer."""
        latents = [self.encode(x, i) for i, x in enumerate(inputs_by_layer)]
        return [
            self.decode_to_layer(latents, j) + self.skip_to_layer(inputs_by_layer[j], j)
            for j in range(len(inputs_by_layer))
        ]


def _clt_layer_files(source, folder, n_layers, revision) -> tuple[list[Path], str, dict]:
    """The per-layer files (counted when ``n_layers`` is None), a source label and the config."""
    base, folder, _ = split_source(source, folder)
    if n_layers is None:
        names = list_folder_files(base, folder, revision)
        indices = sorted(int(m.group(1)) for m in map(_CLT_FILE_RE.match, names) if m)
        if not indices or indices != list(range(len(indices))):
            raise FileNotFoundError(
                f"{source}:{folder}: expected params_layer_0..N-1.safetensors, found {indices}"
            )
        n_layers = len(indices)
    names = [f"params_layer_{i}.safetensors" for i in range(n_layers)]
    paths, label = fetch_files(base, folder, names, revision, optional=[CONFIG_FILE])
    config = json.loads(paths[CONFIG_FILE].read_text()) if CONFIG_FILE in paths else {}
    return [paths[n] for n in names], label, config


def load_clt(
    source: str | os.PathLike,
    folder: str | None = None,
    *,
    n_layers: int | None = None,
    dtype: jax.typing.DTypeLike = jnp.float32,
    revision: str | None = None,
) -> CrossLayerTranscoder:
    """Loads a Gemma Scope 2 cross-layer transcoder (``params_layer_{i}.safetensors`` files).

    Only the used part ``w_dec[:, i:, :]`` of each source layer's decoder is kept.
    ``n_layers`` defaults to the number of layer files found (locally or on the hub).
    """
    files, label, config = _clt_layer_files(source, folder, n_layers, revision)
    n = len(files)
    parts: dict[str, list[jax.Array]] = {
        k: [] for k in ("w_enc", "b_enc", "threshold", "w_dec", "b_dec", "w_skip")
    }
    d_model = d_sae = None
    for i, path in enumerate(files):
        infos = read_safetensors_header(path)
        keys = ["w_enc", "b_enc", "threshold", "w_dec", "b_dec"]
        if "affine_skip_connection" in infos or parts["w_skip"]:
            keys.append("affine_skip_connection")
        check_tensors(path, infos, keys)
        if d_model is None:
            if len(infos["w_enc"].shape) != 2:
                raise CheckpointError(
                    f"{path}: w_enc has shape {infos['w_enc'].shape}, expected [d_model, d_sae]"
                )
            d_model, d_sae = infos["w_enc"].shape
        check_shapes(
            path,
            {k: infos[k].shape for k in keys},
            {
                "w_enc": (d_model, d_sae),
                "b_enc": (d_sae,),
                "threshold": (d_sae,),
                "w_dec": (d_sae, n, d_model),
                "b_dec": (d_model,),
                "affine_skip_connection": (d_model, d_model),
            },
            f"{n} layers, d_model={d_model}, d_sae={d_sae}",
        )
        arrays = load_tensors(path, infos, keys, dtype, tail_start={"w_dec": i})
        for key, value in arrays.items():
            parts["w_skip" if key == "affine_skip_connection" else key].append(value)
    kinds = {}
    for end, default in (("in", "mlp_in"), ("out", "mlp_out")):
        hook = config.get(f"hf_hook_point_{end}")
        kinds[f"site_kind_{end}"] = site_from_hook(hook).split(".")[-1] if hook else default
    meta = SaeMeta(
        d_in=d_model,
        d_sae=d_sae,
        d_out=d_model,
        source=label,
        extra={**config, "n_layers": n, **kinds, **labels_from_folder(label)},
    )
    return CrossLayerTranscoder(w_skip=parts.pop("w_skip") or None, meta=meta, **parts)
