"""The ``gemma-scope-pz attribute`` subcommand: an attribution graph for one prompt.

    gemma-scope-pz attribute "The capital of France is" --transcoders DIR_9 DIR_12 --out graphs/
    gemma-scope-pz attribute "The capital of France is" --clt REPO:FOLDER --max-feature-nodes 4096

Each ``--transcoders`` entry is a transcoder folder (or ``REPO:FOLDER``) whose config names its
``blocks.L.mlp_in`` site, or ``L=SOURCE`` to give the layer. Writes ``<out>/<slug>.json`` (the
pruned graph in circuit-tracer's viewer format, plus ``graph-metadata.json``) and
``<out>/<slug>.npz`` (the whole graph), and prints the scores and the strongest nodes. With
``--html`` it also writes ``<out>/<slug>.html``, our self-contained view (``circuits/html.py``).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

__all__ = ["add_attribute_parser", "cmd_attribute"]

_SITE = re.compile(r"^blocks\.([0-9]+)\.mlp_in$")


def add_attribute_parser(sub) -> None:
    """Registers ``attribute`` on the CLI's subparsers (``app/parser.py``)."""
    p = sub.add_parser("attribute", help="attribution graph of a prompt over transcoders or a CLT")
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint source (None: the offline Gemma 3 270M); see `gemma-scope-pz --help`",
    )
    p.add_argument("prompt", help="text to attribute (BOS added)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--transcoders", nargs="+", default=None, help="transcoder folders or L=SOURCE entries"
    )
    group.add_argument("--clt", default=None, help="a cross-layer transcoder folder or REPO:FOLDER")
    p.add_argument("--out", default="graphs", help="folder for <slug>.json and <slug>.npz")
    p.add_argument("--slug", default="graph", help="graph name in the viewer")
    p.add_argument("--max-feature-nodes", type=int, default=4096, help="cap on feature nodes")
    p.add_argument("--max-n-logits", type=int, default=10, help="cap on logit nodes")
    p.add_argument("--desired-logit-prob", type=float, default=0.95, help="logit mass to cover")
    p.add_argument("--batch-size", type=int, default=64, help="targets per reverse pass")
    p.add_argument("--node-threshold", type=float, default=0.8, help="pruning: node influence")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="pruning: edge influence")
    p.add_argument(
        "--html",
        action="store_true",
        help="also write <out>/<slug>.html: the pruned graph as a self-contained page "
        "(hover: top logits; click: feature card)",
    )


def _transcoders(specs: list[str]) -> dict:
    import gemma_scope_pz as gs

    out = {}
    for spec in specs:
        layer_text, eq, source = spec.partition("=")
        if eq and layer_text.isdigit():
            layer, sae = int(layer_text), gs.load_sae(source)
        else:
            sae = gs.load_sae(spec)
            match = _SITE.match(sae.meta.site_in)
            if match is None:
                raise ValueError(
                    f"{spec}: its input site {sae.meta.site_in!r} is not blocks.L.mlp_in; "
                    "give the layer as L=SOURCE"
                )
            layer = int(match.group(1))
        if layer in out:
            raise ValueError(f"{spec}: layer {layer} given twice")
        out[layer] = sae
    return out


def cmd_attribute(args: argparse.Namespace) -> None:
    """Runs the attribution, writes the files and prints a summary."""
    import numpy as np

    import gemma_scope_pz as gs
    from gemma_scope_pz.circuits.graph import graph_scores, prune_graph, save_graph, save_graph_json

    model = gs.load_model(args.model)
    tok = gs.load_tokenizer(model)
    transcoders = gs.load_clt(args.clt) if args.clt else _transcoders(args.transcoders)
    graph = gs.attribute(
        model, transcoders, np.asarray(tok.encode(args.prompt)), input_string=args.prompt,
        max_n_logits=args.max_n_logits, desired_logit_prob=args.desired_logit_prob,
        max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size,
    )  # fmt: skip
    out = Path(args.out)
    save_graph(graph, out / f"{args.slug}.npz")
    path = save_graph_json(
        graph, out, args.slug, decode=tok.decode,
        node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
    )  # fmt: skip
    replacement, completeness = graph_scores(graph)
    pruned = prune_graph(graph, args.node_threshold, args.edge_threshold)
    print(f"{graph.n_features} feature nodes of {len(graph.active_features)} active; "
          f"{int(pruned.node_mask.sum())} nodes and {int(pruned.edge_mask.sum())} edges kept")  # fmt: skip
    print(f"replacement score {replacement:.3f}, completeness score {completeness:.3f}")
    for token, prob in zip(graph.logit_tokens, graph.logit_probabilities, strict=True):
        print(f"  logit {tok.decode([int(token)])!r}: p={float(prob):.3f}")
    sl = graph.node_slices()
    feats = np.argsort(pruned.cumulative_scores[sl["features"]])[:5]
    for i in feats:
        layer, pos, latent = graph.active_features[graph.selected_features[i]]
        print(f"  feature {layer}/{latent} at position {pos}")
    print(f"wrote {path} and {out / f'{args.slug}.npz'}")
    if args.html:
        from gemma_scope_pz.circuits.html import render_graph

        page = render_graph(
            graph, out / f"{args.slug}.html", model, transcoders, tok,
            node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
        )  # fmt: skip
        print(f"wrote {page}")
