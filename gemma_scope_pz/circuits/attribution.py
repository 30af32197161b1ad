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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from penzai import pz
from tqdm.auto import tqdm

from gemma_scope_pz.circuits import replacement as rep
from gemma_scope_pz.circuits.graph import Graph
from gemma_scope_pz.circuits.influence import partial_influence
from gemma_scope_pz.circuits.transcoders import TranscoderStack, as_transcoder_stack
from gemma_scope_pz.parallel.mesh import DATA, check_divides

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


_FEATURE_CHUNK = 1024  # features per step of the source contraction (bounds its memory)


def _feature_edges(g: jax.Array, dec: jax.Array, positions, latents, values) -> jax.Array:
    """Edges [batch, n] ``g[b, pos_n] . (value_n * dec[lat_n])`` of ``n`` active features.

    Above ``_FEATURE_CHUNK`` features the gather runs in chunks (`jax.lax.map`), so memory is
    ``batch * chunk * d_model`` rather than ``batch * n * d_model``.
    """
    n, chunk = positions.shape[0], _FEATURE_CHUNK

    def edges(p, i, v):
        return jnp.einsum("bnd,nd->bn", g[:, p], dec[i] * v[:, None])

    if n <= chunk:
        return edges(positions, latents, values)
    pad = (-n) % chunk
    parts = [jnp.pad(a, (0, pad)).reshape(-1, chunk) for a in (positions, latents, values)]
    out = jax.lax.map(lambda args: edges(*args), tuple(parts))  # [n_chunks, batch, chunk]
    return jnp.moveaxis(out, 0, 1).reshape(g.shape[0], -1)[:, :n]


def _layer_sources(setup: AttributionSetup, layer: int, g: jax.Array) -> list:
    """Edges from the sources written at ``mlp_out`` of ``layer``, given the gradient ``g``
    [batch, seq, d] there: (error edges [batch, seq], feature edges per source entry)."""
    stack = setup.stack
    errors = jnp.einsum("btd,td->bt", g, setup.errors[layer])
    feats = []
    for s in range(len(stack.layers)):
        if layer in stack.targets(s):
            dec = stack.w_dec[s][:, layer - stack.layers[s]]
            feats.append(
                _feature_edges(g, dec, setup.positions[s], setup.latents[s], setup.values[s])
            )
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


def _row_width(setup: AttributionSetup) -> int:
    return setup.n_features + (setup.stack.n_layers + 1) * setup.resid_0.shape[0]


def _compute_rows(
    model,
    setup,
    targets: _Targets,
    idx: np.ndarray,
    batch_size: int,
    out: np.ndarray | None = None,
    mesh: Mesh | None = None,
) -> np.ndarray:
    """Rows of targets ``idx``, written batch by batch into ``out`` [len(idx), width].

    With a ``mesh``, each batch of targets is split over its "data" axis.
    """
    n = len(idx)
    sharding = None if mesh is None else NamedSharding(mesh, P(DATA))
    if out is None:
        out = np.empty((n, _row_width(setup)), np.float32)
    if n == 0:
        return out
    by_layer = np.argsort(targets.layers[idx], kind="stable")  # batches skip blocks above them
    ordered = np.asarray(idx)[by_layer]
    pad = np.concatenate([ordered, np.full((-n) % batch_size, ordered[-1])]).astype(int)
    frozen = pz.freeze_params(model)
    for start in range(0, n, batch_size):
        sel = pad[start : start + batch_size]
        rows = _rows(
            frozen,
            setup,
            *jax.device_put(
                (
                    np.asarray(targets.layers[sel], np.int32),
                    np.asarray(targets.positions[sel], np.int32),
                    np.asarray(targets.vectors[sel], np.float32),
                ),
                sharding,
            ),
        )
        take = min(batch_size, n - start)
        out[by_layer[start : start + take]] = np.asarray(rows)[:take]
    return out


def _feature_order(
    model,
    setup,
    targets,
    logit_rows,
    logit_p,
    max_nodes: int,
    batch_size: int,
    update_interval,
    mesh,
):
    """Feature rows in circuit-tracer's order, greedily by influence (``max_nodes`` of them).

    Rows go into one preallocated buffer [n_logits + max_nodes, width]; re-ranking reads it in
    chunks (`influence.partial_influence`). Returns (feature indices in row order, their rows).
    """
    n_feat, n_logit = len(targets.layers), len(logit_p)
    width = logit_rows.shape[1]
    rows = np.empty((n_logit + max_nodes, width), np.float32)
    rows[:n_logit] = logit_rows
    nodes = np.concatenate([width + np.arange(n_logit), np.zeros(max_nodes, int)])
    visited = np.zeros(n_feat, bool)
    done = n_logit
    with tqdm(total=max_nodes, desc="feature rows", leave=False) as bar:
        while done < n_logit + max_nodes:
            influence = partial_influence(rows[:done], nodes[:done], logit_p, n_feat)
            rank = np.argsort(-influence, kind="stable")
            queue = min(update_interval * batch_size, n_logit + max_nodes - done)
            pending = rank[~visited[rank]][:queue]
            end = done + len(pending)
            _compute_rows(model, setup, targets, pending, batch_size, rows[done:end], mesh)
            nodes[done:end] = pending
            visited[pending] = True
            done = end
            bar.update(len(pending))
    return nodes[n_logit:], rows[n_logit:]


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
    mesh: Mesh | None = None,
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
      mesh: Splits each batch of targets over the mesh's "data" axis (``batch_size`` must
        divide evenly); the rows come back to the host batch by batch.
    """
    if mesh is not None:
        check_divides(mesh, {"batch_size": (batch_size, DATA)}, "attribution targets")
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
    logit_rows = _compute_rows(
        model, setup, logit_targets, np.arange(n_logit), batch_size, mesh=mesh
    )
    targets = _feature_targets(setup)
    n_feat, width = len(targets.layers), logit_rows.shape[1]
    cap = n_feat if max_feature_nodes is None else min(max_feature_nodes, n_feat)
    n_nodes = cap + width - n_feat + n_logit
    adjacency = np.zeros((n_nodes, n_nodes), np.float32)
    if cap == n_feat:  # every feature is a node: its rows go straight into the adjacency
        selected = np.arange(n_feat)
        _compute_rows(model, setup, targets, selected, batch_size, adjacency[:n_feat, :width], mesh)
        cols = np.arange(width)
    else:
        order, feat_rows = _feature_order(
            model, setup, targets, logit_rows, logit_p, cap, batch_size, update_interval, mesh
        )
        selected = np.sort(order)
        cols = np.concatenate([selected, np.arange(n_feat, width)])
        adjacency[:cap, : len(cols)] = feat_rows[np.ix_(np.argsort(order), cols)]
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
