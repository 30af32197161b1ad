"""The tour's steps, one small function each, calling only the public facade and returning plain data.

:func:`model_step` (load, next tokens, greedy text), :func:`metrics_step` (FVU, L0, delta loss on held-out
text), :func:`features_step` (statistics and the features of a sentence), :func:`lens_and_steer_step`
and :func:`report_step` (the HTML pages), :func:`circuit_step` (an attribution graph, opt-in).
:mod:`gemma_scope_pz.app.tour` runs them in order.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np

import gemma_scope_pz as gs

ENERGY = "The law of conservation of energy states that energy cannot be created or destroyed, only transformed."
CAPITAL = "The capital of France is"
STEER_PROMPT = "I think that"
Log = Callable[[str], None]


@dataclasses.dataclass
class ModelStep:
    """Step 1: the model, its tokenizer and what it says after ``CAPITAL``.

    Attributes:
      model: The loaded ``Gemma3LM``.
      tok: Its tokenizer.
      next_tokens: The five most likely next tokens and their probabilities.
      greedy: The greedy continuation of ``CAPITAL`` (15 tokens).
    """

    model: Any
    tok: Any
    next_tokens: list[tuple[str, float]]
    greedy: str


@dataclasses.dataclass
class FeatureStep:
    """Step 4: statistics over held-out contexts and the features of the ``ENERGY`` sentence.

    Attributes:
      examples: Max-activating examples of every latent.
      stats: Their ``FeatureStats``.
      strings: Display strings of the sentence's tokens.
      latents: The sentence's latents ``[seq, d_sae]``.
      specific: Mean activation over the sentence with dense latents zeroed ``[d_sae]``.
      strongest: The strongest non-dense feature of the sentence.
    """

    examples: Any
    stats: Any
    strings: list[str]
    latents: np.ndarray
    specific: np.ndarray
    strongest: int


def model_summary(model) -> str:
    """A few lines describing the architecture and size."""
    c = model.config
    n_params = sum(int(np.prod(shape)) for shape in gs.param_shapes(c).values())
    kinds = "".join("G" if c.is_global(i) else "L" for i in range(c.n_layers))
    return (
        f"Gemma 3 {c.name}: {c.n_layers} blocks, d_model {c.d_model}, {c.n_heads} query heads / "
        f"{c.n_kv_heads} kv heads × {c.head_dim}, MLP {c.d_ff}, vocab {c.vocab_size}, "
        f"{n_params / 1e6:.0f}M parameters\n"
        f"attention per block (L = sliding window {c.sliding_window}, G = global): {kinds}\n"
        f"sites: blocks.<0..{c.n_layers - 1}>.{{resid_pre, resid_post, attn_out, mlp_in, mlp_out}}"
    )


def next_token_probs(model, ids: list[int]) -> np.ndarray:
    """Softmax of the model's logits after the last token of ``ids``."""
    logits = np.asarray(gs.forward(model, np.array([ids])), np.float64)[0, -1]
    probs = np.exp(logits - logits.max())
    return probs / probs.sum()


def model_step(source: str | None = None, log: Log = print) -> ModelStep:
    """Loads the model and tokenizer, prints its summary, next tokens and a greedy continuation."""
    model = gs.load_model(source)
    tok = gs.load_tokenizer(source if source and not str(source).endswith(".model") else None)
    log(model_summary(model))
    prompt = tok.encode(CAPITAL)
    probs = next_token_probs(model, prompt)
    top = [int(i) for i in np.argsort(-probs)[:5]]
    next_tokens = [(tok.token_strings([i])[0], float(probs[i])) for i in top]
    log(
        f"next-token predictions after {CAPITAL!r}: "
        + ", ".join(f"{t!r} {p:.2f}" for t, p in next_tokens)
    )
    greedy = tok.decode(gs.generate(model, [prompt], max_new_tokens=15, stop_token=None)[0])
    log(f"greedy continuation: {CAPITAL}{greedy}")
    return ModelStep(model, tok, next_tokens, greedy)


