"""The transcoders of a replacement model, as one stack of plain arrays.

Per-layer transcoders (with or without an affine skip), a cross-layer transcoder (CLT) and the
project's own trained transcoders all become a `TranscoderStack`: source layers with features,
each writing to one or more target layers, plus per-target decoder bias and skip. A model layer
that no transcoder writes to is "uncovered": its whole MLP output becomes the error node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_scope_pz.scope import sae as sae_math
from gemma_scope_pz.scope.cross_layer_transcoder import CrossLayerTranscoder
from gemma_scope_pz.scope.layers import AutoEncoder

__all__ = ["TranscoderStack", "as_transcoder_stack"]


@pz.pytree_dataclass
class TranscoderStack(pz.Struct):
    """Transcoders reading ``blocks.L.mlp_in`` and writing ``blocks.L.mlp_out``.

    Source layer ``layers[s]`` encodes its MLP input into latents; latent ``i`` writes
    ``w_dec[s][i, t]`` to target layer ``layers[s] + t``. Per-layer transcoders have one target.

    Attributes:
      w_enc: Per source, [d_model, d_sae].
      b_enc: Per source, [d_sae].
      threshold: Per source, [d_sae] (JumpReLU; zeros for other activations).
      w_dec: Per source, [d_sae, n_targets, d_model].
      b_dec: [n_layers, d_model], summed over the transcoders writing to each layer.
      w_skip: [n_layers, d_model, d_model] affine skips (zeros where none), or None.
      layers: Source layer of each entry (static).
      activations: Activation name of each source ("jumprelu", "relu", "topk", ...) (static).
      ks: TopK ``k`` of each source, or None (static).
      covered: Per model layer, whether some transcoder writes to it (static).
    """

    w_enc: list[jax.Array]
    b_enc: list[jax.Array]
    threshold: list[jax.Array]
    w_dec: list[jax.Array]
    b_dec: jax.Array
    w_skip: jax.Array | None
    layers: tuple[int, ...] = dataclasses.field(metadata={"pytree_node": False})
    activations: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})
    ks: tuple[int | None, ...] = dataclasses.field(metadata={"pytree_node": False})
    covered: tuple[bool, ...] = dataclasses.field(metadata={"pytree_node": False})

    @property
    def n_layers(self) -> int:
        return len(self.covered)

    def targets(self, source: int) -> range:
        """Model layers that source entry ``source`` writes to."""
        first = self.layers[source]
        return range(first, first + self.w_dec[source].shape[1])

    def encode(self, source: int, x: jax.Array) -> jax.Array:
        """Latents [..., d_sae] of source entry ``source`` for its MLP input ``x``."""
        threshold = self.threshold[source] if self.activations[source] == "jumprelu" else None
        return sae_math.encode(
            x,
            self.w_enc[source],
            self.b_enc[source],
            self.activations[source],
            k=self.ks[source],
            threshold=threshold,
        )

    def decode_to(self, layer: int, latents: Sequence[jax.Array]) -> jax.Array:
        """Decoded features at ``layer`` (bias included, skip excluded) from every source."""
        out = self.b_dec[layer]
        for s, f in enumerate(latents):
            if layer in self.targets(s):
                out = out + sae_math.matmul(f, self.w_dec[s][:, layer - self.layers[s]])
        return out

    def skip_at(self, layer: int, x: jax.Array) -> jax.Array:
        """The affine skip ``x @ w_skip[layer]`` (zeros without skips)."""
        if self.w_skip is None:
            return jnp.zeros_like(x)
        return sae_math.skip(x, self.w_skip[layer])


def _from_autoencoders(by_layer: Mapping[int, AutoEncoder], n_layers: int) -> TranscoderStack:
    layers = sorted(by_layer)
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise ValueError(f"transcoder layer {layer} outside the model's 0..{n_layers - 1}")
    arrays = [by_layer[layer].to_arrays() for layer in layers]
    d_model = arrays[0]["w_enc"].shape[0] if arrays else 0
    for layer, arr in zip(layers, arrays, strict=True):
        if arr["w_dec"].shape[1] != arr["w_enc"].shape[0]:
            raise ValueError(
                f"transcoder of layer {layer}: d_in {arr['w_enc'].shape[0]} != d_out "
                f"{arr['w_dec'].shape[1]}"
            )
    b_dec = np.zeros((n_layers, d_model), np.float32)
    has_skip = any("w_skip" in arr for arr in arrays)
    w_skip = np.zeros((n_layers, d_model, d_model), np.float32) if has_skip else None
    for layer, arr in zip(layers, arrays, strict=True):
        b_dec[layer] = arr["b_dec"]
        if "w_skip" in arr:
            w_skip[layer] = arr["w_skip"]
    return TranscoderStack(
        w_enc=[jnp.asarray(a["w_enc"]) for a in arrays],
        b_enc=[jnp.asarray(a["b_enc"]) for a in arrays],
        threshold=[jnp.asarray(a.get("threshold", np.zeros_like(a["b_enc"]))) for a in arrays],
        w_dec=[jnp.asarray(a["w_dec"])[:, None, :] for a in arrays],
        b_dec=jnp.asarray(b_dec),
        w_skip=None if w_skip is None else jnp.asarray(w_skip),
        layers=tuple(layers),
        activations=tuple(by_layer[layer].meta.activation for layer in layers),
        ks=tuple(by_layer[layer].meta.k for layer in layers),
        covered=tuple(layer in by_layer for layer in range(n_layers)),
    )


def _from_clt(clt: CrossLayerTranscoder, n_layers: int) -> TranscoderStack:
    if clt.n_layers != n_layers:
        raise ValueError(f"the CLT has {clt.n_layers} layers, the model {n_layers}")
    return TranscoderStack(
        w_enc=list(clt.w_enc),
        b_enc=list(clt.b_enc),
        threshold=list(clt.threshold),
        w_dec=list(clt.w_dec),
        b_dec=jnp.stack(list(clt.b_dec)),
        w_skip=None if clt.w_skip is None else jnp.stack(list(clt.w_skip)),
        layers=tuple(range(n_layers)),
        activations=("jumprelu",) * n_layers,
        ks=(None,) * n_layers,
        covered=(True,) * n_layers,
    )


def as_transcoder_stack(transcoders: Any, n_layers: int) -> TranscoderStack:
    """A `TranscoderStack` from a stack, a CLT, ``{layer: AutoEncoder}`` or a per-layer list.

    A list may hold None for layers without a transcoder; the same goes for a missing key.
    """
    if isinstance(transcoders, TranscoderStack):
        if transcoders.n_layers != n_layers:
            raise ValueError(
                f"transcoder stack has {transcoders.n_layers} layers, model {n_layers}"
            )
        return transcoders
    if isinstance(transcoders, CrossLayerTranscoder):
        return _from_clt(transcoders, n_layers)
    if isinstance(transcoders, Mapping):
        by_layer = dict(transcoders)
    elif isinstance(transcoders, Sequence):
        by_layer = {i: t for i, t in enumerate(transcoders) if t is not None}
    else:
        raise TypeError(
            "transcoders must be a TranscoderStack, a CrossLayerTranscoder, {layer: AutoEncoder} "
            f"or a list of AutoEncoder/None, got {type(transcoders).__name__}"
        )
    if not by_layer:
        raise ValueError("no transcoders given")
    for layer, t in by_layer.items():
        if not isinstance(t, AutoEncoder):
            raise TypeError(f"transcoder of layer {layer} is a {type(t).__name__}, not AutoEncoder")
    return _from_autoencoders(by_layer, n_layers)
