"""Writing dictionaries as SAELens folders (``cfg.json`` + ``sae_weights.safetensors``).

The folder loads with ``sae_lens.SAE.load_from_disk`` (checked against sae-lens 6.54.12 by
``scripts/reference_saelens.py``; the recorded outputs are compared in ``tests/test_formats_saelens.py``).
What SAELens expects, and how we meet it:

* ``cfg.json`` in SAELens 6's layout: the architecture's config fields at the top level (``d_in``,
  ``d_sae``, ``d_out`` for transcoders, ``dtype``, ``device``, ``apply_b_dec_to_input=false``,
  ``normalize_activations="none"``, ``k`` for TopK) and a ``metadata`` object with ``model_name`` (the
  Hugging Face id, e.g. "google/gemma-3-270m"), ``hook_name`` / ``hook_name_out`` (SAELens's own hook
  names, e.g. "blocks.9.hook_resid_post", see :mod:`~gemma_scope_pz.scope.formats.hook_names`),
  ``hf_hook_name`` / ``hf_hook_name_out`` (the Gemma Scope 2 module paths), ``sae_lens_version`` (the
  SAELens format this file follows: without it SAELens reads the file as a pre-6.0 config and drops
  the metadata) and everything JSON-serialisable in ``ae.meta.extra`` (``l0``, training information).
* At ``attn_out`` (SAELens: ``blocks.L.attn.hook_z``) ``reshape_activations`` is "hook_z", so SAELens
  flattens the heads as our site does; the SAE then takes ``[..., n_heads, d_head]`` inputs in SAELens.
* ``W_skip`` is stored ``[d_out, d_in]``: SAELens computes ``x @ W_skip.T`` (we store and compute
  ``x @ w_skip`` with ``[d_in, d_out]``), so the writer transposes it.
* Architectures: SAE ReLU -> "standard", JumpReLU -> "jumprelu", TopK -> "topk"; transcoder ReLU ->
  "transcoder" / "skip_transcoder", JumpReLU -> "jumprelu_transcoder" / "jumprelu_skip_transcoder".
  SAELens has no TopK transcoder: a TopK transcoder is refused unless ``topk_threshold`` is given, in
  which case it is written as a JumpReLU transcoder with that threshold (as SAELens itself turns
  BatchTopK into JumpReLU for inference). SAELens's JumpReLU is ``relu(z) * (z > threshold)``, ours
  ``z * (z > threshold)``: equal for thresholds >= 0, so a negative threshold is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from gemma_scope_pz.io import write_folder_atomically
from gemma_scope_pz.scope.formats.gemma_scope_2 import json_entries, jumprelu_threshold
from gemma_scope_pz.scope.formats.hook_names import hf_model_id, hook_from_site, saelens_hook_name
from gemma_scope_pz.scope.layers import AutoEncoder, AutoEncoderSkip

__all__ = ["SAELENS_FORMAT_VERSION", "saelens_architecture", "saelens_config", "save_saelens"]

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
# The SAELens release whose on-disk format this writer follows and was verified against.
SAELENS_FORMAT_VERSION = "6.54.12"
_STRUCTURAL = {"architecture", "type", "k", "width", "d_in", "d_out", "d_sae", "threshold"}


def _is_transcoder(ae: AutoEncoder) -> bool:
    meta = ae.meta
    site_out = meta.site_out or meta.site_in
    return isinstance(ae, AutoEncoderSkip) or site_out != meta.site_in or meta.d_in != meta.d_out


def saelens_architecture(ae: AutoEncoder, *, converted_topk: bool = False) -> str:
    """SAELens's architecture name for ``ae`` (a TopK transcoder only with ``converted_topk``).

    Raises:
      ValueError: for a TopK transcoder that is not being converted to JumpReLU.
    """
    activation = "jumprelu" if converted_topk else ae.meta.activation
    if not _is_transcoder(ae):
        return {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[activation]
    if activation == "topk":
        raise ValueError(
            f"SAELens has no TopK transcoder architecture (k={ae.meta.k}); pass topk_threshold= to "
            "write it as a JumpReLU transcoder with that threshold, or export it as an SAE-shaped "
            "Gemma Scope 2 folder instead"
        )
    skip = "_skip" if isinstance(ae, AutoEncoderSkip) else ""
    return {
        "relu": "skip_transcoder" if skip else "transcoder",
        "jumprelu": f"jumprelu{skip}_transcoder",
    }[activation]


def _metadata(ae: AutoEncoder, model_name: str | None, transcoder: bool) -> dict[str, Any]:
    meta = ae.meta
    extra = {
        key: value
        for key, value in json_entries(meta.extra).items()
        if key not in _STRUCTURAL and not key.startswith("hf_hook_point")
    }
    name = model_name or extra.get("model_name")
    if not name:
        raise ValueError("SAELens configs need a model_name: pass model_name='google/gemma-3-...'")
    if not meta.site_in:
        raise ValueError("the dictionary has no site_in; SAELens needs a hook name to attach it")
    site_out = meta.site_out or meta.site_in
    metadata = {
        "context_size": None,
        "dataset_path": None,
        "hook_head_index": None,
        "prepend_bos": True,
        "sae_lens_training_version": None,
        **extra,
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "model_name": hf_model_id(name),
        "hook_name": saelens_hook_name(meta.site_in),
        "hf_hook_name": hook_from_site(meta.site_in),
        "written_by": "gemma_scope_pz",
    }
    if transcoder:
        metadata.update(
            hook_name_out=saelens_hook_name(site_out),
            hf_hook_name_out=hook_from_site(site_out),
            hook_head_index_out=None,
        )
    return metadata


def saelens_config(
    ae: AutoEncoder, *, model_name: str | None = None, converted_topk: bool = False
) -> dict[str, Any]:
    """The cfg.json dict SAELens reads for ``ae``."""
    meta = ae.meta
    transcoder = _is_transcoder(ae)
    config: dict[str, Any] = {
        "architecture": saelens_architecture(ae, converted_topk=converted_topk),
        "d_in": meta.d_in,
        "d_sae": meta.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        # SAELens feeds an SAE at blocks.L.attn.hook_z [..., n_heads, d_head] and flattens it only
        # with "hook_z" (its own default for hook_z names); our attn_out is the flattened z.
        "reshape_activations": "hook_z" if meta.site_in.endswith(".attn_out") else "none",
    }
    if transcoder:
        config["d_out"] = meta.d_out
    if config["architecture"] == "topk":
        config.update(k=meta.k, rescale_acts_by_decoder_norm=False)
    config["metadata"] = _metadata(ae, model_name, transcoder)
    return config


def _weights(ae: AutoEncoder, topk_threshold) -> dict[str, np.ndarray]:
    arrays = ae.to_arrays()
    tensors = {
        "W_enc": arrays["w_enc"],
        "b_enc": arrays["b_enc"],
        "W_dec": arrays["w_dec"],
        "b_dec": arrays["b_dec"],
    }
    if ae.meta.activation == "jumprelu" or topk_threshold is not None:
        threshold = jumprelu_threshold(ae, topk_threshold)
        if (threshold < 0).any():
            raise ValueError(
                f"threshold has negative entries (min {threshold.min():.4g}); SAELens computes "
                "relu(z) * (z > threshold), which differs from this dictionary's z * (z > threshold)"
            )
        tensors["threshold"] = threshold
    if "w_skip" in arrays:
        tensors["W_skip"] = np.asarray(arrays["w_skip"]).T  # SAELens: x @ W_skip.T, [d_out, d_in]
    return {key: np.ascontiguousarray(value, np.float32) for key, value in tensors.items()}


def save_saelens(
    ae: AutoEncoder,
    folder: str | os.PathLike,
    *,
    model_name: str | None = None,
    overwrite: bool = False,
    topk_threshold: float | np.ndarray | None = None,
) -> Path:
    """Writes ``ae`` as a SAELens folder that ``SAE.load_from_disk`` loads, atomically.

    Args:
      ae: An `AutoEncoder` or `AutoEncoderSkip` with sites in its ``meta``.
      folder: The folder to write (built in a temporary sibling, then renamed into place).
      model_name: Gemma 3 model, written as its Hugging Face id; defaults to
        ``ae.meta.extra["model_name"]``.
      overwrite: Replace an existing folder (atomically) instead of raising FileExistsError.
      topk_threshold: For a TopK dictionary: write it as JumpReLU with this threshold. Needed for a
        TopK transcoder (SAELens has none); a TopK SAE without it is written as SAELens "topk".

    Returns:
      The folder.

    Raises:
      ValueError: a TopK transcoder without ``topk_threshold``, a negative JumpReLU threshold, no
        Gemma 3 model name, or a site with no SAELens hook name.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists (pass overwrite=True to replace it)")
    converted = ae.meta.activation == "topk" and topk_threshold is not None
    config = saelens_config(ae, model_name=model_name, converted_topk=converted)
    if converted:
        config["metadata"]["converted_from"] = f"topk (k={ae.meta.k})"
    tensors = _weights(ae, topk_threshold if converted else None)

    def fill(tmp: Path) -> None:
        (tmp / CFG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE))

    return write_folder_atomically(folder, fill, overwrite=overwrite)
