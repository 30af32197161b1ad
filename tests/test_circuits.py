"""Attribution graphs on a tiny random Gemma 3 with random transcoders and a random CLT.

Checks: the replacement model reproduces the logits; every node's incoming edges plus its bias
equal its (pre-)activation under the frozen model (completeness); edges equal ``jax.jvp``
directional derivatives; pruning and scores follow circuit-tracer's formulas; files round-trip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_scope_pz.circuits import attribution, influence
from gemma_scope_pz.circuits import replacement as rep
from gemma_scope_pz.circuits.attribution import attribute, prepare_attribution, salient_logits
from gemma_scope_pz.circuits.graph import (
    Graph,
    graph_scores,
    load_graph,
    load_graph_json,
    prune_graph,
    save_graph,
    save_graph_json,
)
from gemma_scope_pz.circuits.interventions import intervene
from gemma_scope_pz.models.gemma3 import forward
from gemma_scope_pz.scope.cross_layer_transcoder import CrossLayerTranscoder
from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta

TOKENS = np.array([2, 5, 9, 13, 7, 22, 31, 4, 17, 40])
D_SAE = 40


def _transcoder(rng, d: int, skip: bool, activation: str = "jumprelu") -> AutoEncoder:
    return AutoEncoder.from_arrays(
        (rng.normal(size=(d, D_SAE)) / np.sqrt(d)).astype(np.float32),
        (0.1 * rng.normal(size=D_SAE)).astype(np.float32),
        (0.1 * rng.normal(size=(D_SAE, d))).astype(np.float32),
        (0.1 * rng.normal(size=d)).astype(np.float32),
        np.full(D_SAE, 0.3, np.float32) if activation == "jumprelu" else None,
        activation=activation,
        w_skip=(0.05 * rng.normal(size=(d, d))).astype(np.float32) if skip else None,
    )


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return make_tiny_model(seed=3)


@pytest.fixture(scope="module")
def per_layer(model):
    """Transcoders on layers 0, 1 (skip, ReLU) and 3; layer 2 has none (error node only)."""
    rng = np.random.default_rng(0)
    d = model.config.d_model
    return {
        0: _transcoder(rng, d, False),
        1: _transcoder(rng, d, True, "relu"),
        3: _transcoder(rng, d, True),
    }


@pytest.fixture(scope="module")
def clt(model):
    rng = np.random.default_rng(1)
    n, d = model.config.n_layers, model.config.d_model

    def arr(*shape, scale=1.0):
        return jnp.asarray((scale * rng.normal(size=shape)).astype(np.float32))

    return CrossLayerTranscoder(
        w_enc=[arr(d, D_SAE, scale=d**-0.5) for _ in range(n)],
        b_enc=[arr(D_SAE, scale=0.1) for _ in range(n)],
        threshold=[jnp.full(D_SAE, 0.3) for _ in range(n)],
        w_dec=[arr(D_SAE, n - i, d, scale=0.1) for i in range(n)],
        b_dec=[arr(d, scale=0.1) for _ in range(n)],
        w_skip=[arr(d, d, scale=0.05) for _ in range(n)],
        meta=SaeMeta(d_in=d, d_sae=D_SAE, d_out=d, extra={"n_layers": n}),
    )


@pytest.fixture(scope="module", params=["per_layer", "clt"])
def case(request, model, per_layer, clt):
    transcoders = per_layer if request.param == "per_layer" else clt
    setup = prepare_attribution(model, transcoders, TOKENS)
    graph = attribute(model, transcoders, TOKENS, batch_size=32, desired_logit_prob=0.999)
    return transcoders, setup, graph


def _readouts(model, setup, resid_0, injections):
    """Every layer's MLP input and the final normed residual of the frozen linear model."""
    m_ins, final = rep.linear_forward(
        model, setup.stack, setup.trace, rep._named(resid_0), [rep._named(x) for x in injections]
    )
    return jnp.stack([rep._plain(m) for m in m_ins]), rep._plain(final)


