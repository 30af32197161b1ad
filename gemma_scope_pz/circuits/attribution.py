"""Attribution graphs: direct effects between nodes of the frozen replacement model.

Nodes follow circuit-tracer: active transcoder features (layer, position, latent) in that sort
order, error nodes (layer-major, then position), token-embedding nodes and logit nodes (the
most likely next tokens up to a cumulative probability, capped). The edge from source ``s`` to
target ``t`` is the direct effect of ``s`` on ``t``'s readout in the frozen linear model:

* a feature target reads ``w_enc[:, i] . mlp_in_L[pos]`` (its pre-activation minus ``b_enc``),
* a logit target reads ``(W_U[tok] - mean_v W_U[v]) . final_normed[-1]`` (the demeaned logit),
* a feature source writes ``a * w_dec[i, L']`` at ``mlp_out`` of each target layer ``L'``, an
  error node its error vector, a token its scaled embedding.

Rows come from batched reverse passes through the frozen linear model (one transpose per
layer, ``vmap`` over targets, jitted), feature rows in order of their influence on the logits
when ``max_feature_nodes`` caps them, as circuit-tracer does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from tqdm.auto import tqdm

from gemma_scope_pz.circuits import replacement as rep
from gemma_scope_pz.circuits.graph import Graph
from gemma_scope_pz.circuits.transcoders import TranscoderStack, as_transcoder_stack

__all__ = ["AttributionSetup", "attribute", "prepare_attribution", "salient_logits"]


@pz.pytree_dataclass
class AttributionSetup(pz.Struct):
    """Everything the reverse passes need for one prompt.

    Attributes:
      trace: The recorded forward pass (`replacement.trace_prompt`).
      stack: The transcoders.
      resid_0: Token nodes' vectors [seq, d_model] (scaled embeddings).
      errors: Error nodes' vectors [n_layers, seq, d_model] (zero at position 0 with zero_bos).
      positions: Per source entry, positions [n_active] of its active features.
      latents: Per source entry, latent indices [n_active].
      values: Per source entry, activations [n_active].
      injections: Per layer, what is added at mlp_out besides the skip [seq, d_model].
      bias_injections: Per layer, the part of ``injections`` that belongs to no node.
    """

    trace: rep.PromptTrace
    stack: TranscoderStack
    resid_0: jax.Array
    errors: jax.Array
    positions: list[jax.Array]
    latents: list[jax.Array]
    values: list[jax.Array]
    injections: jax.Array
    bias_injections: jax.Array

    @property
    def n_features(self) -> int:
        return int(sum(p.shape[0] for p in self.positions))

    def active_features(self) -> np.ndarray:
        """[n_active, 3] (layer, position, latent), sorted as circuit-tracer sorts them."""
        rows = [
            np.stack([np.full(p.shape, layer), np.asarray(p), np.asarray(i)], axis=1)
            for layer, p, i in zip(self.stack.layers, self.positions, self.latents, strict=True)
        ]
        return np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64)


def prepare_attribution(
    model, transcoders: Any, prompt: Any, *, zero_bos: bool = True
) -> AttributionSetup:
    """Runs the model on the prompt and collects nodes, errors and injections.

    With ``zero_bos`` (circuit-tracer 0.5.0's behaviour), features and errors at position 0
    (the BOS token) are not nodes: their contribution joins the bias.
    """
    stack = as_transcoder_stack(transcoders, model.config.n_layers)
    tokens = rep.prompt_tokens(model, prompt)
    trace = rep.trace_prompt(model, tokens)
    m_in = [rep._plain(x) for x in trace.mlp_in]
    m_out = [rep._plain(x) for x in trace.mlp_out]
    latents = [stack.encode(s, m_in[layer]) for s, layer in enumerate(stack.layers)]
    kept = [f.at[0].set(0.0) if zero_bos else f for f in latents]
    nz = [np.nonzero(np.asarray(f)) for f in kept]
    injections, errors, biases = [], [], []
    for layer in range(stack.n_layers):
        inject = m_out[layer] - stack.skip_at(layer, m_in[layer])
        error = inject - stack.decode_to(layer, latents) if stack.covered[layer] else inject
        node_part = error if not zero_bos else error.at[0].set(0.0)
        if stack.covered[layer]:
            node_part = node_part + stack.decode_to(layer, kept) - stack.b_dec[layer]
        injections.append(inject)
        errors.append(error.at[0].set(0.0) if zero_bos else error)
        biases.append(inject - node_part)
    return AttributionSetup(
        trace=trace,
        stack=stack,
        resid_0=rep._plain(trace.resid_0),
        errors=jnp.stack(errors),
        positions=[jnp.asarray(p, jnp.int32) for p, _ in nz],
        latents=[jnp.asarray(i, jnp.int32) for _, i in nz],
        values=[f[p, i] for f, (p, i) in zip(kept, nz, strict=True)],
        injections=jnp.stack(injections),
        bias_injections=jnp.stack(biases),
    )


def salient_logits(
    logits: np.ndarray, *, max_n_logits: int = 10, desired_logit_prob: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) of the fewest top tokens reaching ``desired_logit_prob``."""
    z = np.asarray(logits, np.float64)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")[: min(max_n_logits, probs.size)]
    top = probs[order]
    cutoff = int(np.searchsorted(np.cumsum(top), desired_logit_prob, side="left")) + 1
    return order[:cutoff], top[:cutoff].astype(np.float32)


def _transpose_step(model, setup: AttributionSetup, layer: int):
    """The transpose of one frozen block: (grad at x_{L+1}, grad at mlp_in_L) -> grad at x_L."""
    _, blocks, _ = rep._body_parts(model)
    parts = rep.block_parts(blocks[layer])

    def step(x):
        x_mid, m_in = rep._frozen_block_to_mlp_in(parts, setup.trace, layer, rep._named(x))
        out = x_mid + rep._skip_named(setup.stack, layer, m_in)
        return rep._plain(out), rep._plain(m_in)

    return jax.linear_transpose(step, setup.resid_0)


def _layer_sources(setup: AttributionSetup, layer: int, g: jax.Array) -> list:
    """Edges from the sources written at ``mlp_out`` of ``layer``, given the gradient ``g``
    [batch, seq, d] there: (error edges [batch, seq], feature edges per source entry)."""
    stack = setup.stack
    errors = jnp.einsum("btd,td->bt", g, setup.errors[layer])
    feats = []
    for s in range(len(stack.layers)):
        if layer in stack.targets(s):
            dec = (
                stack.w_dec[s][setup.latents[s], layer - stack.layers[s]] * setup.values[s][:, None]
            )
            feats.append(jnp.einsum("bnd,nd->bn", g[:, setup.positions[s]], dec))
        else:
            feats.append(jnp.zeros((g.shape[0], setup.positions[s].shape[0]), g.dtype))
    return [errors, feats]


@jax.jit
def _rows(model, setup: AttributionSetup, t_layer, t_pos, t_vec):
    """Rows [batch, n_features + n_layers * seq + seq] of direct effects on a batch of targets.

    One reverse pass through the frozen blocks, from the highest target layer down (blocks
    above every target in the batch are skipped), each target's gradient contracted with the
    source vectors at every ``mlp_out`` it passes.
    """
    n_layers, seq = setup.stack.n_layers, setup.resid_0.shape[0]
    _, _, after = rep._body_parts(model)
    onehot = jax.nn.one_hot(t_pos, seq, dtype=t_vec.dtype)[:, :, None] * t_vec[:, None, :]

    def final(x):
        return rep._plain(rep._frozen_norm(after[0], rep._named(x), setup.trace.final_inv_rms))

    final_t = jax.vmap(jax.linear_transpose(final, setup.resid_0))
    (g,) = final_t(jnp.where((t_layer == n_layers)[:, None, None], onehot, 0.0))
    top = jnp.max(t_layer)
    feats = [jnp.zeros((t_layer.shape[0], p.shape[0]), g.dtype) for p in setup.positions]
    errors = []
    for layer in reversed(range(n_layers)):
        ct_in = jnp.where((t_layer == layer)[:, None, None], onehot, 0.0)
        step = jax.vmap(_transpose_step(model, setup, layer))

        def active(g, ct_in, layer=layer, step=step):
            (g_below,) = step((g, ct_in))
            return g_below, _layer_sources(setup, layer, g)

        def idle(g, ct_in, layer=layer):
            return g, jax.tree.map(jnp.zeros_like, jax.eval_shape(
                lambda: _layer_sources(setup, layer, g)))  # fmt: skip

        g, (err, contrib) = jax.lax.cond(top >= layer, active, idle, g, ct_in)
        errors.append(err)
        feats = [f + c for f, c in zip(feats, contrib, strict=True)]
    tokens = jnp.einsum("btd,td->bt", g, setup.resid_0)
    return jnp.concatenate([*feats, *reversed(errors), tokens], axis=1)


@dataclasses.dataclass
class _Targets:
    layers: np.ndarray
    positions: np.ndarray
    vectors: np.ndarray


def _feature_targets(setup: AttributionSetup) -> _Targets:
    enc = [np.asarray(w)[:, np.asarray(i)].T for w, i in zip(setup.stack.w_enc, setup.latents)]
    d = setup.resid_0.shape[1]
    active = setup.active_features()
    vecs = np.concatenate(enc) if enc else np.zeros((0, d), np.float32)
    return _Targets(active[:, 0], active[:, 1], vecs.astype(np.float32))


def _compute_rows(model, setup, targets: _Targets, idx: np.ndarray, batch_size: int) -> np.ndarray:
    n = len(idx)
    if n == 0:
        width = setup.n_features + (setup.stack.n_layers + 1) * setup.resid_0.shape[0]
        return np.zeros((0, width), np.float32)
    by_layer = np.argsort(targets.layers[idx], kind="stable")  # batches skip blocks above them
    idx = np.asarray(idx)[by_layer]
    pad = np.concatenate([idx, np.full((-n) % batch_size, idx[-1])]).astype(int)
    out = []
    frozen = pz.freeze_params(model)
    for start in range(0, len(pad), batch_size):
        sel = pad[start : start + batch_size]
        rows = _rows(
            frozen,
            setup,
            jnp.asarray(targets.layers[sel], jnp.int32),
            jnp.asarray(targets.positions[sel], jnp.int32),
            jnp.asarray(targets.vectors[sel]),
        )
        out.append(np.asarray(rows))
    rows = np.empty((n, out[0].shape[1]), np.float32)
    rows[by_layer] = np.concatenate(out)[:n]
    return rows


def _partial_influence(rows: np.ndarray, row_nodes: np.ndarray, logit_p: np.ndarray) -> np.ndarray:
    """Influence of every column node on the logits, through the rows computed so far."""
    norm = np.abs(rows)
    norm = norm / np.maximum(norm.sum(axis=1, keepdims=True), 1e-8)
    n_cols = rows.shape[1] + len(logit_p)
    prod = np.zeros(n_cols)
    prod[-len(logit_p) :] = logit_p
    influence = np.zeros(rows.shape[1])
    for _ in range(128):
        prod = prod[row_nodes] @ norm
        if not prod.any():
            return influence
        influence += prod
        prod = np.concatenate([prod, np.zeros(len(logit_p))])
    raise RuntimeError("influence did not converge in 128 steps")


def _feature_order(
    model, setup, targets, logit_rows, logit_p, max_nodes: int, batch_size: int, update_interval
):
    """Feature rows in circuit-tracer's order: all of them, or greedily by influence."""
    n_feat = len(targets.layers)
    offset = logit_rows.shape[1]
    if max_nodes >= n_feat:
        order = np.arange(n_feat)
        return order, _compute_rows(model, setup, targets, order, batch_size)
    rows, nodes = [logit_rows], [offset + np.arange(len(logit_p))]
    visited = np.zeros(n_feat, bool)
    with tqdm(total=max_nodes, desc="feature rows", leave=False) as bar:
        while visited.sum() < max_nodes:
            influence = _partial_influence(np.concatenate(rows), np.concatenate(nodes), logit_p)
            rank = np.argsort(-influence[:n_feat], kind="stable")
            queue = min(update_interval * batch_size, max_nodes - int(visited.sum()))
            pending = rank[~visited[rank]][:queue]
            rows.append(_compute_rows(model, setup, targets, pending, batch_size))
            nodes.append(pending)
            visited[pending] = True
            bar.update(len(pending))
    order = np.concatenate(nodes[1:])
    return order, np.concatenate(rows[1:])


def attribute(
    model,
    transcoders: Any,
    prompt: Any,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    update_interval: int = 4,
    zero_bos: bool = True,
    input_string: str = "",
) -> Graph:
    """The attribution graph of one prompt (see the module docstring for its definitions).

    Args:
      model: A `Gemma3LM`.
      transcoders: A `CrossLayerTranscoder`, ``{layer: AutoEncoder}`` or a per-layer list
        (None where a layer has no transcoder), or a `TranscoderStack`.
      prompt: Text (the model's tokenizer, BOS added) or 1-D token ids (BOS first).
      max_n_logits: Cap on the number of logit nodes.
      desired_logit_prob: Logit nodes are added until their probability reaches this.
      max_feature_nodes: Cap on feature nodes (the most influential are kept); None = all.
      batch_size: Targets per reverse pass.
      update_interval: Batches between influence re-rankings (with a cap).
      zero_bos: Features and errors at position 0 are not nodes (circuit-tracer's default).
        Token nodes are the scaled embeddings ``sqrt(d_model) * E[token]`` (circuit-tracer
        0.5.0 uses ``E[token]`` with the gradient after the scaling: its token edges are ours
        divided by ``sqrt(d_model)``; see tests/test_circuits_reference.py).
      input_string: Stored in the graph (defaults to the prompt when it is text).
    """
    tokens = rep.prompt_tokens(model, prompt)
    if isinstance(prompt, str) and not input_string:
        input_string = prompt
    setup = prepare_attribution(model, transcoders, tokens, zero_bos=zero_bos)
    n_layers, seq = setup.stack.n_layers, setup.resid_0.shape[0]
    logits = setup.trace.logits.unwrap("batch", "seq", "vocabulary")[0, -1]
    logit_ids, logit_p = salient_logits(
        np.asarray(logits), max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob
    )
    table = np.asarray(model.embedding_table(), np.float32)
    logit_vecs = table[logit_ids] - table.mean(axis=0, keepdims=True)
    n_logit = len(logit_ids)
    logit_targets = _Targets(np.full(n_logit, n_layers), np.full(n_logit, seq - 1), logit_vecs)
    logit_rows = _compute_rows(model, setup, logit_targets, np.arange(n_logit), batch_size)
    targets = _feature_targets(setup)
    n_feat = len(targets.layers)
    cap = n_feat if max_feature_nodes is None else min(max_feature_nodes, n_feat)
    order, feat_rows = _feature_order(
        model, setup, targets, logit_rows, logit_p, cap, batch_size, update_interval
    )
    selected = np.sort(order)
    cols = np.concatenate([selected, np.arange(n_feat, logit_rows.shape[1])])
    n_nodes = len(cols) + n_logit
    adjacency = np.zeros((n_nodes, n_nodes), np.float32)
    adjacency[: len(selected), : len(cols)] = feat_rows[np.argsort(order)][:, cols]
    adjacency[len(cols) :, : len(cols)] = logit_rows[:, cols]
    return Graph(
        input_string=input_string,
        input_tokens=np.asarray(tokens, np.int64),
        active_features=setup.active_features(),
        activation_values=np.concatenate([np.asarray(v) for v in setup.values]).astype(np.float32)
        if setup.values
        else np.zeros(0, np.float32),
        selected_features=selected.astype(np.int64),
        adjacency_matrix=adjacency,
        logit_tokens=np.asarray(logit_ids, np.int64),
        logit_probabilities=np.asarray(logit_p, np.float32),
        n_layers=n_layers,
    )
