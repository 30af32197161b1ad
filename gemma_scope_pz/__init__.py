"""gemma_scope_pz: Gemma 3 and Gemma Scope 2 in Penzai and JAX.

The facade: every step a notebook takes is a name here. The entry points typed first::

    import gemma_scope_pz as gs
    model = gs.load_model()                   # offline Gemma 3 270M (GGUF); or "hf:google/gemma-3-1b-pt", ...
    tok = gs.load_tokenizer()                 # same sources
    sae = gs.load_sae("google/gemma-scope-2-270m-pt", "resid_post/layer_9_width_16k_l0_medium")
    acts = gs.capture(model, tokens, ["blocks.9.resid_post"])

Then training (``gs.TrainConfig``, ``gs.harvest_array``, ``gs.train_sae``, ``gs.train_dictionary``),
export and saving (``gs.export_gemma_scope_2``, ``gs.export_saelens``, ``gs.save_sae``) and analysis
(``gs.load_corpus``, ``gs.corpus_contexts``, ``gs.collect_examples``, ``gs.feature_stats``,
``gs.write_cards``). Names are resolved lazily, so ``import gemma_scope_pz`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from gemma_scope_pz import backend as _backend  # noqa: E402 (before JAX starts)

_backend.apply_environment()

# name -> "module" (attribute of the same name) or "module:attribute.path".
_EXPORTS = {
    # models
    "Gemma3Config": "gemma_scope_pz.models.config",
    "Gemma3LM": "gemma_scope_pz.models.gemma3",
    "param_shapes": "gemma_scope_pz.models.config",
    "forward": "gemma_scope_pz.models.gemma3",
    "load_model": "gemma_scope_pz.models.loading",
    "load_params": "gemma_scope_pz.models.checkpoints",
    "load_tokenizer": "gemma_scope_pz.models.tokenizer",
    "format_chat": "gemma_scope_pz.models.tokenizer",
    "generate": "gemma_scope_pz.models.sampling",
    "set_cpu_matmul": "gemma_scope_pz.backend",
    "cpu_matmul": "gemma_scope_pz.backend",
    # dictionaries: layers and files
    "AutoEncoder": "gemma_scope_pz.scope.layers",
    "AutoEncoderSkip": "gemma_scope_pz.scope.layers",
    "JumpReLU": "gemma_scope_pz.scope.layers",
    "load_sae": "gemma_scope_pz.scope.formats",
    "load_gemma_scope_1": "gemma_scope_pz.scope.formats",
    "load_clt": "gemma_scope_pz.scope.formats",
    "load_crosscoder": "gemma_scope_pz.scope.formats",
    "Crosscoder": "gemma_scope_pz.scope.crosscoder",
    "crosscoder_latents": "gemma_scope_pz.scope.multisite",
    "crosscoder_logits": "gemma_scope_pz.scope.multisite",
    "evaluate_crosscoder": "gemma_scope_pz.scope.multisite",
    "steer_crosscoder": "gemma_scope_pz.scope.multisite",
    "save_gemma_scope_2": "gemma_scope_pz.scope.formats",
    "save_sae": "gemma_scope_pz.scope.formats:save_gemma_scope_2",
    # sites and interventions
    "Site": "gemma_scope_pz.scope.sites",
    "attach": "gemma_scope_pz.scope.sites",
    "capture": "gemma_scope_pz.scope.interventions",
    "splice": "gemma_scope_pz.scope.interventions",
    "steer": "gemma_scope_pz.scope.interventions",
    # evaluation and lens
    "evaluate_sae": "gemma_scope_pz.scope.evaluate",
    "top_features": "gemma_scope_pz.scope.evaluate",
    "latent_encoder": "gemma_scope_pz.scope.evaluate",
    "latents": "gemma_scope_pz.scope.evaluate",
    "token_losses": "gemma_scope_pz.scope.evaluate",
    "logit_lens": "gemma_scope_pz.scope.lens",
    "display_tokens": "gemma_scope_pz.analysis.html",
    "highlight_tokens": "gemma_scope_pz.analysis.html",
    # data
    "load_corpus": "gemma_scope_pz.data.corpus",
    "pack_contexts": "gemma_scope_pz.data.packing",
    "corpus_contexts": "gemma_scope_pz.data.packing",
    "token_mask": "gemma_scope_pz.scope.tokens",
    # training and export
    "TrainConfig": "gemma_scope_pz.train.config",
    "harvest_array": "gemma_scope_pz.train.harvest",
    "harvest_to_cache": "gemma_scope_pz.train.pipeline",
    # Not ``gs.train``: importing the ``gemma_scope_pz.train`` package binds that name to it.
    "train_sae": "gemma_scope_pz.train.trainer:train",
    "train_dictionary": "gemma_scope_pz.train.pipeline",
    "train_streaming": "gemma_scope_pz.train.streaming",
    "StreamConfig": "gemma_scope_pz.train.stream_data",
    "export_gemma_scope_2": "gemma_scope_pz.train.export",
    "export_saelens": "gemma_scope_pz.train.export",
    "make_mesh": "gemma_scope_pz.parallel.mesh",
    # running on a device mesh
    "shard": "gemma_scope_pz.parallel.shard",
    "unshard": "gemma_scope_pz.parallel.shard",
    "shard_batch": "gemma_scope_pz.parallel.shard",
    # analysis
    "collect_examples": "gemma_scope_pz.analysis.examples:collect_max_activating",
    "FeatureStats": "gemma_scope_pz.analysis.stats",
    "feature_stats": "gemma_scope_pz.analysis.stats:FeatureStats.from_examples",
    "feature_card_html": "gemma_scope_pz.analysis.cards",
    "write_cards": "gemma_scope_pz.analysis.cards:write_feature_cards",
    "token_loss_svg": "gemma_scope_pz.analysis.plots",
    "activation_svg": "gemma_scope_pz.analysis.plots",
    "density_histogram_svg": "gemma_scope_pz.analysis.plots",
    # circuits: attribution graphs over transcoders and CLTs
    "attribute": "gemma_scope_pz.circuits.attribution",
    "render_graph": "gemma_scope_pz.circuits.html",
    # the offline dictionaries trained by the tour's settings
    "offline_dictionaries": "gemma_scope_pz.app.tour",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gemma_scope_pz' has no attribute {name!r}")
    module, _, path = _EXPORTS[name].partition(":")
    value: Any = importlib.import_module(module)
    for part in (path or name).split("."):
        value = getattr(value, part)
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