def _target_values(model, setup, graph, m_ins, final):
    """Each row's readout: encoder . mlp_in for features, demeaned logit for logits."""
    feats = setup.active_features()[graph.selected_features]
    enc = [
        np.asarray(setup.stack.w_enc[setup.stack.layers.index(layer)][:, i])
        for layer, _, i in feats
    ]
    values = [float(np.dot(e, m_ins[layer, pos])) for e, (layer, pos, _) in zip(enc, feats)]
    table = np.asarray(model.embedding_table())
    vecs = table[graph.logit_tokens] - table.mean(axis=0)
    values += list(vecs @ np.asarray(final[-1]))
    return np.asarray(values)


@pytest.mark.parametrize("which", ["per_layer", "clt"])
def test_replacement_logits_equal_model(model, per_layer, clt, which):
    transcoders = per_layer if which == "per_layer" else clt
    replaced, logits = rep.replacement_logits(model, transcoders, TOKENS)
    np.testing.assert_allclose(logits, forward(model, TOKENS[None])[0], atol=2e-5)
    np.testing.assert_allclose(replaced, logits, atol=2e-5)
    assert np.abs(logits).max() > 1.0


def test_linear_forward_reproduces_the_prompt(model, case):
    _, setup, _ = case
    m_ins, final = _readouts(model, setup, setup.resid_0, setup.injections)
    want = np.stack([rep._plain(m) for m in setup.trace.mlp_in])
    np.testing.assert_allclose(m_ins, want, atol=2e-5)
    logits = np.asarray(final) @ np.asarray(model.embedding_table()).T
    np.testing.assert_allclose(
        logits, setup.trace.logits.unwrap("batch", "seq", "vocabulary")[0], atol=1e-4
    )


def test_completeness_edges_plus_bias_equal_preactivation(model, case):
    transcoders, setup, graph = case
    sl = graph.node_slices()
    m_ins, final = _readouts(model, setup, setup.resid_0, setup.injections)
    values = _target_values(model, setup, graph, m_ins, final)
    b_m_ins, b_final = _readouts(model, setup, jnp.zeros_like(setup.resid_0), setup.bias_injections)
    bias = _target_values(model, setup, graph, b_m_ins, b_final)
    rows = np.concatenate(
        [graph.adjacency_matrix[sl["features"]], graph.adjacency_matrix[sl["logits"]]]
    )
    np.testing.assert_allclose(rows.sum(axis=1) + bias, values, rtol=1e-4, atol=1e-4)
    # feature readouts plus b_enc are the encoder's pre-activations, positive above threshold
    feats = setup.active_features()[graph.selected_features]
    b_enc = np.array([setup.stack.b_enc[setup.stack.layers.index(lay)][i] for lay, _, i in feats])
    pre = values[: graph.n_features] + b_enc
    np.testing.assert_allclose(
        pre, graph.activation_values[graph.selected_features], rtol=1e-4, atol=1e-5
    )
    # token and error rows have no incoming edges; no feature reads a later layer
    assert not graph.adjacency_matrix[sl["errors"]].any()
    assert not graph.adjacency_matrix[sl["tokens"]].any()


