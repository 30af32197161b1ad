"""The attribution graph: nodes, adjacency, pruning, scores and circuit-tracer's JSON.

Node order (as circuit-tracer): the selected feature nodes (in the order of
``active_features[selected_features]``), then error nodes ``(layer, position)`` layer-major, then
one token node per position, then the logit nodes (most likely token first). ``adjacency[t, s]``
is the direct effect of source ``s`` on target ``t``: rows are targets, columns sources; token
and error rows are zero.

Pruning, influence and the replacement/completeness scores follow circuit-tracer's
``prune_graph`` and ``compute_graph_scores`` (node threshold 0.8, edge threshold 0.98).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from gemma_scope_pz.io import write_atomically

__all__ = [
    "Graph",
    "PruneResult",
    "compute_influence",
    "graph_scores",
    "load_graph",
    "load_graph_json",
    "node_label",
    "normalize_matrix",
    "prune_graph",
    "save_graph",
    "save_graph_json",
    "strongest_path",
    "to_frontend_json",
]


@dataclasses.dataclass
class Graph:
    """An attribution graph (see the module docstring for node order and edge direction).

    Attributes:
      input_string: The prompt text (may be empty).
      input_tokens: [seq] token ids.
      active_features: [n_active, 3] (layer, position, latent) of every active feature.
      activation_values: [n_active] their activations.
      selected_features: [n_selected] indices into ``active_features`` that are graph nodes.
      adjacency_matrix: [n_nodes, n_nodes], rows targets, columns sources.
      logit_tokens: [n_logits] token ids of the logit nodes.
      logit_probabilities: [n_logits] their probabilities.
      n_layers: Number of model layers (error nodes per position).
    """

    input_string: str
    input_tokens: np.ndarray
    active_features: np.ndarray
    activation_values: np.ndarray
    selected_features: np.ndarray
    adjacency_matrix: np.ndarray
    logit_tokens: np.ndarray
    logit_probabilities: np.ndarray
    n_layers: int

    @property
    def n_pos(self) -> int:
        return len(self.input_tokens)

    @property
    def n_features(self) -> int:
        return len(self.selected_features)

    def node_slices(self) -> dict[str, slice]:
        """Where each kind of node lies in the node order."""
        f, e, t = self.n_features, self.n_layers * self.n_pos, self.n_pos
        return {
            "features": slice(0, f),
            "errors": slice(f, f + e),
            "tokens": slice(f + e, f + e + t),
            "logits": slice(f + e + t, f + e + t + len(self.logit_tokens)),
        }

    def logit_weights(self) -> np.ndarray:
        weights = np.zeros(self.adjacency_matrix.shape[0])
        weights[self.node_slices()["logits"]] = self.logit_probabilities
        return weights


def normalize_matrix(matrix: np.ndarray) -> np.ndarray:
    """``|A|`` with each row divided by its sum (rows summing to 0 stay 0)."""
    a = np.abs(np.asarray(matrix, np.float64))
    return a / np.maximum(a.sum(axis=1, keepdims=True), 1e-10)


def compute_influence(a: np.ndarray, weights: np.ndarray, max_iter: int = 1000) -> np.ndarray:
    """``w A + w A^2 + ...`` (the graph is acyclic, so the series ends)."""
    current = weights @ a
    influence = current.copy()
    for _ in range(max_iter):
        if not current.any():
            return influence
        current = current @ a
        influence += current
    raise RuntimeError(f"influence did not converge in {max_iter} steps")


def _threshold(scores: np.ndarray, fraction: float) -> float:
    """The score at which the top scores first reach ``fraction`` of the total."""
    ordered = np.sort(scores.ravel())[::-1]
    cumulative = np.cumsum(ordered) / ordered.sum()
    index = min(int(np.searchsorted(cumulative, fraction, side="left")), len(ordered) - 1)
    return ordered[index]


@dataclasses.dataclass
class PruneResult:
    """Which nodes and edges survive pruning, and each node's cumulative influence score."""

    node_mask: np.ndarray
    edge_mask: np.ndarray
    cumulative_scores: np.ndarray


def _drop_dangling(node_mask, edge_mask, n_features: int, n_kept_end: int) -> None:
    """Features/errors need an outgoing edge, features an incoming one; repeat until stable."""
    end = len(node_mask) - n_kept_end
    while True:
        old = node_mask.copy()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:end] &= edge_mask[:, :end].any(axis=0)
        node_mask[:n_features] &= edge_mask[:n_features].any(axis=1)
        if np.array_equal(old, node_mask):
            return


