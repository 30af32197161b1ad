"""Gemma Scope 2 cross-layer transcoders (CLTs).

A CLT stores one ``params_layer_{i}.safetensors`` per source layer ``i``, with ``w_enc``
[d_model, d_sae], ``b_enc``/``threshold`` [d_sae], ``b_dec`` [d_model], an optional
``affine_skip_connection`` [d_model, d_model] and a decoder ``w_dec`` [d_sae, n_layers, d_model]
to every layer, of which only the targets ``i, i+1, ...`` are used (and kept when loading).
Loading lives in :mod:`gemma_scope_pz.scope.formats.clt` (`load_clt`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from penzai import pz

from gemma_scope_pz.scope import sae as sae_math
from gemma_scope_pz.scope.layers import SaeMeta

__all__ = ["CrossLayerTranscoder"]


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
