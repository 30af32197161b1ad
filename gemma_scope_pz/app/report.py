"""The tour's HTML report: one self-contained page plus the feature cards page it links to."""

from __future__ import annotations

import html
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

import gemma_scope_pz as gs
from gemma_scope_pz.io import write_atomically

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}code,pre{background:#f6f6f6;padding:2px 4px;border-radius:3px}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}.muted{color:#777}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _metrics_table(rows: dict[str, dict]) -> str:
    keys = [
        "fvu",
        "l0",
        "ce_clean",
        "ce_spliced",
        "delta_loss",
        "ce_recovered",
        "kl",
        "n_tokens",
        "dead_fraction",
    ]
    head = "".join(f"<th>{_e(k)}</th>" for k in ["dictionary", *keys])
    body = ""
    for name, metrics in rows.items():
        cells = "".join(
            f"<td>{metrics[k]:.4g}</td>"
            if isinstance(metrics[k], float)
            else f"<td>{_e(metrics[k])}</td>"
            for k in keys
        )
        body += f"<tr><td>{_e(name)}</td>{cells}</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def _feature_on_sentence(tokens: list[str], values: np.ndarray, feature: int) -> str:
    """The feature's activation as highlighted text and as a bar chart (BOS left out of both)."""
    return gs.highlight_tokens(
        tokens, values, title=f"activation of feature #{feature}"
    ) + gs.activation_svg(tokens, values, title=f"Feature #{feature} along the sentence")


def _loss_plot(losses: dict | None) -> str:
    """Per-token loss, clean vs SAE spliced in, from ``{"tokens", "clean", "spliced"}`` if given."""
    if not losses:
        return ""
    return "<h3>Per-token loss with the SAE spliced in</h3>" + gs.token_loss_svg(
        losses["tokens"],
        losses["clean"],
        losses["spliced"],
        title="Per-token loss: clean vs spliced",
    )


def _circuit(circuit: dict | None) -> str:
    """The attribution-graph section (step 7), if the tour ran it."""
    if not circuit:
        return ""
    return (
        f"<h2>Circuit</h2><p>Attribution graph of <code>{_e(circuit['prompt'])}</code>: "
        f"{circuit['feature_nodes']} feature nodes, replacement score "
        f"{circuit['replacement']:.3f}, completeness {circuit['completeness']:.3f}. "
        f"<a href='{_e(circuit['html'])}'>Open the graph</a>.</p><p>Strongest path: "
        + " → ".join(f"<code>{_e(p)}</code>" for p in circuit["path"])
        + f"</p><p>Ablating <code>{_e(circuit['ablated_label'])}</code>: log p("
        f"<code>{_e(circuit['logit'])}</code>) {circuit['log_p_before']:.3f} → "
        f"{circuit['log_p_after']:.3f}</p>"
    )


def write_report(
    out_dir: str | os.PathLike,
    *,
    summary: dict,
    sentence_tokens: Sequence[str],
    sentence_latents: np.ndarray,
    features: Sequence[int],
    examples,
    stats,
    token_strings: Callable[[Sequence[int]], list[str]],
    lens: dict[int, tuple[list, list]],
) -> pathlib.Path:
    """Writes ``report.html`` and ``feature_cards.html`` into ``out_dir``; returns the report path."""
    out_dir = pathlib.Path(out_dir)
    cards = gs.write_cards(
        out_dir / "feature_cards.html",
        list(features),
        examples,
        stats,
        token_strings,
        lens,
        title="Gemma Scope tour: feature cards",
        meta={"dictionaries": summary.get("dictionaries", "")},
    )
    strongest = summary["strongest_feature"]
    values = np.array(sentence_latents[:, strongest], dtype=np.float32)
    lens_s = summary["logit_lens"]
    steer = summary["steering"]
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Gemma Scope tour</title><style>{_STYLE}</style></head><body>",
        "<h1>Gemma Scope tour</h1>",
        f"<p class='muted'>Dictionaries: {_e(summary.get('dictionaries', ''))}</p>",
        "<h2>Model</h2>",
        "<p>Next-token predictions after <code>The capital of France is</code>: "
        + ", ".join(f"<code>{_e(t)}</code> {p:.2f}" for t, p in summary["next_tokens"])
        + "</p>",
        f"<p>Greedy continuation: <code>The capital of France is{_e(summary['greedy'])}</code></p>",
        "<h2>Reconstruction metrics (held-out text)</h2>",
        _metrics_table(
            {"SAE": summary["sae_metrics"], "transcoder": summary["transcoder_metrics"]}
        ),
        f"<h2>Feature #{strongest} on the sentence</h2>",
        _feature_on_sentence(list(sentence_tokens), values, strongest),
        _loss_plot(summary.get("token_losses")),
        "<h3>Logit lens</h3><p>Promotes: "
        + " ".join(f"<code>{_e(t)}</code>" for t, _ in lens_s["top"])
        + "</p><p>Suppresses: "
        + " ".join(f"<code>{_e(t)}</code>" for t, _ in lens_s["bottom"])
        + "</p>",
        f"<h3>Steering (coefficient {steer['coeff']} × ‖x‖ along feature #{strongest})</h3>",
        f"<p>Without: <code>{_e(steer['prompt'] + steer['plain'])}</code></p>",
        f"<p>With: <code>{_e(steer['prompt'] + steer['steered'])}</code></p>",
        f"<h2>Feature cards</h2><p><a href='{_e(cards.name)}'>{len(features)} feature cards</a> "
        "with max-activating contexts, logit lens and the density histogram.</p>",
        _circuit(summary.get("circuit")),
        "</body></html>",
    ]
    report = out_dir / "report.html"
    write_atomically(report, "\n".join(parts))
    return report