def prune_graph(
    graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> PruneResult:
    """Keeps the nodes and edges carrying the given fractions of influence on the logits."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    n_fixed = graph.n_pos + len(graph.logit_tokens)
    weights = graph.logit_weights()
    influence = compute_influence(normalize_matrix(graph.adjacency_matrix), weights)
    node_mask = influence >= _threshold(influence, node_threshold)
    node_mask[-n_fixed:] = True
    pruned = np.array(graph.adjacency_matrix, np.float64)
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    normalized = normalize_matrix(pruned)
    edge_scores = normalized * (compute_influence(normalized, weights) + weights)[:, None]
    edge_mask = edge_scores >= _threshold(edge_scores, edge_threshold)
    old = node_mask.copy()
    end = len(node_mask) - n_fixed
    node_mask[:end] &= edge_mask[:, :end].any(axis=0)
    node_mask[: graph.n_features] &= edge_mask[: graph.n_features].any(axis=1)
    if not np.array_equal(old, node_mask):
        _drop_dangling(node_mask, edge_mask, graph.n_features, n_fixed)
    order = np.argsort(-influence, kind="stable")
    cumulative = np.zeros_like(influence)
    cumulative[order] = np.cumsum(influence[order]) / influence.sum()
    return PruneResult(node_mask, edge_mask, cumulative)


def graph_scores(graph: Graph) -> tuple[float, float]:
    """(replacement score, completeness score) as circuit-tracer's ``compute_graph_scores``.

    Replacement: the share of token-to-logit influence not routed through error nodes.
    Completeness: the influence-weighted share of each node's inputs that are not errors.
    """
    sl = graph.node_slices()
    weights = graph.logit_weights()
    normalized = normalize_matrix(graph.adjacency_matrix)
    influence = compute_influence(normalized, weights)
    token, error = influence[sl["tokens"]].sum(), influence[sl["errors"]].sum()
    replacement = token / (token + error)
    non_error = 1.0 - normalized[:, sl["errors"]].sum(axis=1)
    output = influence + weights
    return float(replacement), float((non_error * output).sum() / output.sum())


def strongest_path(graph: Graph, edge_mask: np.ndarray | None = None, logit: int = 0) -> list[int]:
    """The path into logit node ``logit`` with the largest product of row-normalised ``|A|``.

    It starts at a node without inputs (a token or an error node) and ends at the logit; with
    ``edge_mask`` (e.g. `prune_graph`'s) only those edges are used. Returns node indices.
    """
    a = np.abs(np.asarray(graph.adjacency_matrix, np.float64))
    weights = normalize_matrix(a if edge_mask is None else np.where(edge_mask, a, 0.0))
    target = graph.node_slices()["logits"].start + logit
    reach = np.zeros(len(weights))
    reach[target] = 1.0
    for _ in range(len(weights)):  # longest possible path; stops early on an acyclic graph
        new = np.maximum(reach, (reach[:, None] * weights).max(axis=0))
        if np.array_equal(new, reach):
            break
        reach = new
    starts = ~weights.any(axis=1)
    starts[target] = False
    node = int(np.argmax(np.where(starts, reach, -1.0)))
    if reach[node] == 0:
        return []
    path = [node]
    while node != target:
        node = int(np.argmax(reach * weights[:, node]))
        path.append(node)
    return path


def node_label(
    graph: Graph, index: int, token_strings: Callable[[Sequence[int]], list[str]]
) -> str:
    """A short name of node ``index``: ``"feature 6/471 at ' is' (5)"``, ``"error 10 at ..."``."""
    sl = graph.node_slices()
    if index < sl["features"].stop:
        layer, pos, latent = (int(v) for v in graph.active_features[graph.selected_features[index]])
        return f"feature {layer}/{latent} at {token_strings([int(graph.input_tokens[pos])])[0]!r} ({pos})"
    if index < sl["errors"].stop:
        layer, pos = divmod(index - sl["errors"].start, graph.n_pos)
        return f"error {layer} at {token_strings([int(graph.input_tokens[pos])])[0]!r} ({pos})"
    if index < sl["tokens"].stop:
        pos = index - sl["tokens"].start
        return f"token {token_strings([int(graph.input_tokens[pos])])[0]!r} ({pos})"
    k = index - sl["logits"].start
    token = token_strings([int(graph.logit_tokens[k])])[0]
    return f"logit {token!r} (p={float(graph.logit_probabilities[k]):.3f})"


_ARRAYS = (
    "input_tokens",
    "active_features",
    "activation_values",
    "selected_features",
    "adjacency_matrix",
    "logit_tokens",
    "logit_probabilities",
)


def save_graph(graph: Graph, path: str | Path) -> None:
    """Writes the whole graph as one ``.npz`` (no pickles), atomically."""
    import io

    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        input_string=np.asarray(graph.input_string),
        n_layers=np.asarray(graph.n_layers),
        **{name: np.asarray(getattr(graph, name)) for name in _ARRAYS},
    )
    write_atomically(Path(path), buffer.getvalue())


def load_graph(path: str | Path) -> Graph:
    """Reads a graph written by `save_graph`."""
    with np.load(Path(path), allow_pickle=False) as data:
        missing = [k for k in (*_ARRAYS, "input_string", "n_layers") if k not in data]
        if missing:
            raise ValueError(f"{path}: not a saved graph, missing {missing}")
        return Graph(
            input_string=str(data["input_string"]),
            n_layers=int(data["n_layers"]),
            **{name: data[name] for name in _ARRAYS},
        )


def _process_token(token: str) -> str:
    return token.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def _node(node_id, feature, layer, pos, kind, js_id, **extra) -> dict:
    node = {
        "node_id": node_id,
        "feature": int(feature),
        "layer": str(layer),
        "ctx_idx": int(pos),
        "feature_type": kind,
        "token_prob": 0.0,
        "is_target_logit": False,
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": js_id,
        "clerp": "",
        "influence": None,
        "activation": None,
    }
    node.update(extra)
    return node


def _frontend_node(graph: Graph, idx: int, scores, decode, d_transcoder) -> dict:
    sl = graph.node_slices()
    influence = float(scores[idx])
    if idx < sl["features"].stop:
        feat = int(graph.selected_features[idx])
        layer, pos, latent = (int(v) for v in graph.active_features[feat])
        offset = 10 ** math.ceil(math.log10(d_transcoder)) if d_transcoder else 0
        return _node(
            f"{layer}_{latent}_{pos}", latent + offset * layer, layer, pos,
            "cross layer transcoder", f"{layer}_{latent}-0", influence=influence,
            activation=float(graph.activation_values[feat]),
        )  # fmt: skip
    if idx < sl["errors"].stop:
        layer, pos = divmod(idx - sl["errors"].start, graph.n_pos)
        return _node(
            f"0_{layer}_{pos}", -1, layer, pos, "mlp reconstruction error", f"{layer}_{pos}-0",
            influence=influence,
        )  # fmt: skip
    if idx < sl["tokens"].stop:
        pos = idx - sl["tokens"].start
        vocab = int(graph.input_tokens[pos])
        return _node(
            f"E_{vocab}_{pos}", pos, "E", pos, "embedding", f"E_{vocab}-{pos}", influence=influence
        )
    k = idx - sl["logits"].start
    vocab, prob = int(graph.logit_tokens[k]), float(graph.logit_probabilities[k])
    layer, pos = graph.n_layers + 1, graph.n_pos - 1
    return _node(
        f"{layer}_{vocab}_{pos}", vocab, layer, pos, "logit", f"L_{vocab}-{pos}",
        token_prob=prob, is_target_logit=k == 0,
        clerp=f'Output "{_process_token(decode([vocab]))}" (p={prob:.3f})',
    )  # fmt: skip


def to_frontend_json(
    graph: Graph,
    slug: str,
    *,
    decode: Callable[[Sequence[int]], str] = lambda ids: " ".join(map(str, ids)),
    scan: str = "gemma-scope-pz",
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    d_transcoder: int | None = None,
) -> dict:
    """The pruned graph as circuit-tracer's frontend JSON (``create_graph_files``' layout).

    ``decode`` turns token ids into text (a tokenizer's ``decode``).
    """
    pruned = prune_graph(graph, node_threshold, edge_threshold)
    keep = np.flatnonzero(pruned.node_mask)
    nodes = {int(i): _frontend_node(graph, int(i), pruned.cumulative_scores, decode, d_transcoder)
             for i in keep}  # fmt: skip
    dsts, srcs = np.nonzero(pruned.edge_mask)
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[t]["node_id"],
         "weight": float(graph.adjacency_matrix[t, s])}
        for t, s in zip(dsts.tolist(), srcs.tolist(), strict=True)
        if s in nodes and t in nodes
    ]  # fmt: skip
    linked = {x for link in links for x in (link["source"], link["target"])}
    used = [n for n in nodes.values()
            if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]  # fmt: skip
    metadata = {
        "slug": slug,
        "scan": scan,
        "transcoder_list": [],
        "prompt_tokens": [_process_token(decode([int(t)])) for t in graph.input_tokens],
        "prompt": graph.input_string,
        "node_threshold": node_threshold,
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def save_graph_json(graph: Graph, folder: str | Path, slug: str, **kwargs) -> Path:
    """Writes ``folder/<slug>.json`` and updates ``folder/graph-metadata.json`` (the viewer's)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = to_frontend_json(graph, slug, **kwargs)
    path = folder / f"{slug}.json"
    write_atomically(path, json.dumps(data, indent=2).encode())
    index_path = folder / "graph-metadata.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"graphs": []}
    index["graphs"] = [g for g in index.get("graphs", []) if g.get("slug") != slug]
    index["graphs"].append(data["metadata"])
    write_atomically(index_path, json.dumps(index, indent=2).encode())
    return path


def load_graph_json(path: str | Path) -> dict:
    """Reads a frontend graph JSON, checking its top-level keys and node/link fields."""
    path = Path(path)
    data = json.loads(path.read_text())
    for key in ("metadata", "qParams", "nodes", "links"):
        if key not in data:
            raise ValueError(f"{path}: not a circuit-tracer graph JSON, missing key {key!r}")
    ids = {n["node_id"] for n in data["nodes"]}
    for link in data["links"]:
        if link["source"] not in ids or link["target"] not in ids:
            raise ValueError(f"{path}: link {link} names a node not in 'nodes'")
    return data