def metrics_step(model, tok, sae, transcoder, n_contexts: int, log: Log = print) -> dict:
    """FVU, L0, delta loss, CE recovered and KL of both dictionaries on held-out contexts."""
    batches = gs.corpus_contexts(tok, None, n_contexts, from_end=True)
    out = {}
    for key, name, dictionary in (
        ("sae_metrics", f"SAE {sae.meta.site_in}", sae),
        (
            "transcoder_metrics",
            f"transcoder {transcoder.meta.site_in} → {transcoder.meta.site_out}",
            transcoder,
        ),
    ):
        e = gs.evaluate_sae(model, dictionary, [batches], progress=False)
        out[key] = e.to_dict()
        log(
            f"{name}: FVU {e.fvu:.3f}  L0 {e.l0:.1f}  CE clean {e.ce_clean:.3f} → spliced "
            f"{e.ce_spliced:.3f} (delta loss {e.delta_loss:+.3f}, CE recovered "
            f"{e.ce_recovered:.2f}, KL {e.kl:.3f}) on {e.n_tokens} tokens"
        )
    return out


def features_step(model, tok, sae, n_contexts: int, log: Log = print) -> FeatureStep:
    """Max-activating examples over held-out contexts, and the features of the ``ENERGY`` sentence."""
    contexts = gs.corpus_contexts(tok, None, n_contexts, from_end=True)
    batches = [
        (c, gs.token_mask(c, pad_id=tok.pad_id))
        for c in np.split(contexts, range(8, len(contexts), 8))
    ]
    examples = gs.collect_examples(
        batches, gs.latent_encoder(model, sae), sae.meta.d_sae, k=6, window=10, progress=False
    )
    stats = gs.feature_stats(examples)
    log(
        f"over {int(examples.n_tokens)} tokens: {int(np.sum(stats.dead))} dead and "
        f"{int(np.sum(stats.dense))} dense latents (density > {stats.dense_threshold})"
    )
    ids = tok.encode(ENERGY)
    feats = gs.top_features(model, sae, ids, k=3)
    strings = tok.token_strings(ids)
    for pos in range(1, len(ids)):
        cells = ", ".join(
            f"#{int(f)} {v:.1f}" for f, v in zip(feats["ids"][pos], feats["values"][pos]) if v > 0
        )
        log(f"  {strings[pos]!r:>18}  {cells}")
    # The strongest feature of the sentence among those that are not dense (which fire everywhere).
    specific = np.where(np.asarray(stats.dense), 0.0, feats["mean"])
    strongest = int(np.argmax(specific if specific.max() > 0 else feats["mean"]))
    log(
        f"strongest (non-dense) feature over the sentence: #{strongest} (mean activation "
        f"{feats['mean'][strongest]:.2f}, density {float(stats.density[strongest]):.4f})"
    )
    return FeatureStep(examples, stats, strings, np.asarray(feats["latents"]), specific, strongest)


def lens_and_steer_step(model, tok, sae, feature: int, coeff: float, log: Log = print) -> dict:
    """The logit lens of ``feature`` and a greedy continuation with and without steering along it."""
    lens = gs.logit_lens(model, sae, [feature], k=10)[0].with_strings(tok.token_strings)
    log("promotes: " + " ".join(repr(x) for x, _ in lens["top"]))
    log("suppresses: " + " ".join(repr(x) for x, _ in lens["bottom"]))
    direction = sae.to_arrays()["w_dec"][feature]
    prompt = tok.encode(STEER_PROMPT)
    plain = tok.decode(gs.generate(model, [prompt], 20, stop_token=None)[0])
    steered_model = gs.steer(model, sae.meta.site_in, direction, coeff)
    steered = tok.decode(gs.generate(steered_model, [prompt], 20, stop_token=None)[0])
    log(f"without steering: {STEER_PROMPT}{plain}")
    log(f"steered (+{coeff}·‖x‖·d_{feature}): {STEER_PROMPT}{steered}")
    steering = {"prompt": STEER_PROMPT, "coeff": coeff, "plain": plain, "steered": steered}
    return {"logit_lens": lens, "steering": steering}


