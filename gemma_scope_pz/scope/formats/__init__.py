"""Dictionary file formats: load and save Gemma Scope SAEs, transcoders, CLTs and crosscoders.

One module per format; this package re-exports the public loaders and writers:

* :mod:`~gemma_scope_pz.scope.formats.gemma_scope_2`: Gemma Scope 2 SAE/transcoder folders
  (``config.json`` + ``params.safetensors``): `load_sae`, `save_gemma_scope_2`;
* :mod:`~gemma_scope_pz.scope.formats.gemma_scope_1`: Gemma Scope 1 ``params.npz``:
  `load_gemma_scope_1`;
* :mod:`~gemma_scope_pz.scope.formats.clt`: Gemma Scope 2 cross-layer transcoders: `load_clt`;
* :mod:`~gemma_scope_pz.scope.formats.crosscoder`: Gemma Scope 2 weakly causal crosscoders:
  `load_crosscoder`;
* :mod:`~gemma_scope_pz.scope.formats.saelens`: SAELens folders (``cfg.json`` +
  ``sae_weights.safetensors``): `save_saelens`;
* :mod:`~gemma_scope_pz.scope.formats.hook_names`: sites <-> Gemma Scope 2 hook points and SAELens
  hook names: `site_from_hook`, `hook_from_site`, `saelens_hook_name`;
* :mod:`~gemma_scope_pz.scope.formats.files`: finding files locally or on the Hub, `CheckpointError`,
  and strict, bounded-memory safetensors reading.

Example::

    sae = load_sae("google/gemma-scope-2-270m-pt", "resid_post/layer_9_width_16k_l0_medium")
"""

from __future__ import annotations

from gemma_scope_pz.scope.cross_layer_transcoder import CrossLayerTranscoder
from gemma_scope_pz.scope.crosscoder import Crosscoder
from gemma_scope_pz.scope.formats.clt import load_clt
from gemma_scope_pz.scope.formats.crosscoder import load_crosscoder
from gemma_scope_pz.scope.formats.files import CONFIG_FILE, NPZ_FILE, PARAMS_FILE, CheckpointError
from gemma_scope_pz.scope.formats.gemma_scope_1 import load_gemma_scope_1
from gemma_scope_pz.scope.formats.gemma_scope_2 import load_sae, save_gemma_scope_2
from gemma_scope_pz.scope.formats.hook_names import (
    hook_from_site,
    saelens_hook_name,
    site_from_hook,
)
from gemma_scope_pz.scope.formats.saelens import save_saelens

__all__ = [
    "CONFIG_FILE",
    "NPZ_FILE",
    "PARAMS_FILE",
    "CheckpointError",
    "CrossLayerTranscoder",
    "Crosscoder",
    "hook_from_site",
    "load_clt",
    "load_crosscoder",
    "load_gemma_scope_1",
    "load_sae",
    "saelens_hook_name",
    "save_gemma_scope_2",
    "save_saelens",
    "site_from_hook",
]
