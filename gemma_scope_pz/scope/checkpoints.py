"""Load and save Gemma Scope sparse autoencoders, transcoders and cross-layer transcoders.

This module gathers the public loaders and writers; each format lives in its own module:

* :mod:`~gemma_scope_pz.scope.gemma_scope_2`: Gemma Scope 2 SAE/transcoder folders
  (``config.json`` + ``params.safetensors``): `load_sae`, `save_gemma_scope_2`;
* :mod:`~gemma_scope_pz.scope.gemma_scope_1`: Gemma Scope 1 ``params.npz``:
  `load_gemma_scope_1`;
* :mod:`~gemma_scope_pz.scope.cross_layer_transcoder`: Gemma Scope 2 cross-layer transcoders
  (one ``params_layer_{i}.safetensors`` per source layer): `CrossLayerTranscoder`, `load_clt`;
* :mod:`~gemma_scope_pz.scope.hook_points`: HF hook points <-> site names:
  `site_from_hook`, `hook_from_site`.

Shared pieces: :mod:`~gemma_scope_pz.scope.checkpoint_files` finds the files in a local folder
or on the Hugging Face Hub (and defines `CheckpointError`), and
:mod:`~gemma_scope_pz.scope.safetensors_io` reads safetensors tensor by tensor with bounded host
memory (bfloat16 without torch). Example::

    sae = load_sae("google/gemma-scope-2-270m-pt", "resid_post/layer_9_width_16k_l0_medium")
"""

from __future__ import annotations

from gemma_scope_pz.scope.checkpoint_files import (
    CONFIG_FILE,
    NPZ_FILE,
    PARAMS_FILE,
    CheckpointError,
)
from gemma_scope_pz.scope.cross_layer_transcoder import CrossLayerTranscoder, load_clt
from gemma_scope_pz.scope.gemma_scope_1 import load_gemma_scope_1
from gemma_scope_pz.scope.gemma_scope_2 import load_sae, save_gemma_scope_2
from gemma_scope_pz.scope.hook_points import hook_from_site, site_from_hook

__all__ = [
    "CONFIG_FILE",
    "NPZ_FILE",
    "PARAMS_FILE",
    "CheckpointError",
    "CrossLayerTranscoder",
    "hook_from_site",
    "load_clt",
    "load_gemma_scope_1",
    "load_sae",
    "save_gemma_scope_2",
    "site_from_hook",
]
