"""Export trained SAEs / transcoders to the Gemma Scope 2 and SAELens folder formats.

Exported weights take *raw* activations: the training normaliser is folded in (see
:mod:`~gemma_scope_pz.train.normalize`), and BatchTopK SAEs are exported as JumpReLU SAEs with
their running global threshold. Folders are written to a temporary sibling and renamed into
place, so a reader never sees a half-written export.

Gemma Scope 2 folder::

    config.json          {"type": "sae"|"transcoder", "width", "d_in", "d_out", "architecture"
                          ("jump_relu"|"relu"|"topk"), "k", "l0", "model_name", "site_in",
                          "site_out", "hf_hook_point_in", "hf_hook_point_out",
                          "affine_connection", ...}
    params.safetensors   w_enc, b_enc, w_dec, b_dec, threshold (JumpReLU),
                         affine_skip_connection (transcoders with skip)

SAELens folder::

    cfg.json                  architecture ("standard"|"jumprelu"|"topk"|"transcoder"...), d_in,
                              d_sae, d_out, dtype, device, model_name, hook_name,
                              hook_name_out, normalize_activations="none",
                              apply_b_dec_to_input=false, k, metadata{...}
    sae_weights.safetensors   W_enc, b_enc, W_dec, b_dec, threshold, W_skip
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from gemma_scope_pz.train.trainer import TrainResult

_GS_ARCH = {"jumprelu": "jump_relu", "relu": "relu", "topk": "topk"}
_HF_SITES = {
    "resid_post": "model.layers.{L}.output",
    "resid_pre": "model.layers.{L}.input",
    "attn_out": "model.layers.{L}.self_attn.o_proj.input",
    "mlp_in": "model.layers.{L}.pre_feedforward_layernorm.output",
    "mlp_out": "model.layers.{L}.post_feedforward_layernorm.output",
}


def hf_hook_point(site: str) -> str:
    """Hugging Face module path of a "blocks.{L}.{kind}" site (the site itself if unknown)."""
    match = re.fullmatch(r"blocks\.(\d+)\.(\w+)", site or "")
    if not match or match.group(2) not in _HF_SITES:
        return site
    return _HF_SITES[match.group(2)].format(L=match.group(1))


def to_autoencoder(result: TrainResult, extra: dict | None = None):
    """The Penzai ``AutoEncoder``/``AutoEncoderSkip`` of a trained result, taking raw activations.

    The normaliser is folded in (BatchTopK becomes JumpReLU with the running threshold); ``meta``
    records the sites and, in ``meta.extra``, the training config, the final L0, the skipped-step
    count and anything in ``extra``.
    """
    from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta

    p = result.raw_params()
    cfg = result.config
    k = cfg.sae.k if result.export_activation == "topk" else None
    info = {
        "train_config": cfg.to_dict(),
        "model_name": cfg.run.model_name,
        "l0": _final_l0(result),
        "n_skipped_steps": result.n_skipped,
        "trained_with": "gemma_scope_pz",
    }
    info.update(extra or {})
    meta = SaeMeta(
        d_in=cfg.sae.d_in,
        d_sae=cfg.sae.d_sae,
        d_out=cfg.sae.out_dim,
        activation=result.export_activation,
        k=k,
        site_in=cfg.sae.site_in,
        site_out=cfg.sae.site_out or cfg.sae.site_in,
        extra=info,
    )
    return AutoEncoder.from_arrays(
        p["w_enc"],
        p["b_enc"],
        p["w_dec"],
        p["b_dec"],
        p.get("threshold"),
        activation=result.export_activation,
        k=k,
        w_skip=p.get("w_skip"),
        meta=meta,
    )


def _final_l0(result: TrainResult) -> float | None:
    return float(result.metrics[-1]["l0"]) if result.metrics else None


def _write_folder(folder: str | os.PathLike, files: dict[str, Any]) -> str:
    """Writes ``{name: dict (JSON) | {key: array} (safetensors)}`` atomically as a folder."""
    folder = os.path.abspath(os.fspath(folder))
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.tmp-", dir=parent)
    try:
        for name, content in files.items():
            path = os.path.join(tmp, name)
            if name.endswith(".json"):
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(content, f, indent=2)
            else:
                arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in content.items()}
                save_file(arrays, path)
        old = None
        if os.path.exists(folder):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def gemma_scope_2_files(result: TrainResult) -> dict[str, Any]:
    """The config dict and tensors of a Gemma Scope 2 export."""
    cfg, params = result.config, result.raw_params()
    activation = result.export_activation
    tensors = {k: params[k] for k in ("w_enc", "b_enc", "w_dec", "b_dec")}
    if "threshold" in params:
        tensors["threshold"] = params["threshold"]
    if "w_skip" in params:
        tensors["affine_skip_connection"] = params["w_skip"]
    site_out = cfg.sae.site_out or cfg.sae.site_in
    config = {
        "type": "transcoder" if cfg.sae.is_transcoder else "sae",
        "width": cfg.sae.d_sae,
        "d_in": cfg.sae.d_in,
        "d_out": cfg.sae.out_dim,
        "architecture": _GS_ARCH[activation],
        "k": cfg.sae.k if activation == "topk" else None,
        "l0": _final_l0(result),
        "model_name": cfg.run.model_name,
        "site_in": cfg.sae.site_in,
        "site_out": site_out,
        "hf_hook_point_in": hf_hook_point(cfg.sae.site_in),
        "hf_hook_point_out": hf_hook_point(site_out),
        "affine_connection": "w_skip" in params,
        "trained_architecture": cfg.sae.architecture,
        "normalization_folded": cfg.sae.normalization,
        "dtype": "float32",
    }
    return {"config.json": config, "params.safetensors": tensors}


def export_gemma_scope_2(result: TrainResult, folder: str | os.PathLike) -> str:
    """Writes ``config.json`` + ``params.safetensors`` (Gemma Scope 2 layout); returns the path.

    Uses :func:`gemma_scope_pz.scope.checkpoints.save_gemma_scope_2` (so the folder loads with
    ``load_sae``) when that module is available and the sites are standard site names; otherwise
    writes the same keys itself. An existing export at ``folder`` is replaced atomically.
    """
    files = gemma_scope_2_files(result)
    cfg = result.config
    standard = all(not s or hf_hook_point(s) != s for s in (cfg.sae.site_in, cfg.sae.site_out))
    try:
        from gemma_scope_pz.scope.formats import save_gemma_scope_2
    except ImportError:
        save_gemma_scope_2 = None
    if save_gemma_scope_2 is None or not standard:
        return _write_folder(folder, files)
    sae = result.to_autoencoder(extra=files["config.json"])
    return os.fspath(save_gemma_scope_2(sae, folder, overwrite=True))


def saelens_files(result: TrainResult) -> dict[str, Any]:
    """The cfg dict and tensors of a SAELens export."""
    cfg, params = result.config, result.raw_params()
    activation = result.export_activation
    arch = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[activation]
    if cfg.sae.is_transcoder:
        arch = {"standard": "transcoder", "jumprelu": "jumprelu_transcoder"}.get(arch, arch)
        if "w_skip" in params:
            arch = "jumprelu_skip_transcoder" if activation == "jumprelu" else "skip_transcoder"
    names = {
        "w_enc": "W_enc",
        "b_enc": "b_enc",
        "w_dec": "W_dec",
        "b_dec": "b_dec",
        "threshold": "threshold",
        "w_skip": "W_skip",
    }
    tensors = {names[k]: v for k, v in params.items() if k in names}
    metadata = {
        "model_name": cfg.run.model_name,
        "hook_name": cfg.sae.site_in,
        "hook_name_out": cfg.sae.site_out or cfg.sae.site_in,
        "hook_head_index": None,
        "prepend_bos": True,
        "dataset_path": cfg.run.corpus,
        "sae_lens_training_version": None,
        "l0": _final_l0(result),
        "trained_with": "gemma_scope_pz",
    }
    config = {
        "architecture": arch,
        "d_in": cfg.sae.d_in,
        "d_sae": cfg.sae.d_sae,
        "d_out": cfg.sae.out_dim,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "model_name": cfg.run.model_name,
        "hook_name": cfg.sae.site_in,
        "hook_name_out": cfg.sae.site_out or cfg.sae.site_in,
        "metadata": metadata,
    }
    if activation == "topk":
        config["k"] = cfg.sae.k
    return {"cfg.json": config, "sae_weights.safetensors": tensors}


def export_saelens(result: TrainResult, folder: str | os.PathLike) -> str:
    """Writes ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout); returns the path."""
    return _write_folder(folder, saelens_files(result))
