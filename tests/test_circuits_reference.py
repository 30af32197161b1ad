"""Our attribution graphs against circuit-tracer 0.5.0's, recorded on a tiny random Gemma 3.

``scripts/reference_circuit_tracer.py`` saved a 4-layer random Gemma 3 with transformers, random
JumpReLU transcoders (with and without affine skip), a random JumpReLU cross-layer transcoder
with skips, and circuit-tracer's graphs (nnsight backend)
under ``tests/data/circuit_tracer/``. We load the same checkpoint with our HF reader and the same
transcoders, and require the same active features and the same adjacency to 1e-4 relative.

One documented difference: circuit-tracer's token nodes use the unscaled embedding row
``W_E[token]`` while it reads their gradient after Gemma's ``sqrt(d_model)`` embedding scale,
so its token edges are ours divided by ``sqrt(d_model)`` (ours are the scaled embedding, which
keeps every row's edges summing to the node's activation).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from gemma_scope_pz.circuits.attribution import attribute
from gemma_scope_pz.models.checkpoints.hf import load_hf_dir
from gemma_scope_pz.models.gemma3 import Gemma3LM, forward
from gemma_scope_pz.scope.cross_layer_transcoder import CrossLayerTranscoder
from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta

DATA = Path(__file__).parent / "data" / "circuit_tracer"


@pytest.fixture(scope="module")
def model() -> Gemma3LM:
    config, params = load_hf_dir(DATA / "model")
    return Gemma3LM.from_params(config, params)


def _transcoders(case: str) -> dict[int, AutoEncoder] | CrossLayerTranscoder:
    arrays = load_file(str(DATA / "transcoders.safetensors"))
    if case == "clt":
        a = {k[len("clt.") :]: jnp.asarray(v) for k, v in arrays.items() if k.startswith("clt.")}

        def per_layer(name):
            return [a[f"{name}.{i}"] for i in range(4)]

        d, n = a["w_enc.0"].shape
        return CrossLayerTranscoder(
            w_enc=per_layer("w_enc"), b_enc=per_layer("b_enc"), threshold=per_layer("threshold"),
            w_dec=per_layer("w_dec"), b_dec=per_layer("b_dec"), w_skip=per_layer("w_skip"),
            meta=SaeMeta(d_in=d, d_sae=n, d_out=d, extra={"n_layers": 4}),
        )  # fmt: skip
    out = {}
    for layer in range(4):
        prefix = f"{case}.{layer}."
        a = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        out[layer] = AutoEncoder.from_arrays(
            a["w_enc"], a["b_enc"], a["w_dec"], a["b_dec"], a["threshold"], w_skip=a.get("w_skip")
        )
    return out


@pytest.mark.parametrize("case", ["skip", "noskip", "clt"])
def test_graph_equals_circuit_tracer(model, case):
    ref = np.load(DATA / f"graph_{case}.npz")
    tokens = ref["input_tokens"]
    np.testing.assert_allclose(forward(model, tokens[None])[0], ref["hf_logits"], atol=1e-4)
    graph = attribute(model, _transcoders(case), tokens, desired_logit_prob=0.999)
    np.testing.assert_array_equal(graph.active_features, ref["active_features"])
    np.testing.assert_array_equal(graph.selected_features, ref["selected_features"])
    np.testing.assert_array_equal(graph.logit_tokens, ref["logit_tokens"])
    np.testing.assert_allclose(graph.logit_probabilities, ref["logit_probabilities"], rtol=1e-4)
    np.testing.assert_allclose(graph.activation_values, ref["activation_values"], rtol=1e-4)
    ours = graph.adjacency_matrix.copy()
    ours[:, graph.node_slices()["tokens"]] /= np.sqrt(model.config.d_model)
    want = ref["adjacency_matrix"]
    assert ours.shape == want.shape
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    assert np.count_nonzero(want) > 1000