def sentence_losses(model, tok, sae) -> dict:
    """Per-token loss on the ``ENERGY`` sentence, clean and with ``sae`` spliced in (JSON-able)."""
    ids = tok.encode(ENERGY)
    losses = gs.token_losses(model, sae, ids)
    return {
        "tokens": list(tok.token_strings(ids))[1:],
        "clean": [float(v) for v in losses["clean"]],
        "spliced": [float(v) for v in losses["spliced"]],
    }


def report_step(model, tok, sae, feats: FeatureStep, summary: dict, out_dir) -> pathlib.Path:
    """Feature cards of the strongest and most specific features, and the report page."""
    from gemma_scope_pz.app.report import write_report

    summary.setdefault("token_losses", sentence_losses(model, tok, sae))

    chosen = [feats.strongest] + [
        int(f)
        for f in np.argsort(-feats.specific)[:12]
        if feats.specific[f] > 0 and f != feats.strongest
    ][:11]
    lens_all = {
        r.feature: tuple(r.with_strings(tok.token_strings)[k] for k in ("top", "bottom"))
        for r in gs.logit_lens(model, sae, chosen, k=8)
    }
    return write_report(
        out_dir,
        summary=summary,
        sentence_tokens=feats.strings,
        sentence_latents=feats.latents,
        features=chosen,
        examples=feats.examples,
        stats=feats.stats,
        token_strings=tok.token_strings,
        lens=lens_all,
    )


@dataclasses.dataclass
class CircuitStep:
    """Step 7 (optional): the attribution graph of ``CAPITAL`` and its JSON-able summary.

    Attributes:
      graph: The ``circuits.Graph``.
      summary: ``{"circuit": {...}}``: scores, strongest path, the ablation, the HTML file name.
    """

    graph: Any
    summary: dict


def circuit_step(
    model, tok, transcoder, out_dir, log: Log = print, max_feature_nodes: int = 16
) -> CircuitStep:
    """Step 7: a small attribution graph of ``CAPITAL`` over the transcoder, and its HTML view.

    Every other layer's MLP is an error node. Writes ``circuit.html`` into ``out_dir`` and returns
    the scores, the strongest path into the top logit and what ablating the feature with the
    strongest direct edge into that logit does to its log-probability.
    """
    import jax

    from gemma_scope_pz.circuits import graph_scores, intervene, render_graph
    from gemma_scope_pz.circuits.graph import node_label, prune_graph, strongest_path

    transcoders = {int(transcoder.meta.site_in.split(".")[1]): transcoder}
    ids = np.asarray(tok.encode(CAPITAL))
    graph = gs.attribute(
        model, transcoders, ids, max_feature_nodes=max_feature_nodes, max_n_logits=3,
        input_string=CAPITAL,
    )  # fmt: skip
    replacement, completeness = graph_scores(graph)
    path = [
        node_label(graph, i, tok.token_strings)
        for i in strongest_path(graph, prune_graph(graph).edge_mask)
    ]
    top = graph.node_slices()["logits"].start
    best = int(np.argmax(np.abs(graph.adjacency_matrix[top, : graph.n_features])))
    feature = tuple(int(v) for v in graph.active_features[graph.selected_features[best]])
    new, old = intervene(model, transcoders, ids, {feature: 0.0})
    token = int(graph.logit_tokens[0])
    before, after = (float(jax.nn.log_softmax(x[-1])[token]) for x in (old, new))
    page = render_graph(graph, pathlib.Path(out_dir) / "circuit.html", model, transcoders, tok)
    log(f"{graph.n_features} feature nodes; replacement {replacement:.3f}, completeness "
        f"{completeness:.3f}; strongest path: {' -> '.join(path)}")  # fmt: skip
    log(f"ablating {node_label(graph, best, tok.token_strings)}: log p("
        f"{tok.token_strings([token])[0]!r}) {before:.3f} -> {after:.3f}")  # fmt: skip
    return CircuitStep(graph, {
        "circuit": {
            "prompt": CAPITAL, "replacement": replacement, "completeness": completeness,
            "feature_nodes": graph.n_features, "path": path, "ablated": list(feature),
            "ablated_label": node_label(graph, best, tok.token_strings),
            "logit": tok.token_strings([token])[0], "log_p_before": before,
            "log_p_after": after, "html": page.name,
        }
    })  # fmt: skip
