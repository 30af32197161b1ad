"""Circuits: attribution graphs over transcoders and CLTs on the frozen replacement model.

``transcoders`` (the transcoder stack), ``replacement`` (the frozen local replacement model),
``attribution`` (nodes and direct-effect edges), ``graph`` (pruning, scores, circuit-tracer
JSON) and ``interventions`` (set/ablate features and rerun).
"""

from gemma_scope_pz.circuits.attribution import attribute, prepare_attribution
from gemma_scope_pz.circuits.graph import Graph, graph_scores, prune_graph
from gemma_scope_pz.circuits.interventions import intervene
from gemma_scope_pz.circuits.replacement import replacement_logits, trace_prompt
from gemma_scope_pz.circuits.transcoders import TranscoderStack, as_transcoder_stack

__all__ = [
    "Graph",
    "TranscoderStack",
    "as_transcoder_stack",
    "attribute",
    "graph_scores",
    "intervene",
    "prepare_attribution",
    "prune_graph",
    "replacement_logits",
    "trace_prompt",
]
