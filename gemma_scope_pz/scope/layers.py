"""Sparse autoencoders and transcoders as Penzai layers on named axes.

An autoencoder reads activations with an ``"embedding"`` axis, encodes them into
sparse ``"latents"`` and decodes them back to ``"embedding"``::

    f = act(x @ W_enc + b_enc)          # encoder: Linear, AddBias, activation
    x_hat = f @ W_dec + b_dec           # decoder: Linear, AddBias
    y_hat = x_hat + x @ W_skip          # transcoders with an affine skip only

Every other axis (``"batch"``, ``"seq"``, ...) is carried along untouched. The
activation formulas live in `gemma_scope_pz.scope.sae` (the one home of the SAE
math); the layers here map them over named axes. The same computation on plain
``[..., d]`` arrays with a parameter dict is `encode_arrays` / `decode_arrays` /
`reconstruct_arrays`, for benchmarks that do not want named-axis bookkeeping.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_scope_pz.scope import sae as sae_math

Activation = Literal["jumprelu", "relu", "topk"]
# Inputs of the AutoEncoder methods: a NamedArray, or a plain array whose last axis is the
# named one (the result is then plain too).
ArrayLike = pz.nx.NamedArray | jax.Array | np.ndarray
ACTIVATIONS: tuple[str, ...] = ("jumprelu", "relu", "topk")

# Direction of the affine skip connection of Gemma Scope 2 transcoders.
#
# The release stores ``affine_skip_connection`` with shape [d_in, d_out] and the
# skip term is ``x @ W_skip`` (no transpose). Evidence: the Gemma Scope 2
# tutorial's reference JumpReLUSAE returns ``recon + x @ self.affine_skip_connection``;
# circuit-tracer's Gemma Scope 2 cross-layer-transcoder path multiplies the layer
# input by the stored matrix untransposed; and a public numerical check on a
# 4B-IT layer-45 transcoder found ``x @ W`` explains ~0.69 of the target energy
# against ~0.38 for ``x @ W.T``. For square matrices the shape cannot tell the
# two apart, so this constant is the single place to flip if a real-activation
# check ever disagrees.
SKIP_TRANSPOSED = False


@dataclasses.dataclass(frozen=True)
class SaeMeta:
    """Static description of an autoencoder: sizes, activation, sites and provenance.

    Attributes:
      d_in: Width of the input activations.
      d_sae: Number of latents.
      d_out: Width of the reconstruction (``d_in`` for SAEs, may differ for transcoders).
      activation: "jumprelu", "relu" or "topk".
      k: Number of latents kept per token for "topk", else None.
      site_in: Site the autoencoder reads, e.g. "blocks.9.resid_post" ("" if unknown).
      site_out: Site it reconstructs (equal to ``site_in`` for SAEs).
      source: Where the weights came from (a local path or "repo:folder"), "" if built in memory.
      extra: Free-form metadata, e.g. the release's config.json, "l0", "width_label".
    """

    d_in: int
    d_sae: int
    d_out: int
    activation: str = "jumprelu"
    k: int | None = None
    site_in: str = ""
    site_out: str = ""
    source: str = ""
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "topk" and (self.k is None or not 0 < self.k <= self.d_sae):
            raise ValueError(f"topk needs 0 < k <= d_sae={self.d_sae}, got k={self.k}")

    # SaeMeta is a static pytree field, so JAX hashes it; ``extra`` is a dict.
    def __hash__(self) -> int:
        fields = tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra")
        return hash((*fields, json.dumps(dict(self.extra), sort_keys=True, default=str)))


@pz.pytree_dataclass
class JumpReLU(pz.nn.Layer):
    """JumpReLU activation: ``z * H(z - threshold)`` with a strict ``z > threshold``.

    Attributes:
      threshold: Per-latent threshold, a parameter holding a NamedArray over "latents".
    """

    threshold: pz.nn.ParameterLike[pz.nx.NamedArray]

    def __call__(self, z: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
        return pz.nx.nmap(sae_math.jumprelu)(z, self.threshold.value)


@pz.pytree_dataclass
class ReLU(pz.nn.Layer):
    """ReLU activation of the latents (no attributes)."""

    def __call__(self, z: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
        return pz.nx.nmap(sae_math.relu)(z)


@pz.pytree_dataclass
class TopK(pz.nn.Layer):
    """Keeps the ``k`` largest pre-activations of each token along "latents", ReLU'd.

    All other latents are zero. Exactly ``k`` latents are kept per token; among equal
    values the lowest index wins (see `gemma_scope_pz.scope.sae.topk`).

    Attributes:
      k: Number of latents kept per token (static).
    """

    k: int = dataclasses.field(metadata={"pytree_node": False})

    def __call__(self, z: pz.nx.NamedArray, **_unused_side_inputs) -> pz.nx.NamedArray:
        keep = functools.partial(sae_math.topk, k=self.k)
        return pz.nx.nmap(keep)(z.untag("latents")).tag("latents")


ActivationLayer = JumpReLU | ReLU | TopK


def _named(x: Any, axis: str) -> tuple[pz.nx.NamedArray, tuple[str, ...] | None]:
    """Wraps a plain ``[..., d]`` array with its last axis named ``axis``.

    Penzai layers refuse positional axes, so the leading axes get temporary names
    that `_plain` removes again. NamedArrays pass through (names ``None``).
    """
    if isinstance(x, pz.nx.NamedArrayBase):
        return x, None
    x = jnp.asarray(x)
    names = tuple(f"_axis{i}" for i in range(x.ndim - 1))
    return pz.nx.wrap(x, *names, axis), names


def _plain(x: pz.nx.NamedArray, names: tuple[str, ...] | None, axis: str):
    """Inverse of `_named`: back to a plain array when the input was plain."""
    return x if names is None else x.unwrap(*names, axis)


def _param(value: np.ndarray | jax.Array, label: str, names: tuple[str, ...], dtype):
    return pz.Parameter(value=pz.nx.wrap(jnp.asarray(value, dtype=dtype), *names), label=label)


def _only(tree: Any, kind: type | tuple[type, ...]) -> Any:
    """The single instance of ``kind`` inside ``tree`` (selected by type, not by position)."""
    found = pz.select(tree).at_instances_of(kind).get_sequence()
    if len(found) != 1:
        name = getattr(kind, "__name__", str(kind))
        raise ValueError(f"expected one {name} in {type(tree).__name__}, found {len(found)}")
    return found[0]


def _check_arrays(arrays: Mapping[str, Any], activation: str) -> tuple[int, int, int]:
    """(d_in, d_sae, d_out) from the arrays; one error listing every inconsistent shape."""
    shapes = {n: tuple(np.shape(a)) for n, a in arrays.items() if a is not None}
    if len(shapes["w_enc"]) != 2 or len(shapes["w_dec"]) != 2:
        raise ValueError(f"w_enc and w_dec must be 2-D, got shapes {shapes}")
    d_in, d_sae = shapes["w_enc"]
    d_out = shapes["w_dec"][1]
    expected = {
        "w_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "w_dec": (d_sae, d_out),
        "b_dec": (d_out,),
        "threshold": (d_sae,),
        "w_skip": (d_in, d_out),
    }
    if activation == "jumprelu" and "threshold" not in shapes:
        raise ValueError("activation 'jumprelu' needs a threshold array [d_sae]")
    bad = [
        f"{n} has shape {shapes[n]}, expected {expected[n]}"
        for n in expected
        if n in shapes
        and shapes[n] != expected[n]
        and (n != "threshold" or activation == "jumprelu")
    ]
    if bad:
        raise ValueError(f"inconsistent autoencoder arrays: {', '.join(bad)}")
    return d_in, d_sae, d_out


def _activation_layer(
    activation: str, threshold, k: int | None, name: str, dtype
) -> ActivationLayer:
    if activation == "jumprelu":
        return JumpReLU(_param(threshold, f"{name}/threshold", ("latents",), dtype))
    if activation == "relu":
        return ReLU()
    if activation == "topk":
        if k is None:
            raise ValueError("activation 'topk' needs k")
        return TopK(k=int(k))
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _linear(w, label: str, axis_in: str, axis_out: str, dtype) -> pz.nn.Linear:
    return pz.nn.Linear(
        weights=_param(w, label, (axis_in, axis_out), dtype),
        in_axis_names=(axis_in,),
        out_axis_names=(axis_out,),
    )


def _bias(b, label: str, axis: str, dtype) -> pz.nn.AddBias:
    return pz.nn.AddBias(_param(b, label, (axis,), dtype), new_axis_names=())


def _skip_layer(w_skip, name: str, dtype) -> pz.nn.Sequential:
    """``Sequential([Linear W_skip ("embedding" -> "embedding_out"), RenameAxes back])``."""
    matrix = jnp.asarray(w_skip).T if SKIP_TRANSPOSED else w_skip
    return pz.nn.Sequential(
        [
            _linear(matrix, f"{name}/w_skip", "embedding", "embedding_out", dtype),
            pz.nn.RenameAxes(old="embedding_out", new="embedding"),
        ]
    )


@pz.pytree_dataclass
class AutoEncoder(pz.nn.Layer):
    """A sparse autoencoder: "embedding" -> "latents" -> "embedding".

    Build one with `AutoEncoder.from_arrays` (or a loader in
    `gemma_scope_pz.scope.formats`). Methods accept NamedArrays with an
    "embedding" (resp. "latents") axis, or plain arrays whose last axis is that axis.

    Attributes:
      encoder: ``Sequential([Linear W_enc, AddBias b_enc, activation])``.
      decoder: ``Sequential([Linear W_dec, AddBias b_dec])``.
      meta: Static `SaeMeta` (sizes, activation, sites, provenance).
    """

    encoder: pz.nn.Sequential
    decoder: pz.nn.Sequential
    meta: SaeMeta = dataclasses.field(metadata={"pytree_node": False})

    def encode(self, x: ArrayLike) -> ArrayLike:
        """Latent activations ``act(x @ W_enc + b_enc)``, "embedding" -> "latents"."""
        named, names = _named(x, "embedding")
        return _plain(self.encoder(named), names, "latents")

    def decode(self, f: ArrayLike) -> ArrayLike:
        """Reconstruction ``f @ W_dec + b_dec``, "latents" -> "embedding"."""
        named, names = _named(f, "latents")
        return _plain(self.decoder(named), names, "embedding")

    def skip_connection(self, x: ArrayLike) -> ArrayLike:
        """The affine skip term: zeros of width ``d_out`` here (no skip), see `AutoEncoderSkip`."""
        named, names = _named(x, "embedding")
        zeros = functools.partial(jnp.zeros, (self.meta.d_out,))
        out = pz.nx.nmap(lambda v: zeros(v.dtype))(named.untag("embedding")).tag("embedding")
        return _plain(out, names, "embedding")

    def __call__(self, x: ArrayLike, **_unused_side_inputs) -> ArrayLike:
        """Reconstruction of ``x``: ``decode(encode(x))``."""
        return self.decode(self.encode(x))

    def error(self, x: ArrayLike) -> ArrayLike:
        """Reconstruction error ``x - self(x)`` (meaningful when d_in == d_out)."""
        return x - self(x)

    @property
    def activation_layer(self) -> ActivationLayer:
        """The encoder's activation (`JumpReLU`, `ReLU` or `TopK`)."""
        return _only(self.encoder, (JumpReLU, ReLU, TopK))

    @classmethod
    def from_arrays(
        cls,
        w_enc,
        b_enc,
        w_dec,
        b_dec,
        threshold=None,
        *,
        activation: Activation = "jumprelu",
        k: int | None = None,
        w_skip=None,
        dtype: jax.typing.DTypeLike = jnp.float32,
        meta: SaeMeta | None = None,
        name: str = "sae",
    ) -> AutoEncoder:
        """Builds an autoencoder (an `AutoEncoderSkip` when ``w_skip`` is given).

        Args:
          w_enc: Encoder matrix [d_in, d_sae].
          b_enc: Encoder bias [d_sae].
          w_dec: Decoder matrix [d_sae, d_out].
          b_dec: Decoder bias [d_out].
          threshold: JumpReLU thresholds [d_sae]; required for "jumprelu" only.
          activation: "jumprelu", "relu" or "topk".
          k: Latents kept per token for "topk".
          w_skip: Optional affine skip matrix [d_in, d_out] (``y += x @ w_skip``).
          dtype: Parameter dtype.
          meta: Metadata; sizes/activation/k are filled in (and checked) from the arrays.
          name: Prefix of the parameter labels ("sae/w_enc", ...); make it unique when
            several autoencoders share one model.

        Returns:
          An `AutoEncoder`, or `AutoEncoderSkip` if ``w_skip`` is not None.
        """
        arrays = dict(w_enc=w_enc, b_enc=b_enc, w_dec=w_dec, b_dec=b_dec)
        d_in, d_sae, d_out = _check_arrays(
            {**arrays, "threshold": threshold, "w_skip": w_skip}, activation
        )
        base = meta if meta is not None else SaeMeta(d_in=d_in, d_sae=d_sae, d_out=d_out)
        meta = dataclasses.replace(
            base, d_in=d_in, d_sae=d_sae, d_out=d_out, activation=activation, k=k
        )
        encoder = pz.nn.Sequential(
            [
                _linear(w_enc, f"{name}/w_enc", "embedding", "latents", dtype),
                _bias(b_enc, f"{name}/b_enc", "latents", dtype),
                _activation_layer(activation, threshold, k, name, dtype),
            ]
        )
        decoder = pz.nn.Sequential(
            [
                _linear(w_dec, f"{name}/w_dec", "latents", "embedding", dtype),
                _bias(b_dec, f"{name}/b_dec", "embedding", dtype),
            ]
        )
        if w_skip is None:
            return AutoEncoder(encoder=encoder, decoder=decoder, meta=meta)
        skip = _skip_layer(w_skip, name, dtype)
        return AutoEncoderSkip(encoder=encoder, decoder=decoder, meta=meta, skip=skip)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The parameters as numpy arrays, keyed like `from_arrays`' arguments.

        Keys: w_enc [d_in, d_sae], b_enc, w_dec [d_sae, d_out], b_dec, plus threshold
        (JumpReLU) and w_skip [d_in, d_out] (skip transcoders).
        """
        out = {
            "w_enc": _only(self.encoder, pz.nn.Linear).weights.value.unwrap("embedding", "latents"),
            "b_enc": _only(self.encoder, pz.nn.AddBias).bias.value.unwrap("latents"),
            "w_dec": _only(self.decoder, pz.nn.Linear).weights.value.unwrap("latents", "embedding"),
            "b_dec": _only(self.decoder, pz.nn.AddBias).bias.value.unwrap("embedding"),
        }
        activation = self.activation_layer
        if isinstance(activation, JumpReLU):
            out["threshold"] = activation.threshold.value.unwrap("latents")
        return {key: np.asarray(value) for key, value in out.items()}


@pz.pytree_dataclass(has_implicitly_inherited_fields=True)
class AutoEncoderSkip(AutoEncoder):
    """A transcoder with an affine skip connection: ``decode(encode(x)) + x @ W_skip``.

    The skip matrix is stored [d_in, d_out] (see `SKIP_TRANSPOSED` for the evidence
    on its direction). Its Linear maps "embedding" to a temporary "embedding_out"
    axis that a RenameAxes turns back into "embedding".

    Attributes:
      skip: ``Sequential([Linear W_skip, RenameAxes("embedding_out" -> "embedding")])``.
    """

    skip: pz.nn.Sequential

    def skip_connection(self, x: ArrayLike) -> ArrayLike:
        """The affine skip term ``x @ W_skip`` alone."""
        named, names = _named(x, "embedding")
        return _plain(self.skip(named), names, "embedding")

    def __call__(self, x: ArrayLike, **_unused_side_inputs) -> ArrayLike:
        """Transcoder output: ``decode(encode(x)) + x @ W_skip``."""
        return self.decode(self.encode(x)) + self.skip_connection(x)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = super().to_arrays()
        linear = _only(self.skip, pz.nn.Linear)
        w = np.asarray(linear.weights.value.unwrap("embedding", "embedding_out"))
        out["w_skip"] = w.T if SKIP_TRANSPOSED else w
        return out


def encode_arrays(
    params: Mapping[str, jax.Array], x: jax.Array, activation: Activation, k: int | None = None
) -> jax.Array:
    """Plain-array encoder: ``act(x @ w_enc + b_enc)`` for ``x`` of shape [..., d_in].

    ``params`` holds w_enc, b_enc and (for "jumprelu") threshold. Returns [..., d_sae].
    """
    return sae_math.encode(
        x, params["w_enc"], params["b_enc"], activation, k=k, threshold=params.get("threshold")
    )


def decode_arrays(params: Mapping[str, jax.Array], f: jax.Array) -> jax.Array:
    """Plain-array decoder: ``f @ w_dec + b_dec`` for ``f`` of shape [..., d_sae]."""
    return sae_math.decode(f, params["w_dec"], params["b_dec"])


def reconstruct_arrays(
    params: Mapping[str, jax.Array], x: jax.Array, activation: Activation, k: int | None = None
) -> jax.Array:
    """Plain-array forward pass, including ``x @ w_skip`` when params has "w_skip"."""
    out = decode_arrays(params, encode_arrays(params, x, activation, k))
    if params.get("w_skip") is not None:
        out = out + sae_math.skip(x, params["w_skip"])
    return out