def test_edges_match_jvp_spot_checks(model, case):
    _, setup, graph = case
    rng = np.random.default_rng(7)
    sl = graph.node_slices()
    n_feat, seq = graph.n_features, graph.n_pos
    feats = setup.active_features()

    def readout(resid_0, injections):
        m_ins, final = _readouts(model, setup, resid_0, injections)
        return m_ins, final

    targets = list(rng.choice(n_feat, size=4, replace=False)) + [sl["logits"].start]
    sources = list(rng.choice(n_feat, size=4, replace=False))
    sources += [sl["errors"].start + seq + 3, sl["tokens"].start + 5]
    for s in sources:
        d_resid = jnp.zeros_like(setup.resid_0)
        d_inject = jnp.zeros_like(setup.injections)
        if s < n_feat:
            layer, pos, latent = feats[graph.selected_features[s]]
            src = setup.stack.layers.index(layer)
            a = graph.activation_values[graph.selected_features[s]]
            for t in setup.stack.targets(src):
                d_inject = d_inject.at[t, pos].add(a * setup.stack.w_dec[src][latent, t - layer])
        elif s < sl["tokens"].start:
            layer, pos = divmod(s - n_feat, seq)
            d_inject = d_inject.at[layer, pos].set(setup.errors[layer, pos])
        else:
            pos = s - sl["tokens"].start
            d_resid = d_resid.at[pos].set(setup.resid_0[pos])
        _, (dm, df) = jax.jvp(readout, (setup.resid_0, setup.injections), (d_resid, d_inject))
        values = _target_values(model, setup, graph, np.asarray(dm), np.asarray(df))
        rows = np.concatenate([np.arange(n_feat), np.arange(sl["logits"].start, sl["logits"].stop)])
        for t in targets:
            k = int(np.flatnonzero(rows == t)[0])
            np.testing.assert_allclose(
                graph.adjacency_matrix[t, s], values[k], rtol=1e-4, atol=1e-5
            )


def test_graph_nodes_and_bos(case, model):
    _, setup, graph = case
    assert graph.adjacency_matrix.shape[0] == graph.n_features + (model.config.n_layers + 1) * len(
        TOKENS
    ) + len(graph.logit_tokens)
    feats = graph.active_features
    assert (feats[:, 1] > 0).all()  # zero_bos: no feature node at the BOS position
    assert np.array_equal(feats, feats[np.lexsort((feats[:, 2], feats[:, 1], feats[:, 0]))])
    assert not setup.errors[:, 0].any()


def test_uncovered_layer_error_is_whole_mlp_output(model, per_layer):
    setup = prepare_attribution(model, per_layer, TOKENS, zero_bos=False)
    np.testing.assert_allclose(setup.errors[2], rep._plain(setup.trace.mlp_out[2]), atol=1e-6)
    assert 2 not in setup.stack.layers


def test_feature_cap_keeps_most_influential_rows(model, per_layer):
    full = attribute(model, per_layer, TOKENS, batch_size=16)
    capped = attribute(
        model, per_layer, TOKENS, batch_size=8, max_feature_nodes=12, update_interval=1
    )
    assert capped.n_features == 12
    # the kept rows are the full graph's rows, restricted to the kept columns
    keep = np.concatenate(
        [capped.selected_features, np.arange(full.n_features, full.adjacency_matrix.shape[0])]
    )
    rows = np.concatenate(
        [capped.selected_features, np.arange(full.n_features, full.adjacency_matrix.shape[0])]
    )
    want = full.adjacency_matrix[np.ix_(rows, keep)]
    want[capped.n_features : capped.node_slices()["logits"].start] = 0
    np.testing.assert_allclose(capped.adjacency_matrix, want, rtol=1e-5, atol=1e-6)


