"""A self-contained HTML view of an attribution graph (inline SVG, CSS and JavaScript, no network).

The pruned graph (`graph.prune_graph`) is drawn with one column per prompt position and one row
per layer: token nodes at the bottom, then features (circles) and error nodes (squares) of
layers 0, 1, ..., the logit nodes at the top. Each kept edge is a line whose width grows with
``|weight|`` (orange positive, blue negative). Hovering a node shows what it is (for a feature:
its activation, its top logits by the logit lens and its strongest max-activating contexts) and
lights its edges; clicking a feature opens its feature card (`analysis.cards.FeatureReport`) in
the side panel, embedded in the same file. ``#node=N`` in the URL selects node ``N`` on load.

`feature_reports` builds the cards' data (logit lens of each feature's decoder, summed over the
layers it writes to; contexts from ``MaxActivatingExamples`` per layer, when given);
`graph_html` returns the page and `save_graph_html` writes it atomically; `render_graph` does
all three in one call (what ``gemma-scope-pz attribute --html`` and the notebook use). Every text (prompt and
token strings included) is escaped through `gemma_scope_pz.analysis.html`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma_scope_pz.analysis.cards import CSS as CARD_CSS
from gemma_scope_pz.analysis.cards import FeatureReport
from gemma_scope_pz.analysis.html import NEGATIVE_RGB, POSITIVE_RGB, escape, escape_token
from gemma_scope_pz.analysis.stats import FeatureStats
from gemma_scope_pz.circuits.graph import Graph, graph_scores, prune_graph
from gemma_scope_pz.circuits.transcoders import as_transcoder_stack
from gemma_scope_pz.io import write_atomically
from gemma_scope_pz.scope.lens import direction_logits

__all__ = ["feature_reports", "graph_html", "render_graph", "save_graph_html", "shown_features"]

TokenStrings = Callable[[Sequence[int]], list[str]]
Reports = Mapping[tuple[int, int], FeatureReport]

_ROW, _PAD, _LEFT = 46, 30, 64

CSS = """
.gv-wrap{display:flex;gap:16px;align-items:flex-start}.gv-graph{flex:3 1 700px;overflow:auto;background:#fff;border:1px solid #d0d7de;border-radius:8px}
.gv-panel{flex:2 1 380px;min-width:320px;max-height:92vh;overflow:auto}.gv-info{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px 14px;margin-bottom:12px;font-size:13px}
.gv-edge{fill:none;opacity:.35}.gv-edge.gv-hot{opacity:.95}.gv-node{cursor:pointer}.gv-node text{font:11px ui-monospace,monospace;fill:#1f2328}
.gv-feature circle{fill:#8250df;stroke:#fff}.gv-error rect{fill:#8c959f}.gv-token rect,.gv-logit rect{fill:#f6f8fa;stroke:#57606a}
.gv-selected circle,.gv-selected rect{stroke:#cf222e;stroke-width:3}.gv-label{font:11px ui-monospace,monospace;fill:#57606a}
#gv-tip{position:absolute;display:none;max-width:460px;background:#fff;border:1px solid #57606a;border-radius:6px;padding:6px 10px;font-size:12px;box-shadow:0 2px 8px rgba(0,0,0,.2);pointer-events:none;z-index:9}
.gv-ctx{font:12px/1.6 ui-monospace,monospace;white-space:pre-wrap;border-top:1px solid #eaeef2}.gv-peak{font-weight:700;outline:1px solid #bc4c00}
.gv-prompt{font:14px ui-monospace,monospace;white-space:pre-wrap;background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:6px 10px}
"""

_JS = """
(function(){var tip=document.getElementById('gv-tip'),info=document.getElementById('gv-info');
function edges(n,on){var i=n.dataset.node;document.querySelectorAll('.gv-edge[data-s="'+i+'"],.gv-edge[data-t="'+i+'"]')
.forEach(function(e){e.classList.toggle('gv-hot',on);});}
function tipOf(n){return document.getElementById('tip-'+n.dataset.node).innerHTML;}
function select(i){var n=document.querySelector('.gv-node[data-node="'+i+'"]');if(!n)return;
document.querySelectorAll('.gv-selected').forEach(function(x){x.classList.remove('gv-selected');});
n.classList.add('gv-selected');info.innerHTML=tipOf(n);
document.querySelectorAll('.gv-card').forEach(function(c){c.hidden=c.id!==n.dataset.card;});
document.body.setAttribute('data-selected',i);}
document.querySelectorAll('.gv-node').forEach(function(n){
n.addEventListener('mouseenter',function(){tip.innerHTML=tipOf(n);tip.style.display='block';edges(n,true);});
n.addEventListener('mousemove',function(e){tip.style.left=(e.pageX+14)+'px';tip.style.top=(e.pageY+14)+'px';});
n.addEventListener('mouseleave',function(){tip.style.display='none';edges(n,false);});
n.addEventListener('click',function(){select(n.dataset.node);});});
var m=/node=(\\d+)/.exec(location.hash);if(m)select(m[1]);
document.body.setAttribute('data-ready','1');})();
"""


def shown_features(
    graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> list[tuple[int, int]]:
    """Distinct ``(layer, latent)`` of the feature nodes that survive pruning, in node order."""
    mask = prune_graph(graph, node_threshold, edge_threshold).node_mask[: graph.n_features]
    found: dict[tuple[int, int], None] = {}
    for i in np.flatnonzero(mask):
        layer, _, latent = graph.active_features[graph.selected_features[i]]
        found[(int(layer), int(latent))] = None
    return list(found)


def _lens(model, stack, features: Sequence[tuple[int, int]], k: int, chunk: int = 128) -> list:
    """(top-k, bottom-k) (token id, logit) of each feature's decoder summed over its targets."""
    source = {layer: s for s, layer in enumerate(stack.layers)}
    out = []
    for start in range(0, len(features), chunk):
        part = features[start : start + chunk]
        dirs = jnp.stack([stack.w_dec[source[layer]][latent].sum(0) for layer, latent in part])
        logits = direction_logits(model, dirs)
        top_v, top_i = jax.lax.top_k(logits, k)
        bot_v, bot_i = jax.lax.top_k(-logits, k)
        for ti, tv, bi, bv in zip(top_i.tolist(), top_v.tolist(), bot_i.tolist(), bot_v.tolist()):
            out.append((list(zip(ti, tv)), list(zip(bi, (-v for v in bv)))))
    return out


def feature_reports(
    graph: Graph,
    model,
    transcoders: Any,
    token_strings: TokenStrings,
    *,
    features: Iterable[tuple[int, int]] | None = None,
    examples: Mapping[int, Any] | None = None,
    n_examples: int = 5,
    k: int = 8,
) -> dict[tuple[int, int], FeatureReport]:
    """Feature-card data for the graph's features, keyed by ``(layer, latent)``.

    Args:
      graph: The graph (its features default to `shown_features`).
      model: The `Gemma3LM` the graph was traced on (for the logit lens).
      transcoders: The transcoders it was traced with (as for `attribute`).
      token_strings: Token ids to one display string per token (``tokenizer.token_strings``).
      features: ``(layer, latent)`` pairs to describe (default: the pruned graph's features).
      examples: Optional ``{layer: MaxActivatingExamples}`` of each layer's transcoder.
      n_examples: Contexts kept per card.
      k: Logit-lens tokens per feature.
    """
    stack = as_transcoder_stack(transcoders, model.config.n_layers)
    chosen = list(shown_features(graph) if features is None else features)
    for layer, latent in chosen:
        if (
            layer not in stack.layers
            or not 0 <= latent < stack.w_dec[stack.layers.index(layer)].shape[0]
        ):
            raise ValueError(f"feature_reports: no transcoder latent {latent} at layer {layer}")
    lens = _lens(model, stack, chosen, k) if chosen else []
    examples = examples or {}
    stats = {layer: FeatureStats.from_examples(state) for layer, state in examples.items()}
    reports = {}
    for (layer, latent), (top, bottom) in zip(chosen, lens, strict=True):
        strings = token_strings([i for i, _ in top + bottom])
        pairs = list(zip(strings, (v for _, v in top + bottom), strict=True))
        logit_lens = {latent: (pairs[: len(top)], pairs[len(top) :])}
        reports[(layer, latent)] = FeatureReport.build(
            latent, examples.get(layer, ()), stats.get(layer), token_strings, logit_lens, n_examples
        )
    return reports


def _node_kinds(graph: Graph, keep: np.ndarray) -> list[tuple[int, str, int, int, int]]:
    """(node, kind, row, position, latent or token) of each kept node; row 0 = tokens."""
    sl = graph.node_slices()
    out = []
    for i in keep.tolist():
        if i < sl["features"].stop:
            layer, pos, latent = graph.active_features[graph.selected_features[i]]
            out.append((i, "feature", int(layer) + 1, int(pos), int(latent)))
        elif i < sl["errors"].stop:
            layer, pos = divmod(i - sl["errors"].start, graph.n_pos)
            out.append((i, "error", layer + 1, pos, -1))
        elif i < sl["tokens"].stop:
            pos = i - sl["tokens"].start
            out.append((i, "token", 0, pos, int(graph.input_tokens[pos])))
        else:
            k = i - sl["logits"].start
            out.append(
                (i, "logit", graph.n_layers + 1, graph.n_pos - 1, int(graph.logit_tokens[k]))
            )
    return out


def _layout(nodes, n_pos: int, n_rows: int) -> tuple[dict[int, tuple[float, float]], int, int]:
    """Node centres: column per position, row per layer, a cell's nodes spread across it.

    Logit nodes (labelled boxes) sit side by side from the last column on, most likely first.
    """
    cells: dict[tuple[int, int], list[int]] = {}
    for i, kind, row, pos, _ in nodes:
        if kind != "logit":
            cells.setdefault((row, pos), []).append(i)
    col = int(min(360, max(90, 14 * max((len(v) for v in cells.values()), default=1))))
    xy = {}
    for (row, pos), members in cells.items():
        for j, i in enumerate(members):
            x = _LEFT + pos * col + (j + 0.5) * col / len(members)
            xy[i] = (x, _PAD + (n_rows - 1 - row) * _ROW + _ROW / 2)
    logits = [i for i, kind, *_ in nodes if kind == "logit"]
    for j, i in enumerate(logits):
        xy[i] = (_LEFT + (n_pos - 1) * col + col / 2 + 80 * j, _PAD + _ROW / 2)
    width = max(_LEFT + n_pos * col, _LEFT + (n_pos - 1) * col + col / 2 + 80 * len(logits))
    return xy, int(width) + _PAD, 2 * _PAD + n_rows * _ROW


def _tip(graph, node, strings, scores, report: FeatureReport | None) -> str:
    """The hover text of one node (escaped HTML)."""
    i, kind, row, pos, ident = node
    at = f"at {escape_token(strings[pos])} (position {pos})"
    if kind == "token":
        return f"<b>token</b> {escape_token(strings[pos])} · position {pos} · id {ident}"
    if kind == "error":
        return f"<b>MLP error</b> layer {row - 1} {at}"
    if kind == "logit":
        k = i - graph.node_slices()["logits"].start
        p = float(graph.logit_probabilities[k])
        return f"<b>logit</b> {escape_token(_one(strings, ident, graph))} · p = {p:.3f}"
    feat = graph.selected_features[i]
    parts = [
        f"<b>feature L{row - 1}/{ident}</b> {at}",
        f"<br>activation {float(graph.activation_values[feat]):.3f} · "
        f"cumulative influence {float(scores[i]):.3f}",
    ]
    if report is not None and report.logit_top:
        top = ", ".join(f"{escape_token(s)} {v:+.2f}" for s, v in report.logit_top[:6])
        parts.append(f"<br><b>top logits</b> {top}")
    for ex, toks in list(zip(report.examples, report.example_strings))[:2] if report else []:
        spans = "".join(
            f'<span class="gv-peak">{escape_token(t)}</span>' if j == ex.peak_index
            else escape_token(t)
            for j, t in enumerate(toks)
        )  # fmt: skip
        parts.append(f'<div class="gv-ctx">{ex.value:.2f} │ {spans}</div>')
    return "".join(parts)


def _one(strings, token_id: int, graph: Graph) -> str:
    return strings[graph.n_pos + list(graph.logit_tokens).index(token_id)]


def _svg(graph, nodes, edges, xy, size, strings) -> str:
    """The graph drawing: edges under nodes, row labels on the left."""
    width, height = size
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'data-nodes="{len(nodes)}" data-edges="{len(edges)}">'
    ]
    labels = ["tokens", *(f"L{r}" for r in range(graph.n_layers)), "logits"]
    for row, label in enumerate(labels):
        y = _PAD + (len(labels) - 1 - row) * _ROW + _ROW / 2
        parts.append(f'<text class="gv-label" x="6" y="{y + 4:.1f}">{label}</text>')
    scale = max((abs(w) for _, _, w in edges), default=1.0) or 1.0
    for t, s, w in edges:
        (x1, y1), (x2, y2) = xy[s], xy[t]
        rgb = POSITIVE_RGB if w >= 0 else NEGATIVE_RGB
        parts.append(
            f'<path class="gv-edge" data-s="{s}" data-t="{t}" data-weight="{w:.6g}" '
            f'd="M{x1:.1f},{y1:.1f} L{x2:.1f},{y2:.1f}" stroke="rgb({rgb})" '
            f'stroke-width="{0.4 + 5.6 * abs(w) / scale:.2f}"/>'
        )
    for i, kind, row, pos, ident in nodes:
        x, y = xy[i]
        card = f' data-card="card-{row - 1}-{ident}"' if kind == "feature" else ""
        parts.append(f'<g class="gv-node gv-{kind}" data-node="{i}"{card}>')
        if kind == "feature":
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6"/>')
        elif kind == "error":
            parts.append(f'<rect x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10"/>')
        else:
            text = strings[pos] if kind == "token" else _one(strings, ident, graph)
            label = escape_token(text[:10] + ("…" if len(text) > 10 else ""))
            parts.append(
                f'<rect x="{x - 36:.1f}" y="{y - 10:.1f}" width="72" height="20" rx="4"/>'
                f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle">{label}</text>'
            )
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def graph_html(
    graph: Graph,
    token_strings: TokenStrings,
    *,
    reports: Reports | None = None,
    title: str = "Attribution graph",
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_edges: int | None = 4000,
) -> str:
    """The pruned graph as one self-contained HTML page (see the module docstring).

    Args:
      graph: The attribution graph.
      token_strings: Token ids to one display string per token (``tokenizer.token_strings``).
      reports: Optional ``{(layer, latent): FeatureReport}`` (`feature_reports`): hover text and
        clickable cards for those features.
      title: Page title (escaped).
      node_threshold, edge_threshold: Pruning thresholds (`graph.prune_graph`).
      max_edges: Draw at most this many kept edges (the strongest by ``|weight|``); None = all.
    """
    reports = reports or {}
    pruned = prune_graph(graph, node_threshold, edge_threshold)
    keep = np.flatnonzero(pruned.node_mask)
    nodes = _node_kinds(graph, keep)
    dst, src = np.nonzero(pruned.edge_mask)
    weights = graph.adjacency_matrix[dst, src].astype(np.float64)
    order = np.argsort(-np.abs(weights), kind="stable")[:max_edges]
    edges = [(int(dst[j]), int(src[j]), float(weights[j])) for j in order]
    strings = [str(s) for s in token_strings([int(t) for t in graph.input_tokens])]
    strings += [str(s) for s in token_strings([int(t) for t in graph.logit_tokens])]
    xy, width, height = _layout(nodes, graph.n_pos, graph.n_layers + 2)
    tips, cards = [], []
    for node in nodes:
        report = reports.get((node[2] - 1, node[4])) if node[1] == "feature" else None
        tip = _tip(graph, node, strings, pruned.cumulative_scores, report)
        tips.append(f'<div id="tip-{node[0]}" hidden>{tip}</div>')
    for (layer, latent), report in reports.items():
        cards.append(
            f'<div class="gv-card" id="card-{layer}-{latent}" hidden><h3>layer {layer}</h3>'
            f"{report.to_html()}</div>"
        )
    replacement, completeness = graph_scores(graph)
    prompt = "".join(escape_token(s, line_breaks=True) for s in strings[: graph.n_pos])
    summary = (
        f"{len(nodes)} nodes and {len(edges)} edges shown ({graph.n_features} feature nodes, "
        f"{len(graph.active_features)} active features) · replacement score {replacement:.3f} · "
        f"completeness score {completeness:.3f}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CARD_CSS}{CSS}</style></head><body>"
        f'<h1>{escape(title)}</h1><div class="gv-prompt">{prompt}</div><p class="summary">{summary}'
        " · hover a node for its details, click a feature for its card</p>"
        f'<div class="gv-wrap"><div class="gv-graph">{_svg(graph, nodes, edges, xy, (width, height), strings)}'
        f'</div><div class="gv-panel"><div class="gv-info" id="gv-info">click a node</div>'
        f'{"".join(cards)}</div></div><div id="gv-tip"></div><div hidden>{"".join(tips)}</div>'
        f"<script>{_JS}</script></body></html>\n"
    )


def save_graph_html(
    graph: Graph, path: str | os.PathLike, token_strings: TokenStrings, **kwargs
) -> Path:
    """Writes `graph_html` (same keyword arguments) to ``path`` atomically; returns the path."""
    return write_atomically(Path(path), graph_html(graph, token_strings, **kwargs))


def render_graph(
    graph: Graph,
    path: str | os.PathLike,
    model,
    transcoders: Any,
    tokenizer,
    *,
    examples: Mapping[int, Any] | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    title: str | None = None,
) -> Path:
    """Writes the HTML view of ``graph`` with a card for every shown feature; returns the path.

    Args:
      graph: The graph, traced on ``model`` with ``transcoders``.
      path: Output ``.html`` file (written atomically).
      model: The `Gemma3LM` (logit lens of the features).
      transcoders: As for `attribute`.
      tokenizer: Anything with ``token_strings(ids)``.
      examples: Optional ``{layer: MaxActivatingExamples}`` for the cards' contexts.
      node_threshold, edge_threshold: Pruning thresholds.
      title: Page title (default: the prompt).
    """
    thresholds = {"node_threshold": node_threshold, "edge_threshold": edge_threshold}
    reports = feature_reports(
        graph, model, transcoders, tokenizer.token_strings, examples=examples,
        features=shown_features(graph, **thresholds),
    )  # fmt: skip
    title = title or f"Attribution graph: {graph.input_string}"
    return save_graph_html(
        graph, path, tokenizer.token_strings, reports=reports, title=title, **thresholds
    )
