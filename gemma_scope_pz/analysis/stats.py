"""Per-feature statistics of SAE latents: density, dead/dense latents, activation sizes.

`FeatureStats` turns the counters accumulated by
`gemma_scope_pz.analysis.examples.MaxActivatingExamples` (or any equivalent
counts) into host-side numpy statistics and a JSON-able summary.

Definitions, for a corpus of ``n_tokens`` valid tokens (BOS and padding
excluded):

* density (firing frequency) of a latent: fraction of valid tokens on which its
  activation is > 0.
* dead latent: density exactly 0 (never fired on the corpus).
* dense latent: density > ``dense_threshold`` (default 0.1, i.e. the latent
  fires on more than one token in ten).  Such latents are usually considered
  uninterpretable or a sign of a poorly trained SAE; the threshold is a
  convention, not a law, so it is a parameter.
* mean activation: mean over the tokens on which the latent fired (NaN for
  dead latents).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

DEFAULT_DENSE_THRESHOLD = 0.1


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Host-side per-feature statistics.

    Attributes:
      n_tokens: number of valid tokens the counters cover.
      fire_counts: [n_features] int64, tokens with activation > 0.
      activation_sums: [n_features] float64, sum of activations over those tokens.
      max_activation: [n_features] float64, largest activation (``-inf`` if none seen).
      dense_threshold: density above which a latent is called dense.
    """

    n_tokens: int
    fire_counts: np.ndarray
    activation_sums: np.ndarray
    max_activation: np.ndarray
    dense_threshold: float = DEFAULT_DENSE_THRESHOLD

    def __post_init__(self):
        n = self.fire_counts.shape
        if len(n) != 1 or self.activation_sums.shape != n or self.max_activation.shape != n:
            raise ValueError(
                "FeatureStats: fire_counts, activation_sums and max_activation must be 1-D of the "
                f"same length; got {self.fire_counts.shape}, {self.activation_sums.shape}, "
                f"{self.max_activation.shape}"
            )
        if (
            self.n_tokens < 0
            or (self.fire_counts > self.n_tokens).any()
            or (self.fire_counts < 0).any()
        ):
            raise ValueError(
                f"FeatureStats: fire_counts must lie in [0, n_tokens={self.n_tokens}], got range "
                f"[{self.fire_counts.min()}, {self.fire_counts.max()}]"
            )

    @classmethod
    def from_counts(
        cls,
        n_tokens: int,
        fire_counts: Any,
        activation_sums: Any,
        max_activation: Any,
        dense_threshold: float = DEFAULT_DENSE_THRESHOLD,
    ) -> FeatureStats:
        """Builds stats from raw counters (arrays of any kind)."""
        return cls(
            n_tokens=int(n_tokens),
            fire_counts=np.asarray(fire_counts, np.int64),
            activation_sums=np.asarray(activation_sums, np.float64),
            max_activation=np.asarray(max_activation, np.float64),
            dense_threshold=float(dense_threshold),
        )

    @classmethod
    def from_examples(
        cls, examples: Any, dense_threshold: float = DEFAULT_DENSE_THRESHOLD
    ) -> FeatureStats:
        """Builds stats from a `MaxActivatingExamples` state."""
        n_tokens, counts, sums, compensation, maxes = jax.device_get(
            (
                examples.n_tokens,
                examples.fire_counts,
                examples.activation_sums,
                examples.sums_compensation,
                examples.max_activation,
            )
        )
        # Kahan summation: the compensation term holds the (negated) lost low-order part.
        sums = np.asarray(sums, np.float64) - np.asarray(compensation, np.float64)
        return cls.from_counts(n_tokens, counts, sums, maxes, dense_threshold)

    @property
    def n_features(self) -> int:
        return int(self.fire_counts.shape[0])

    @property
    def density(self) -> np.ndarray:
        """Firing frequency per feature (0 everywhere if no tokens were seen)."""
        return self.fire_counts / max(self.n_tokens, 1)

    @property
    def mean_activation(self) -> np.ndarray:
        """Mean activation over the tokens where the feature fired; NaN for dead features."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.fire_counts > 0, self.activation_sums / self.fire_counts, np.nan)

    @property
    def dead(self) -> np.ndarray:
        """Bool mask of features that never fired."""
        return self.fire_counts == 0

    @property
    def dense(self) -> np.ndarray:
        """Bool mask of features with density > ``dense_threshold``."""
        return self.density > self.dense_threshold

    def log10_density_histogram(
        self, bins: int = 40, log10_min: float | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of log10(density) over the features that fired.

        Args:
          bins: number of equal-width bins.
          log10_min: left edge; default ``floor(log10(1 / n_tokens))`` (the smallest
            possible non-zero density), so every live feature falls in a bin.

        Returns:
          ``(counts, edges)`` as from `numpy.histogram`, range ``[log10_min, 0]``.
          Dead features are not included (see `dead`).
        """
        if log10_min is None:
            log10_min = (
                math.floor(math.log10(1.0 / max(self.n_tokens, 1))) if self.n_tokens > 1 else -1.0
            )
        live = self.density[~self.dead]
        values = np.log10(live) if live.size else np.zeros((0,))
        return np.histogram(values, bins=bins, range=(float(log10_min), 0.0))

    def summary(self, bins: int = 40) -> dict[str, Any]:
        """JSON-able summary (plain Python numbers and lists)."""
        counts, edges = self.log10_density_histogram(bins)
        density = self.density
        live = density[~self.dead]
        return {
            "n_features": self.n_features,
            "n_tokens": int(self.n_tokens),
            "n_dead": int(self.dead.sum()),
            "n_dense": int(self.dense.sum()),
            "dense_threshold": float(self.dense_threshold),
            "mean_density": float(density.mean()) if density.size else 0.0,
            "median_live_density": float(np.median(live)) if live.size else None,
            "max_activation": float(np.max(self.max_activation)) if self.n_features else None,
            "log10_density_histogram": {
                "counts": [int(c) for c in counts],
                "edges": [float(e) for e in edges],
            },
        }

    def feature(self, index: int) -> dict[str, float | int | bool | None]:
        """JSON-able statistics of one feature."""
        if not 0 <= index < self.n_features:
            raise IndexError(f"FeatureStats.feature: {index} out of range [0, {self.n_features})")
        mean = self.mean_activation[index]
        max_act = self.max_activation[index]
        return {
            "feature": int(index),
            "density": float(self.density[index]),
            "fire_count": int(self.fire_counts[index]),
            "mean_activation": None if np.isnan(mean) else float(mean),
            "max_activation": float(max_act) if np.isfinite(max_act) else None,
            "dead": bool(self.dead[index]),
            "dense": bool(self.dense[index]),
        }
