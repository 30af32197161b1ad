"""From a training result to a dictionary others can load: the Gemma Scope 2 and SAELens folders.

The one job here is to turn a :class:`~gemma_scope_pz.train.trainer.TrainResult` into the Penzai
``AutoEncoder`` / ``AutoEncoderSkip`` it stands for, taking *raw* activations: the training normaliser
is folded into the weights (see :mod:`~gemma_scope_pz.train.normalize`) and a BatchTopK dictionary
becomes a JumpReLU one with its running global threshold. ``meta.extra`` carries the final L0, the
skipped-step count and the training config. Writing the folders is the formats' job
(:func:`gemma_scope_pz.scope.formats.gemma_scope_2.save_gemma_scope_2`,
:func:`gemma_scope_pz.scope.formats.saelens.save_saelens`): they replace an existing folder atomically
and refuse what the target readers cannot represent (e.g. a TopK transcoder without ``topk_threshold``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gemma_scope_pz.train.result import TrainResult, to_autoencoder, training_info  # noqa: F401


def export_gemma_scope_2(
    result: TrainResult,
    folder: str | os.PathLike,
    *,
    topk_threshold: float | np.ndarray | None = None,
    extra: dict | None = None,
) -> Path:
    """Writes ``config.json`` + ``params.safetensors`` (Gemma Scope 2 layout), replacing atomically.

    Args:
      result: The training result.
      folder: The export folder.
      topk_threshold: Gemma Scope 2 readers accept only JumpReLU, so a TopK dictionary is written
        as JumpReLU with this threshold; by default the running mean of each token's k-th largest
        pre-activation during training (``result.inference_threshold``). The number of active
        latents per token is then no longer exactly k (``config.json`` says ``converted_from``).
      extra: More entries for ``config.json`` (kept in ``meta.extra`` when loaded).

    Returns:
      The folder (loads with ``gs.load_sae``).
    """
    from gemma_scope_pz.scope.formats.gemma_scope_2 import save_gemma_scope_2

    ae = to_autoencoder(result, extra)
    if topk_threshold is None and ae.meta.activation == "topk":
        topk_threshold = result.inference_threshold
    return save_gemma_scope_2(ae, folder, overwrite=True, topk_threshold=topk_threshold)


def export_saelens(
    result: TrainResult,
    folder: str | os.PathLike,
    *,
    topk_threshold: float | np.ndarray | None = None,
    extra: dict | None = None,
) -> Path:
    """Writes ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout), replacing atomically.

    Args:
      result: The training result.
      folder: The export folder.
      topk_threshold: For a TopK dictionary: write it as JumpReLU with this threshold. A TopK SAE
        is otherwise written as SAELens "topk" (exact); a TopK transcoder, which SAELens has no
        architecture for, is converted with ``result.inference_threshold`` by default (see
        :func:`export_gemma_scope_2`).
      extra: More entries for the ``metadata`` of ``cfg.json``.

    Returns:
      The folder (loads with ``sae_lens.SAE.load_from_disk``).
    """
    from gemma_scope_pz.scope.formats.saelens import save_saelens

    ae = to_autoencoder(result, extra)
    if topk_threshold is None and ae.meta.activation == "topk" and result.config.sae.is_transcoder:
        topk_threshold = result.inference_threshold
    return save_saelens(ae, folder, overwrite=True, topk_threshold=topk_threshold)
