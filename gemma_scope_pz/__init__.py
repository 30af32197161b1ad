"""gemma_scope_pz: Gemma 3 and Gemma Scope 2 in Penzai and JAX.

The entry points a notebook types first::

    import gemma_scope_pz as gs
    model = gs.load_model()                   # offline Gemma 3 270M (GGUF); or "hf:google/gemma-3-1b-pt", ...
    tok = gs.load_tokenizer()                 # same sources
    sae = gs.load_sae("google/gemma-scope-2-270m-pt", "resid_post/layer_9_width_16k_l0_medium")
    acts = gs.capture(model, tokens, ["blocks.9.resid_post"])

Names are resolved lazily, so ``import gemma_scope_pz`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # models
    "Gemma3Config": "gemma_scope_pz.models.config",
    "Gemma3LM": "gemma_scope_pz.models.gemma3",
    "forward": "gemma_scope_pz.models.gemma3",
    "load_model": "gemma_scope_pz.models.loading",
    "load_params": "gemma_scope_pz.models.checkpoints",
    "load_tokenizer": "gemma_scope_pz.models.tokenizer",
    "format_chat": "gemma_scope_pz.models.tokenizer",
    "generate": "gemma_scope_pz.models.sampling",
    # scope
    "AutoEncoder": "gemma_scope_pz.scope.layers",
    "AutoEncoderSkip": "gemma_scope_pz.scope.layers",
    "JumpReLU": "gemma_scope_pz.scope.layers",
    "load_sae": "gemma_scope_pz.scope.checkpoints",
    "Site": "gemma_scope_pz.scope.sites",
    "attach": "gemma_scope_pz.scope.sites",
    "capture": "gemma_scope_pz.scope.interventions",
    "splice": "gemma_scope_pz.scope.interventions",
    "steer": "gemma_scope_pz.scope.interventions",
    "evaluate_sae": "gemma_scope_pz.scope.evaluate",
    "top_features": "gemma_scope_pz.scope.evaluate",
    "logit_lens": "gemma_scope_pz.scope.lens",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gemma_scope_pz' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
