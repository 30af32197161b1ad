"""``TrainResult``: what a training run returns, and the Penzai ``AutoEncoder`` it stands for.

One job: hold the trained parameters with their normaliser and config, and turn them into an
``AutoEncoder`` / ``AutoEncoderSkip`` that takes *raw* activations (normaliser folded in, BatchTopK as
JumpReLU with its running threshold). Writing folders is :mod:`~gemma_scope_pz.train.export`'s job.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gemma_scope_pz.train.config import TrainConfig
from gemma_scope_pz.train.normalize import Normaliser, fold_normaliser


@dataclasses.dataclass
class TrainResult:
    """Outcome of :func:`train`.

    Attributes:
      params: Trained parameters (numpy), in the *normalised* activation space.
      metrics: Logged metric dicts (one per ``log_every`` steps, with a "step" key).
      normaliser: The normaliser used during training.
      config: The run configuration.
      n_skipped: Steps skipped for non-finite data or gradients.
      inference_threshold: Running BatchTopK threshold (0 for other architectures).
    """

    params: dict[str, np.ndarray]
    metrics: list[dict[str, float]]
    normaliser: Normaliser
    config: TrainConfig
    n_skipped: int = 0
    inference_threshold: float = 0.0

    def raw_params(self) -> dict[str, np.ndarray]:
        """Parameters for raw activations (normaliser folded in; BatchTopK → JumpReLU threshold)."""
        params = fold_normaliser(self.params, self.normaliser)
        if self.config.sae.activation == "batchtopk":
            params["threshold"] = np.full(
                self.config.sae.d_sae, self.inference_threshold, np.float32
            )
        return params

    @property
    def export_activation(self) -> str:
        """Activation of the exported SAE: "relu", "jumprelu" or "topk"."""
        kind = self.config.sae.activation
        return "jumprelu" if kind == "batchtopk" else kind

    def to_autoencoder(self, extra: dict | None = None):
        """The Penzai ``AutoEncoder``/``AutoEncoderSkip`` taking raw activations (see
        :func:`to_autoencoder`)."""
        return to_autoencoder(self, extra)


def _final_l0(result: TrainResult) -> float | None:
    return float(result.metrics[-1]["l0"]) if result.metrics else None


def training_info(result: TrainResult) -> dict:
    """What an export records about its training: model, L0, skipped steps, the full config."""
    cfg = result.config
    return {
        "model_name": cfg.run.model_name,
        "l0": _final_l0(result),
        "n_skipped_steps": result.n_skipped,
        "trained_architecture": cfg.sae.architecture,
        "normalization_folded": cfg.sae.normalization,
        "trained_with": "gemma_scope_pz",
        "train_config": cfg.to_dict(),
    }


def to_autoencoder(result: TrainResult, extra: dict | None = None):
    """The Penzai ``AutoEncoder``/``AutoEncoderSkip`` of a trained result, taking raw activations.

    ``meta`` records the sites; ``meta.extra`` holds :func:`training_info` and anything in ``extra``.
    """
    from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta

    p = result.raw_params()
    cfg = result.config
    activation = result.export_activation
    k = cfg.sae.k if activation == "topk" else None
    meta = SaeMeta(
        d_in=cfg.sae.d_in,
        d_sae=cfg.sae.d_sae,
        d_out=cfg.sae.out_dim,
        activation=activation,
        k=k,
        site_in=cfg.sae.site_in,
        site_out=cfg.sae.site_out or cfg.sae.site_in,
        extra={**training_info(result), **(extra or {})},
    )
    return AutoEncoder.from_arrays(
        p["w_enc"],
        p["b_enc"],
        p["w_dec"],
        p["b_dec"],
        p.get("threshold"),
        activation=activation,
        k=k,
        w_skip=p.get("w_skip"),
        meta=meta,
    )