def test_feature_edges_in_chunks_match_the_formula(monkeypatch):
    rng = np.random.default_rng(3)
    g = rng.normal(size=(3, 6, 5)).astype(np.float32)
    dec = rng.normal(size=(11, 5)).astype(np.float32)
    pos, lat = rng.integers(0, 6, 10), rng.integers(0, 11, 10)
    val = rng.normal(size=10).astype(np.float32)
    want = np.einsum("bnd,nd->bn", g[:, pos], dec[lat] * val[:, None])
    monkeypatch.setattr(attribution, "_FEATURE_CHUNK", 4)  # 10 features: 3 chunks, 2 padded
    got = attribution._feature_edges(jnp.asarray(g), jnp.asarray(dec), pos, lat, val)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_partial_influence_equals_the_dense_walk(monkeypatch):
    """The chunked walk on ``rows[:, row_nodes]`` gives the dense ``sum_k w norm^k`` influence."""
    rng = np.random.default_rng(4)
    n_feat, width, n_logit = 30, 45, 3
    feature_nodes = np.sort(rng.choice(n_feat, 9, replace=False))
    rows = rng.normal(size=(n_logit + 9, width)).astype(np.float32)
    for r, node in enumerate(feature_nodes):  # acyclic: a feature reads only lower row nodes
        rows[n_logit + r, feature_nodes[feature_nodes >= node]] = 0.0
    row_nodes = np.concatenate([width + np.arange(n_logit), feature_nodes])
    logit_p = np.array([0.5, 0.3, 0.2])
    norm = np.abs(rows.astype(np.float64))
    norm /= norm.sum(axis=1, keepdims=True)
    prod, want = np.concatenate([np.zeros(width), logit_p]), np.zeros(width)
    while prod.any():
        prod = prod[row_nodes] @ norm
        want += prod
        prod = np.concatenate([prod, np.zeros(n_logit)])
    monkeypatch.setattr(influence, "ROW_CHUNK", 5)
    got = influence.partial_influence(rows, row_nodes, logit_p, n_feat)
    np.testing.assert_allclose(got, want[:n_feat], rtol=1e-6)


def test_chunked_feature_contraction_gives_the_same_graph(monkeypatch, model, per_layer):
    full = attribute(model, per_layer, TOKENS, batch_size=16)
    monkeypatch.setattr(attribution, "_FEATURE_CHUNK", 8)  # batch 7: a fresh trace sees it
    chunked = attribute(model, per_layer, TOKENS, batch_size=7)
    assert max(len(p) for p in prepare_attribution(model, per_layer, TOKENS).positions) > 8
    np.testing.assert_array_equal(chunked.selected_features, full.selected_features)
    np.testing.assert_allclose(chunked.adjacency_matrix, full.adjacency_matrix, atol=1e-6)


MESH_CHILD = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import numpy as np
from gemma_scope_pz.circuits.attribution import attribute
from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.gemma3 import Gemma3LM
from gemma_scope_pz.parallel import make_mesh
from gemma_scope_pz.scope.layers import AutoEncoder

model = Gemma3LM.random(Gemma3Config.tiny(n_layers=2), seed=0)
rng, d, n = np.random.default_rng(0), model.config.d_model, 24
tc = AutoEncoder.from_arrays(
    (rng.normal(size=(d, n)) / np.sqrt(d)).astype(np.float32), np.zeros(n, np.float32),
    (0.1 * rng.normal(size=(n, d))).astype(np.float32), np.zeros(d, np.float32),
    np.full(n, 0.3, np.float32))
tokens = np.array([2, 5, 9, 13, 7, 22])
mesh = make_mesh(data=2)
try:
    attribute(model, {1: tc}, tokens, batch_size=5, mesh=mesh)
except ValueError as e:
    print("ERROR", e)
