"""Circuits: attribution graphs over transcoders and CLTs on the frozen replacement model.

``transcoders`` (the transcoder stack), ``replacement`` (the frozen local replacement model),
``attribution`` (nodes and direct-effect edges), ``influence`` (ranking features by
influence through a partly computed edge matrix), ``graph`` (pruning, scores, circuit-tracer
JSON), ``html`` (the self-contained HTML view), ``interventions`` (set/ablate features and
rerun) and ``cli`` (``gemma-scope-pz attribute``). The names below are imported on first use, so the CLI starts without JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Graph": "graph",
    "graph_scores": "graph",
    "prune_graph": "graph",
    "save_graph": "graph",
    "load_graph": "graph",
    "save_graph_json": "graph",
    "load_graph_json": "graph",
    "render_graph": "html",
    "graph_html": "html",
    "save_graph_html": "html",
    "feature_reports": "html",
    "attribute": "attribution",
    "prepare_attribution": "attribution",
    "intervene": "interventions",
    "replacement_logits": "replacement",
    "trace_prompt": "replacement",
    "TranscoderStack": "transcoders",
    "as_transcoder_stack": "transcoders",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gemma_scope_pz.circuits' has no attribute {name!r}")
    return getattr(importlib.import_module(f"gemma_scope_pz.circuits.{_EXPORTS[name]}"), name)
