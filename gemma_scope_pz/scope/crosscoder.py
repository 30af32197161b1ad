"""Gemma Scope 2 weakly causal crosscoders: one dictionary over several layers' residual streams.

A crosscoder reads the residual stream at a few layers ``L_0 < L_1 < ...`` (Gemma Scope 2 uses four,
at 25%, 50%, 65% and 85% depth), encodes them jointly into one set of latents and decodes to every one
of those layers::

    f = JumpReLU(sum_i x_i @ w_enc[i] + b_enc)          # x_i: the activation at layer L_i
    y_i = f @ w_dec[i] + b_dec[i]                         # reconstruction of x_i

"Weakly causal" (Lindsey et al. 2024, "Sparse Crosscoders"): each latent is assigned an encoder
layer, reads the residual stream there and reconstructs that layer and every later one. We take the
restriction from the weights, as zeros, and apply no extra mask: a latent's *read position* is the
deepest layer whose encoder column is nonzero (`read_positions`), and the weights are weakly causal
when no latent writes to a layer before its read position (`is_weakly_causal`). How the latents
are computed and written inside the model is in :mod:`gemma_scope_pz.scope.multisite`; what is
confirmed about the released files is in :mod:`gemma_scope_pz.scope.formats.crosscoder`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from penzai import pz

from gemma_scope_pz.scope import sae as sae_math
from gemma_scope_pz.scope.layers import SaeMeta

__all__ = ["Crosscoder"]


@pz.pytree_dataclass
class Crosscoder(pz.Struct):
    """A multi-layer JumpReLU crosscoder on plain ``[..., d_model]`` arrays.

    Attributes:
      w_enc: Per read layer, [d_model, d_sae].
      b_enc: Shared encoder bias [d_sae].
      threshold: Shared JumpReLU thresholds [d_sae].
      w_dec: Per layer, [d_sae, d_model].
      b_dec: Per layer, [d_model].
      meta: Static `SaeMeta`; ``extra["layers"]`` lists the model layers in order and
        ``extra["site_kind"]`` the site kind they are read at ("resid_post").
    """

    w_enc: list[jax.Array]
    b_enc: jax.Array
    threshold: jax.Array
    w_dec: list[jax.Array]
    b_dec: list[jax.Array]
    meta: SaeMeta = dataclasses.field(metadata={"pytree_node": False})

    @property
    def layers(self) -> tuple[int, ...]:
        """The model layers read and written, in order."""
        return tuple(self.meta.extra["layers"])

    def sites(self) -> list[str]:
        """The sites of ``layers``, e.g. ["blocks.4.resid_post", "blocks.9.resid_post", ...]."""
        kind = self.meta.extra.get("site_kind", "resid_post")
        return [f"blocks.{layer}.{kind}" for layer in self.layers]

    def read_positions(self) -> np.ndarray:
        """Per latent, the position (0..n-1 in ``layers``) of the deepest layer it reads: int [d_sae].

        A latent whose encoder is zero everywhere reads nothing and gets position 0. Crosscoders
        loaded from the released layout know it from their files (``extra["latents_per_layer"]``)
        and skip reading the weights back from the device.
        """
        per_layer = self.meta.extra.get("latents_per_layer")
        if per_layer is not None:
            return np.repeat(np.arange(len(per_layer), dtype=np.int32), per_layer)
        reads = np.stack([np.any(np.asarray(w) != 0, axis=0) for w in self.w_enc])  # [n, d_sae]
        deepest = reads.shape[0] - 1 - np.argmax(reads[::-1], axis=0)
        return np.where(reads.any(axis=0), deepest, 0).astype(np.int32)

    def is_weakly_causal(self) -> bool:
        """Whether no latent writes to a layer before its read position (see the module docstring).

        True without looking at the weights for the released layout, whose loader drops those
        decoder entries.
        """
        if self.meta.extra.get("latents_per_layer") is not None:
            return True
        read = self.read_positions()
        for k, w in enumerate(self.w_dec):
            early = read > k  # latents not yet computable at layer k
            if np.any(np.asarray(w)[early] != 0):
                return False
        return True

    def _check(self, arrays: Sequence[jax.Array], what: str) -> None:
        if len(arrays) != len(self.w_enc):
            raise ValueError(
                f"need {what} for the {len(self.w_enc)} layers {self.layers}, got {len(arrays)}"
            )

    def encode(self, inputs_by_layer: Sequence[jax.Array]) -> jax.Array:
        """Latents [..., d_sae] from the activations at every layer (each [..., d_model])."""
        self._check(inputs_by_layer, "activations")
        z = sae_math.pre_activations(inputs_by_layer[0], self.w_enc[0], self.b_enc)
        for x, w in zip(inputs_by_layer[1:], self.w_enc[1:], strict=True):
            z = z + sae_math.matmul(x, w)
        return sae_math.jumprelu(z, self.threshold)

    def decode(self, latents: jax.Array) -> list[jax.Array]:
        """Reconstructions [..., d_model] at every layer."""
        return [sae_math.decode(latents, w, b) for w, b in zip(self.w_dec, self.b_dec, strict=True)]

    def __call__(self, inputs_by_layer: Sequence[jax.Array]) -> list[jax.Array]:
        """``decode(encode(inputs_by_layer))``."""
        return self.decode(self.encode(inputs_by_layer))