one = attribute(model, {1: tc}, tokens, batch_size=8)
two = attribute(model, {1: tc}, tokens, batch_size=8, mesh=mesh)
assert one.n_features > 8
print("MAXDIFF", float(np.abs(one.adjacency_matrix - two.adjacency_matrix).max()))
print("SAME", bool((one.selected_features == two.selected_features).all()))
"""


@pytest.mark.slow  # a fresh process with 2 CPU devices: three compilations, 20-70 s on 2 cores
def test_targets_split_over_a_mesh_give_the_same_graph():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", MESH_CHILD], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines() if " " in line)
    assert "batch_size (size 5)" in lines["ERROR"]
    assert lines["SAME"] == "True"
    assert float(lines["MAXDIFF"]) < 1e-6


def test_salient_logits():
    ids, p = salient_logits(np.log(np.array([0.5, 0.05, 0.3, 0.15])), desired_logit_prob=0.9)
    assert ids.tolist() == [0, 2, 3] and np.allclose(p, [0.5, 0.3, 0.15])
    ids, _ = salient_logits(np.log(np.array([0.5, 0.05, 0.3, 0.15])), max_n_logits=2)
    assert ids.tolist() == [0, 2]


def _toy_graph() -> Graph:
    """1 feature, 1 layer x 2 positions of errors, 2 tokens, 1 logit; hand-set edges."""
    a = np.zeros((6, 6), np.float32)
    a[0, 3], a[0, 4] = 2.0, -1.0  # feature <- token 0, token 1
    a[5, 0], a[5, 2], a[5, 4] = 3.0, 1.0, 0.5  # logit <- feature, error(0,1), token 1
    return Graph("ab", np.array([2, 7]), np.array([[0, 1, 4]]), np.array([1.5], np.float32),
                 np.array([0]), a, np.array([9]), np.array([1.0], np.float32), 1)  # fmt: skip


def test_scores_and_pruning_follow_the_formulas():
    g = _toy_graph()
    # influence on the logit: feature 3/4.5, error 1/4.5, token1 0.5/4.5 + (3/4.5)(1/3), token0 (3/4.5)(2/3)
    replacement, completeness = graph_scores(g)
    tok = (0.5 / 4.5 + 3 / 4.5 / 3) + 3 / 4.5 * 2 / 3
    assert replacement == pytest.approx(tok / (tok + 1 / 4.5))
    influence = np.array([3 / 4.5, 0, 1 / 4.5, 3 / 4.5 * 2 / 3, 0.5 / 4.5 + 1 / 4.5 / 1, 0])
    out = influence + np.array([0, 0, 0, 0, 0, 1.0])
    non_error = np.array([1, 1, 1, 1, 1, 1 - 1 / 4.5])
    assert completeness == pytest.approx((non_error * out).sum() / out.sum())
    pruned = prune_graph(g, node_threshold=0.5, edge_threshold=0.9)
    assert pruned.node_mask.tolist() == [True, False, False, True, True, True]
    assert pruned.edge_mask[5, 0] and pruned.edge_mask[0, 3] and not pruned.edge_mask[5, 2]


def test_files_round_trip(tmp_path, case):
    _, _, graph = case
    save_graph(graph, tmp_path / "g.npz")
    back = load_graph(tmp_path / "g.npz")
    np.testing.assert_array_equal(back.adjacency_matrix, graph.adjacency_matrix)
    assert back.n_layers == graph.n_layers
    path = save_graph_json(graph, tmp_path / "viewer", "tiny", decode=lambda ids: f"t{ids[0]}")
    data = load_graph_json(path)
    kinds = {n["feature_type"] for n in data["nodes"]}
    assert {"embedding", "logit"} <= kinds
    assert len([n for n in data["nodes"] if n["feature_type"] == "embedding"]) == len(TOKENS)
    index = json.loads((tmp_path / "viewer" / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["tiny"]
    weights = {(lk["source"], lk["target"]): lk["weight"] for lk in data["links"]}
    logit = next(n for n in data["nodes"] if n["feature_type"] == "logit")
    assert (
        logit["is_target_logit"]
        and logit["node_id"] == f"{graph.n_layers + 1}_{graph.logit_tokens[0]}_{len(TOKENS) - 1}"
    )
    src = next(s for s, t in weights if t == logit["node_id"])
    assert src


def test_intervention_ablating_nothing_changes_nothing(model, per_layer):
    base, logits = intervene(model, per_layer, TOKENS, {})
    np.testing.assert_allclose(base, logits, atol=2e-5)


def test_intervention_sets_a_feature(model, per_layer):
    setup = prepare_attribution(model, per_layer, TOKENS)
    layer, pos, latent = setup.active_features()[-1]
    new, old = intervene(model, per_layer, TOKENS, {(int(layer), int(pos), int(latent)): 0.0})
    np.testing.assert_allclose(new[:pos], old[:pos], atol=2e-5)  # causal: earlier positions same
    assert np.abs(new[pos:] - old[pos:]).max() > 1e-4


@pytest.mark.slow
def test_real_270m_replacement_and_completeness(real_model, real_tokenizer):
    """Offline 270M, random transcoders on layers 3 (skip) and 9 and none elsewhere."""
    rng = np.random.default_rng(5)
    d = real_model.config.d_model
    transcoders = {3: _transcoder(rng, d, True), 9: _transcoder(rng, d, False)}
    tokens = np.asarray(real_tokenizer.encode("The capital of France is"))
    replaced, logits = rep.replacement_logits(real_model, transcoders, tokens)
    np.testing.assert_allclose(replaced, logits, atol=2e-3 * float(np.abs(logits).max()))
    setup = prepare_attribution(real_model, transcoders, tokens)
    graph = attribute(real_model, transcoders, tokens, desired_logit_prob=0.9)
    assert graph.n_features == setup.n_features > 0
    sl = graph.node_slices()
    m_ins, final = _readouts(real_model, setup, setup.resid_0, setup.injections)
    values = _target_values(real_model, setup, graph, m_ins, final)
    b_m, b_f = _readouts(real_model, setup, jnp.zeros_like(setup.resid_0), setup.bias_injections)
    bias = _target_values(real_model, setup, graph, b_m, b_f)
    adj = graph.adjacency_matrix
    rows = np.concatenate([adj[sl["features"]], adj[sl["logits"]]])
    scale = np.abs(values).max()
    np.testing.assert_allclose(rows.sum(axis=1) + bias, values, rtol=1e-3, atol=1e-3 * scale)


class _Letters:
    """One token per letter (ids 3..28), BOS 2 first."""

    def encode(self, text: str) -> list[int]:
        return [2] + [3 + ord(c) - ord("a") for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(ord("a") + i - 3) if i > 2 else "" for i in ids)

    def token_strings(self, ids) -> list[str]:
        return [chr(ord("a") + i - 3) if i > 2 else f"<{i}>" for i in ids]


def test_cli_attribute_writes_the_graph(tmp_path, monkeypatch, capsys, model, per_layer):
    import gemma_scope_pz as gs
    from gemma_scope_pz.app.cli import main
    from gemma_scope_pz.scope.formats.gemma_scope_2 import save_gemma_scope_2

    monkeypatch.setattr(gs, "load_model", lambda source=None: model)
    monkeypatch.setattr(gs, "load_tokenizer", lambda source=None: _Letters())
    folders = []
    for layer in (0, 3):
        ae = per_layer[layer]
        ae = type(ae)(**{**vars(ae), "meta": dataclasses.replace(
            ae.meta, site_in=f"blocks.{layer}.mlp_in", site_out=f"blocks.{layer}.mlp_out")})  # fmt: skip
        folders.append(str(save_gemma_scope_2(ae, tmp_path / f"tc{layer}", model_name="270m")))
    folders[1] = f"3={folders[1]}"
    out = tmp_path / "graphs"
    status = main(["attribute", "abcdefg", "--transcoders", *folders, "--out", str(out),
                   "--slug", "abc", "--max-feature-nodes", "16", "--batch-size", "16",
                   "--html"])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "replacement score" in text and "wrote" in text
    data = load_graph_json(out / "abc.json")
    assert data["metadata"]["prompt"] == "abcdefg"
    graph = load_graph(out / "abc.npz")
    assert graph.n_features == 16 and set(graph.active_features[:, 0]) <= {0, 3}
    page = (out / "abc.html").read_text()
    assert page.count('class="gv-node ') == int(prune_graph(graph).node_mask.sum())
    assert "Attribution graph: abcdefg" in page and "&lt;2&gt;" in page
    assert main(["attribute", "abc", "--transcoders", str(tmp_path / "missing")]) == 2
