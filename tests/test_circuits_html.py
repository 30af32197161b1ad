"""The HTML view of an attribution graph, rendered by headless Chromium.

A random graph of the documented node order over a tiny random Gemma 3 with random transcoders
on layers 0, 1 and 3 (for the logit lens and the contexts); token strings are hostile HTML. Checks: the page renders, it draws exactly the pruned graph's
nodes and edges (with the right weights), every node has hover text and every feature a card,
the ``#node=`` selection (the click handler) opens the card, and no token text becomes markup.
Skipped when no Chromium is installed, except under CI (as tests/test_analysis_render.py).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from gemma_scope_pz.analysis.examples import MaxActivatingExamples
from gemma_scope_pz.circuits.graph import (
    Graph,
    node_label,
    normalize_matrix,
    prune_graph,
    strongest_path,
)
from gemma_scope_pz.circuits.html import (
    feature_reports,
    graph_html,
    save_graph_html,
    shown_features,
)
from gemma_scope_pz.scope.evaluate import latent_encoder
from gemma_scope_pz.scope.lens import direction_logits

_spec = importlib.util.spec_from_file_location(
    "render_html", Path(__file__).with_name("render_html.py")
)
render_html = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_html)

TOKENS = np.array([2, 5, 9, 13, 7, 22, 31, 4])


def token_strings(ids) -> list[str]:
    """Every token is hostile markup that names its id."""
    return [f"<script>t{int(i)}</script>" if int(i) % 2 else f"<b>&amp;{int(i)}" for i in ids]


def _graph(n_layers: int, layers, d_sae: int, rng) -> Graph:
    """A random graph of the documented layout: each edge goes from a lower row to a higher one."""
    seq = len(TOKENS)
    feats = np.array([(layer, pos, latent) for layer in layers for pos in range(1, seq)
                      for latent in rng.choice(d_sae, 3, replace=False)])  # fmt: skip
    n_f, n_e, n_logit = len(feats), n_layers * seq, 3
    rows = np.concatenate([feats[:, 0] + 1, np.repeat(np.arange(n_layers) + 1, seq),
                           np.zeros(seq, int), np.full(n_logit, n_layers + 1)])  # fmt: skip
    pos = np.concatenate([feats[:, 1], np.tile(np.arange(seq), n_layers), np.arange(seq),
                          np.full(n_logit, seq - 1)])  # fmt: skip
    n = n_f + n_e + seq + n_logit
    allowed = (rows[:, None] > rows[None, :]) & (pos[:, None] >= pos[None, :])
    allowed[n_f : n_f + n_e + seq] = False  # error and token rows are zero
    adjacency = np.where(allowed & (rng.random((n, n)) < 0.4), rng.normal(size=(n, n)), 0.0)
    return Graph(
        input_string="", input_tokens=TOKENS, active_features=feats,
        activation_values=rng.uniform(0.5, 3.0, n_f).astype(np.float32),
        selected_features=np.arange(n_f), adjacency_matrix=adjacency.astype(np.float32),
        logit_tokens=np.array([11, 12, 13]), logit_probabilities=np.array([0.5, 0.3, 0.15]),
        n_layers=n_layers,
    )  # fmt: skip


@pytest.fixture(scope="module")
def traced(make_tiny_model, make_sae):
    model = make_tiny_model(seed=3)
    d = model.config.d_model
    transcoders = {
        layer: make_sae(d, 24, skip=layer == 1, seed=layer, site_in=f"blocks.{layer}.mlp_in")
        for layer in (0, 1, 3)
    }
    graph = _graph(model.config.n_layers, transcoders, 24, np.random.default_rng(0))
    contexts = np.random.default_rng(1).integers(3, 64, size=(4, 12))
    contexts[:, 0] = 2
    latents = latent_encoder(model, transcoders[0])(contexts)  # contexts for layer 0 only
    examples = {
        0: MaxActivatingExamples.create(24, k=3, window=3).update(contexts, latents, contexts != 2)
    }
    reports = feature_reports(graph, model, transcoders, token_strings, examples=examples)
    return model, transcoders, graph, reports


def test_feature_reports_logit_lens(traced):
    model, transcoders, graph, reports = traced
    kept = prune_graph(graph).node_mask[: graph.n_features]
    expected = {(int(layer), int(latent)) for layer, _, latent in graph.active_features[kept]}
    assert reports and set(reports) == expected == set(shown_features(graph))
    for (layer, latent), report in reports.items():
        direction = np.asarray(transcoders[layer].to_arrays()["w_dec"])[latent]
        logits = np.asarray(direction_logits(model, direction[None]))[0]
        top = np.argsort(-logits)[:8]
        assert [s for s, _ in report.logit_top] == token_strings(top)
        np.testing.assert_allclose([v for _, v in report.logit_top], logits[top], rtol=1e-5)
        bottom = np.argsort(logits)[:8]
        assert [s for s, _ in report.logit_bottom] == token_strings(bottom)
        np.testing.assert_allclose([v for _, v in report.logit_bottom], logits[bottom], rtol=1e-5)
        assert report.feature == latent and (len(report.examples) > 0) == (layer == 0)


def test_bad_feature_is_named(traced):
    model, transcoders, graph, _ = traced
    with pytest.raises(ValueError, match="latent 3 at layer 2"):
        feature_reports(graph, model, transcoders, token_strings, features=[(2, 3)])


def test_page_escapes_every_token(traced):
    _, _, graph, reports = traced
    page = graph_html(graph, token_strings, reports=reports, title="<i>graph</i>")
    assert page.count("<script>") == 1  # ours; token text only as &lt;script&gt;
    assert "<b>&amp;" not in page and "&lt;b&gt;&amp;amp;" in page
    assert "<i>graph" not in page and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )


@pytest.fixture(scope="module")
def rendered(traced, tmp_path_factory):
    if render_html.chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium not found under CI: run .ci/install_chromium.sh first")
        pytest.skip("Chromium not installed (run .ci/install_chromium.sh)")
    _, _, graph, reports = traced
    path = save_graph_html(graph, tmp_path_factory.mktemp("view") / "graph.html", token_strings,
                           reports=reports)  # fmt: skip
    return path, graph, reports


def test_dom_draws_the_pruned_graph(rendered):
    path, graph, reports = rendered
    dom = render_html.parse_dom(render_html.dump_dom(path))
    pruned = prune_graph(graph)
    nodes = [a for tag, a in dom.attrs if tag == "g" and "gv-node" in a.get("class", "")]
    assert sorted(int(a["data-node"]) for a in nodes) == np.flatnonzero(pruned.node_mask).tolist()
    edges = {(int(a["data-t"]), int(a["data-s"])): float(a["data-weight"])
             for tag, a in dom.attrs if tag == "path"}  # fmt: skip
    assert set(edges) == set(zip(*np.nonzero(pruned.edge_mask), strict=True))
    for (t, s), w in edges.items():
        assert w == pytest.approx(float(graph.adjacency_matrix[t, s]), rel=1e-5)
    tips = {a["id"] for _, a in dom.attrs if a.get("id", "").startswith("tip-")}
    assert tips == {f"tip-{a['data-node']}" for a in nodes}  # hover text for every node
    cards = {a["id"] for _, a in dom.attrs if "gv-card" in (a.get("class") or "")}
    feature_nodes = [a for a in nodes if "gv-feature" in a["class"]]
    assert feature_nodes and {a["data-card"] for a in feature_nodes} <= cards
    assert cards == {f"card-{layer}-{latent}" for layer, latent in reports}
    assert dom.tags.get("script") == 1 and "b" not in dom.tags or dom.tags["b"] > 0
    assert not any("data-pwned" in a for _, a in dom.attrs)
    text = "".join(dom.text)
    for s in token_strings(graph.input_tokens[1:]):
        assert s in text  # the prompt, shown as text
    body = next(a for tag, a in dom.attrs if tag == "body")
    assert body.get("data-ready") == "1"  # the script ran


def test_selecting_a_feature_opens_its_card(rendered):
    path, graph, _ = rendered
    node = int(np.flatnonzero(prune_graph(graph).node_mask[: graph.n_features])[0])
    layer, _, latent = graph.active_features[graph.selected_features[node]]
    url = path.resolve().as_uri() + f"#node={node}"  # the click handler's select(), on load
    selected = render_html.parse_dom(render_html._run(["--dump-dom", url], 120).stdout)
    body = next(a for tag, a in selected.attrs if tag == "body")
    assert body["data-selected"] == str(node)
    shown = [a["id"] for _, a in selected.attrs
             if "gv-card" in (a.get("class") or "") and "hidden" not in a]  # fmt: skip
    assert shown == [f"card-{layer}-{latent}"]
    assert f"feature L{layer}/{latent}" in "".join(selected.text)


def test_strongest_path_is_the_best_product():
    graph = _graph(2, (0, 1), 24, np.random.default_rng(5))
    weights = normalize_matrix(graph.adjacency_matrix)
    target = graph.node_slices()["logits"].start

    @functools.cache
    def best(node):  # brute force: the best product of weights from any input-free node to node
        sources = np.flatnonzero(weights[node]).tolist()
        if not sources:
            return 1.0, [node]
        return max((best(s)[0] * weights[node, s], [*best(s)[1], node]) for s in sources)

    value, path = best(target)
    assert strongest_path(graph) == path
    assert np.prod([weights[t, s] for s, t in zip(path, path[1:])]) == pytest.approx(value)
    labels = [node_label(graph, i, token_strings) for i in path]
    assert (
        labels[0].startswith(("token", "error"))
        and labels[-1] == "logit '<script>t11</script>' (p=0.500)"
    )
