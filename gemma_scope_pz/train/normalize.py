"""Activation normalisation for training, and folding it back into exported weights.

Training sees normalised activations ``x' = (x - μ) * s`` (``μ = 0`` for "unit_mean_sq_norm",
``μ = E[x]`` for "center_unit"; ``s = sqrt(d / E||x - μ||^2)`` so that ``E||x'||^2 = d``).
Inputs and targets of a transcoder get their own ``(μ_in, s_in)`` and ``(μ_out, s_out)``.

Folding (so an exported SAE takes *raw* activations and returns *raw* reconstructions, with
identical latent activations, hence identical thresholds and L0)::

    z  = x' W + b = x (s_in W) + (b - s_in μ_in W)
        → W_enc = s_in W,   b_enc = b - s_in μ_in W
    y  = y'/s_out + μ_out,  y' = f D + c + x' S
        → W_dec = D / s_out
          W_skip = (s_in / s_out) S
          b_dec = c / s_out + μ_out - (s_in / s_out) μ_in S

Decoder rows of a folded unit-norm SAE therefore have norm ``1 / s_out``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

Params = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Normaliser:
    """Affine normalisation of inputs and targets: ``x' = (x - shift) * scale``.

    Attributes:
      in_shift: ``[d_in]`` subtracted from inputs.
      in_scale: Scalar multiplying centred inputs.
      out_shift: ``[d_out]`` subtracted from targets.
      out_scale: Scalar multiplying centred targets.
      kind: The ``TrainConfig.sae.normalization`` it was estimated for.
    """

    in_shift: np.ndarray
    in_scale: float
    out_shift: np.ndarray
    out_scale: float
    kind: str = "none"

    def __post_init__(self):
        # Shifts and scales are float32 values everywhere (the train step, checkpoints, folding), so a
        # fresh run and a resumed one fold exactly the same numbers into the exported weights.
        object.__setattr__(self, "in_shift", np.asarray(self.in_shift, np.float32))
        object.__setattr__(self, "out_shift", np.asarray(self.out_shift, np.float32))
        object.__setattr__(self, "in_scale", float(np.float32(self.in_scale)))
        object.__setattr__(self, "out_scale", float(np.float32(self.out_scale)))

    @classmethod
    def identity(cls, d_in: int, d_out: int) -> Normaliser:
        """No normalisation."""
        return cls(np.zeros(d_in, np.float32), 1.0, np.zeros(d_out, np.float32), 1.0, "none")

    @classmethod
    def estimate(
        cls, kind: str, x_in: Iterable[np.ndarray], x_out: Iterable[np.ndarray] | None = None
    ) -> Normaliser:
        """Estimates shift and scale from batches (float64 accumulation).

        Args:
          kind: "none", "unit_mean_sq_norm" or "center_unit".
          x_in: Input batches ``[n, d_in]``.
          x_out: Target batches ``[n, d_out]`` (``None``: targets are the inputs).
        """
        shift_in, scale_in = _estimate(kind, x_in, "x_in")
        if x_out is None:
            return cls(shift_in, scale_in, shift_in.copy(), scale_in, kind)
        shift_out, scale_out = _estimate(kind, x_out, "x_out")
        return cls(shift_in, scale_in, shift_out, scale_out, kind)

    def apply_in(self, x):
        """Normalised inputs."""
        return (x - self.in_shift) * self.in_scale

    def apply_out(self, x):
        """Normalised targets."""
        return (x - self.out_shift) * self.out_scale

    def invert_out(self, y):
        """Raw-space targets from normalised ones."""
        return y / self.out_scale + self.out_shift

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for a checkpoint."""
        return {
            "in_shift": np.asarray(self.in_shift, np.float32),
            "in_scale": np.asarray(self.in_scale, np.float32),
            "out_shift": np.asarray(self.out_shift, np.float32),
            "out_scale": np.asarray(self.out_scale, np.float32),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], kind: str) -> Normaliser:
        """Inverse of :meth:`to_arrays`."""
        return cls(
            np.asarray(arrays["in_shift"], np.float32),
            float(arrays["in_scale"]),
            np.asarray(arrays["out_shift"], np.float32),
            float(arrays["out_scale"]),
            kind,
        )


def _estimate(kind: str, batches: Iterable[np.ndarray], name: str) -> tuple[np.ndarray, float]:
    total, total_sq, count, d = None, 0.0, 0, None
    rows = []
    for batch in batches:
        batch = np.asarray(batch, np.float64)
        if batch.ndim != 2:
            raise ValueError(f"normaliser: {name} batch must be [n, d], got shape {batch.shape}")
        batch = batch[np.all(np.isfinite(batch), axis=1)]
        d = batch.shape[1]
        total = batch.sum(0) if total is None else total + batch.sum(0)
        count += batch.shape[0]
        rows.append(batch)
    if count == 0:
        raise ValueError(f"normaliser: no finite rows of {name} to estimate from")
    mean = total / count if kind == "center_unit" else np.zeros(d)
    for batch in rows:
        total_sq += float(np.sum(np.square(batch - mean)))
    if kind == "none":
        return np.zeros(d, np.float32), 1.0
    mean_sq_norm = total_sq / count
    if mean_sq_norm <= 0:
        raise ValueError(f"normaliser: {name} has zero mean squared norm")
    return mean.astype(np.float32), float(np.sqrt(d / mean_sq_norm))


def fold_normaliser(params: Params, norm: Normaliser) -> Params:
    """Raw-space parameters from parameters trained on normalised data (see module docstring)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    s_in, s_out = norm.in_scale, norm.out_scale
    mu_in = np.asarray(norm.in_shift, np.float64)
    mu_out = np.asarray(norm.out_shift, np.float64)
    out = dict(p)
    out["w_enc"] = s_in * p["w_enc"]
    out["b_enc"] = p["b_enc"] - s_in * (mu_in @ p["w_enc"])
    out["w_dec"] = p["w_dec"] / s_out
    out["b_dec"] = p["b_dec"] / s_out + mu_out
    if "w_skip" in p:
        out["w_skip"] = (s_in / s_out) * p["w_skip"]
        out["b_dec"] = out["b_dec"] - (s_in / s_out) * (mu_in @ p["w_skip"])
    return {k: v.astype(np.float32) for k, v in out.items()}


def geometric_median(x: np.ndarray, iterations: int = 30, eps: float = 1e-8) -> np.ndarray:
    """Geometric median of the rows of ``x`` by Weiszfeld iterations started at the mean.

    Used to initialise ``b_dec``: more robust than the mean to the heavy tails (massive
    activations, BOS tokens) of residual-stream data.
    """
    x = np.asarray(x, np.float64)
    x = x[np.all(np.isfinite(x), axis=1)]
    median = x.mean(0)
    for _ in range(iterations):
        weights = 1.0 / np.maximum(np.linalg.norm(x - median, axis=1), eps)
        median = (weights[:, None] * x).sum(0) / weights.sum()
    return median.astype(np.float32)
