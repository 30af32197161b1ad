"""The tour's steps (app/steps.py) on a tiny random Gemma 3 and a random SAE (fast): typed results, the report.

The whole tour on the real model runs in tests/test_cli.py (slow).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import gemma_scope_pz as gs
from gemma_scope_pz.app import steps, tour

LAYER = 2


@pytest.fixture(scope="module")
def parts(tiny_model, make_sae, char_tokenizer):
    d = tiny_model.config.d_model
    sae = make_sae(d, 48, site_in=f"blocks.{LAYER}.resid_post", seed=3)
    settings = tour.TourSettings.quick_settings(card_contexts=4, eval_contexts=2)
    return tiny_model, char_tokenizer, sae, settings


def test_features_step_finds_the_strongest_non_dense_feature(parts):
    model, tok, sae, settings = parts
    logged = []
    feats = steps.features_step(model, tok, sae, settings.card_contexts, log=logged.append)
    ids = tok.encode(steps.ENERGY)
    assert feats.latents.shape == (len(ids), sae.meta.d_sae)
    assert feats.strings == tok.token_strings(ids)
    # The examples saw every counted token of the held-out contexts (BOS and padding excluded).
    contexts = gs.corpus_contexts(tok, None, settings.card_contexts, from_end=True)
    assert int(feats.examples.n_tokens) == int(gs.token_mask(contexts, pad_id=tok.pad_id).sum())
    # "specific" is the sentence mean (over tokens after BOS) with dense latents zeroed.
    dense = np.asarray(feats.stats.dense)
    mean = feats.latents[1:].mean(0)
    np.testing.assert_allclose(feats.specific, np.where(dense, 0.0, mean), rtol=1e-5, atol=1e-6)
    # The strongest non-dense feature; when every firing latent is dense, the strongest overall.
    expected = feats.specific if feats.specific.max() > 0 else mean
    assert feats.strongest == int(np.argmax(expected))
    assert f"#{feats.strongest}" in logged[-1]


def test_lens_and_steer_step_zero_coefficient_changes_nothing(parts):
    model, tok, sae, _ = parts
    out = steps.lens_and_steer_step(model, tok, sae, feature=5, coeff=0.0, log=lambda _: None)
    assert out["steering"]["plain"] == out["steering"]["steered"]
    assert len(out["logit_lens"]["top"]) == 10 and len(out["logit_lens"]["bottom"]) == 10
    top = [v for _, v in out["logit_lens"]["top"]]
    assert top == sorted(top, reverse=True)


def test_metrics_step_reports_both_dictionaries(parts, make_sae):
    model, tok, sae, settings = parts
    d = model.config.d_model
    transcoder = make_sae(d, 32, skip=True, site_in="blocks.1.mlp_in", site_out="blocks.1.mlp_out")
    logged = []
    metrics = steps.metrics_step(
        model, tok, sae, transcoder, settings.eval_contexts, log=logged.append
    )
    assert set(metrics) == {"sae_metrics", "transcoder_metrics"}
    for value in metrics.values():
        assert value["n_tokens"] > 0 and np.isfinite(value["fvu"])
    assert logged[0].startswith(f"SAE blocks.{LAYER}.resid_post: FVU ")
    assert "blocks.1.mlp_in → blocks.1.mlp_out" in logged[1]


def test_report_step_writes_escaped_pages(parts, tmp_path):
    model, tok, sae, settings = parts
    feats = steps.features_step(model, tok, sae, settings.card_contexts, log=lambda _: None)
    summary = {
        "dictionaries": "random <SAE>",
        "next_tokens": [("<b>", 0.5)],
        "greedy": " & more",
        "sae_metrics": {},
        "transcoder_metrics": {},
        "strongest_feature": feats.strongest,
    }
    summary.update(steps.lens_and_steer_step(model, tok, sae, feats.strongest, 0.1, lambda _: None))
    metric_keys = ("fvu", "l0", "ce_clean", "ce_spliced", "delta_loss", "ce_recovered", "kl")
    for key in ("sae_metrics", "transcoder_metrics"):
        summary[key] = {k: 0.5 for k in metric_keys} | {"n_tokens": 3, "dead_fraction": 0.1}
    report = steps.report_step(model, tok, sae, feats, summary, tmp_path)
    html = report.read_text()
    assert "random &lt;SAE&gt;" in html and "<code>&lt;b&gt;</code>" in html
    assert "The capital of France is &amp; more" in html
    assert f"Feature #{feats.strongest} on the sentence" in html
    assert f"Feature #{feats.strongest} along the sentence</title>" in html  # the SVG bar chart
    assert "Per-token loss: clean vs spliced</title>" in html  # on the same sentence
    losses = summary["token_losses"]
    assert len(losses["tokens"]) == len(losses["clean"]) == len(losses["spliced"]) > 5
    assert f'data-value="{losses["spliced"][-1]:.6g}"' in html
    assert (tmp_path / "feature_cards.html").stat().st_size > 1000
    json.dumps(summary, default=str)  # the summary stays JSON-able


def test_settings_quick_overrides():
    s = tour.TourSettings.quick_settings(layer=3)
    assert s.quick and s.layer == 3 and s.train_steps == 120
    assert tour.TourSettings().train_steps == 1500


def test_circuit_step_traces_and_renders(parts, make_sae, tmp_path):
    from gemma_scope_pz.circuits import intervene
    from gemma_scope_pz.circuits.graph import prune_graph

    model, tok, _, _ = parts
    d = model.config.d_model
    transcoder = make_sae(d, 32, skip=True, site_in="blocks.1.mlp_in", site_out="blocks.1.mlp_out")
    logged = []
    step = steps.circuit_step(model, tok, transcoder, tmp_path, log=logged.append)
    out, graph = step.summary["circuit"], step.graph
    ids = np.asarray(tok.encode(steps.CAPITAL))
    np.testing.assert_array_equal(graph.input_tokens, ids)
    assert len(graph.logit_tokens) <= 3
    assert out["feature_nodes"] == graph.n_features <= 16
    assert out["path"][0].startswith(("token", "error")) and out["path"][-1].startswith("logit")
    layer, pos, latent = out["ablated"]
    i = int(np.flatnonzero((graph.active_features == out["ablated"]).all(axis=1))[0])
    top = graph.node_slices()["logits"].start
    edges = np.abs(graph.adjacency_matrix[top, : graph.n_features])
    assert layer == 1 and edges[list(graph.selected_features).index(i)] == edges.max()
    new, old = intervene(model, {1: transcoder}, ids, {(layer, pos, latent): 0.0})
    token = int(graph.logit_tokens[0])
    for key, logits in (("log_p_before", old), ("log_p_after", new)):
        x = np.asarray(logits, np.float64)[-1]
        expected = x[token] - x.max() - np.log(np.exp(x - x.max()).sum())
        assert out[key] == pytest.approx(expected, abs=1e-5)
    page = (tmp_path / out["html"]).read_text()
    assert page.count('class="gv-node ') == int(prune_graph(graph).node_mask.sum())
    assert "strongest path" in logged[0] and "ablating feature 1/" in logged[1]
    json.dumps(step.summary)
    from gemma_scope_pz.app.report import _circuit

    section = _circuit({**out, "path": ["<b>x</b>", *out["path"][1:]]})
    assert "<code>&lt;b&gt;x&lt;/b&gt;</code> → " in section and f"href='{out['html']}'" in section
