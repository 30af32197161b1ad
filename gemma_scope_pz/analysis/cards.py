"""Offline HTML feature cards (a small, self-contained Neuronpedia-like page).

`write_feature_cards` writes ONE HTML file with inline CSS, a few lines of
inline JavaScript for filtering and an inline SVG histogram
(`gemma_scope_pz.analysis.plots.density_histogram_svg`); it references no
external URL, so it opens offline.  Each card shows a feature's density,
mean/max activation, its max-activating contexts with tokens shaded by
activation (hover for values, the peak token outlined) and, optionally, the
logit-lens top and bottom tokens.  All text (token strings included) is escaped
and tokens are drawn by `gemma_scope_pz.analysis.html`.

`FeatureReport` holds one feature's data on the host; it renders as a card in
Jupyter (`_repr_html_`) and as a plain dataclass in treescope.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gemma_scope_pz.analysis.examples import Example
from gemma_scope_pz.analysis.html import escape, escape_token, token_alphas, token_span
from gemma_scope_pz.analysis.plots import density_histogram_svg
from gemma_scope_pz.analysis.stats import FeatureStats
from gemma_scope_pz.io import write_atomically

TokenStrings = Callable[[Sequence[int]], list[str]]
LogitLens = Mapping[int, tuple[Sequence[tuple[str, float]], Sequence[tuple[str, float]]]]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1f2328;background:#f6f8fa}
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:0}h3{font-size:12px;margin:10px 0 4px;color:#57606a;text-transform:uppercase;letter-spacing:.04em}
.meta{border-collapse:collapse;font-size:12px;margin-bottom:12px}.meta td{padding:1px 10px 1px 0}.meta td:first-child{color:#57606a}
.overview{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 16px;margin-bottom:14px;display:flex;gap:24px;align-items:center;flex-wrap:wrap}
.summary{font-size:13px;line-height:1.6}
.controls{margin:0 0 12px;font-size:13px}.controls input{font-size:14px;padding:4px 8px;width:320px;border:1px solid #d0d7de;border-radius:6px}
.fc-card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 16px;margin-bottom:14px}
.fc-head{display:flex;gap:10px;align-items:baseline;flex-wrap:wrap}
.fc-badge{font-size:11px;padding:1px 7px;border-radius:10px;color:#fff}.fc-dead{background:#8c959f}.fc-dense{background:#cf222e}
.fc-stats{font-size:13px;color:#57606a}.fc-stats b{color:#1f2328;font-weight:600}
.fc-body{display:flex;gap:18px;flex-wrap:wrap}.fc-contexts{flex:3 1 560px;min-width:0}.fc-logits{flex:1 1 220px}
.fc-ctx{display:flex;gap:8px;align-items:baseline;border-top:1px solid #eaeef2;padding:3px 0}
.fc-val{font:12px ui-monospace,monospace;color:#57606a;min-width:56px;text-align:right}
.fc-text{font:13px/1.7 ui-monospace,SFMono-Regular,Menlo,monospace;white-space:pre-wrap;word-break:break-word;flex:1}
.fc-src{font-size:11px;color:#8c959f;white-space:nowrap}
.gs-tok{border-radius:2px;-webkit-box-decoration-break:clone;box-decoration-break:clone}.fc-peak{outline:2px solid #bc4c00;font-weight:700}
.fc-none{font-size:13px;color:#8c959f;font-style:italic}
.fc-lens{border-collapse:collapse;font:12px ui-monospace,monospace;width:100%}.fc-lens td{padding:1px 4px}
.fc-lens td:last-child{text-align:right}.fc-pos{background:#dafbe1}.fc-neg{background:#ffebe9}
"""

FILTER_JS = """
(function(){var q=document.getElementById('fc-filter'),n=document.getElementById('fc-count');
function run(){var v=q.value.trim().toLowerCase(),shown=0;
document.querySelectorAll('.fc-card').forEach(function(c){
var ok=!v||c.dataset.feature===v||c.textContent.toLowerCase().indexOf(v)>=0;
c.style.display=ok?'':'none';if(ok)shown++;});n.textContent=shown+' shown';}
q.addEventListener('input',run);run();})();
"""


def _fmt(value: float | None, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


@dataclasses.dataclass(frozen=True, eq=False)  # holds numpy arrays
class FeatureReport:
    """Everything shown on one feature card, on the host.

    Attributes:
      feature: latent index.
      stats: per-feature statistics (`FeatureStats.feature`), or None.
      examples: max-activating contexts, best first.
      example_strings: decoded token strings, one tuple per example.
      logit_top: logit-lens tokens with the largest values, ``(string, value)``.
      logit_bottom: logit-lens tokens with the smallest values.
    """

    feature: int
    stats: dict[str, Any] | None
    examples: tuple[Example, ...]
    example_strings: tuple[tuple[str, ...], ...]
    logit_top: tuple[tuple[str, float], ...] = ()
    logit_bottom: tuple[tuple[str, float], ...] = ()

    @classmethod
    def build(
        cls,
        feature: int,
        examples: Any,
        stats: FeatureStats | None,
        token_strings: TokenStrings,
        logit_lens: LogitLens | None = None,
        n_examples: int | None = None,
    ) -> FeatureReport:
        """Collects one feature's data.

        Args:
          feature: latent index.
          examples: a `MaxActivatingExamples` state or a list of `Example`.
          stats: `FeatureStats` or None.
          token_strings: maps a list of token ids to one display string per token.
          logit_lens: optional ``{feature: (top, bottom)}`` lists of ``(string, value)``.
          n_examples: show at most this many contexts.
        """
        chosen = examples.top(feature) if hasattr(examples, "top") else list(examples)
        chosen = tuple(chosen[:n_examples] if n_examples is not None else chosen)
        strings = []
        for ex in chosen:
            decoded = [str(s) for s in token_strings([int(t) for t in ex.window_tokens])]
            if len(decoded) != len(ex.window_tokens):
                raise ValueError(
                    f"token_strings returned {len(decoded)} strings for {len(ex.window_tokens)} tokens "
                    f"(feature {feature}, row {ex.row})"
                )
            strings.append(tuple(decoded))
        top, bottom = (logit_lens or {}).get(feature, ((), ()))
        return cls(
            feature=int(feature),
            stats=stats.feature(feature) if stats is not None else None,
            examples=chosen,
            example_strings=tuple(strings),
            logit_top=tuple((str(s), float(v)) for s, v in top),
            logit_bottom=tuple((str(s), float(v)) for s, v in bottom),
        )

    def to_html(self) -> str:
        """The card as an HTML fragment (classes styled by `CSS`)."""
        st = self.stats or {}
        badges = ""
        if st.get("dead"):
            badges += '<span class="fc-badge fc-dead">dead</span>'
        if st.get("dense"):
            badges += '<span class="fc-badge fc-dense">dense</span>'
        stat_line = ""
        if st:
            stat_line = (
                f'<span class="fc-stats">density <b>{_fmt(st["density"], ".3e")}</b> '
                f"({st['fire_count']} tokens) · mean act <b>{_fmt(st['mean_activation'])}</b> · "
                f"max act <b>{_fmt(st['max_activation'])}</b></span>"
            )
        parts = [
            f'<article class="fc-card" id="feature-{self.feature}" data-feature="{self.feature}">',
            f'<div class="fc-head"><h2>Feature {self.feature}</h2>{badges}{stat_line}</div>',
            '<div class="fc-body"><div class="fc-contexts"><h3>Top activating contexts</h3>',
        ]
        scale = max((ex.value for ex in self.examples), default=0.0)
        for ex, strings in zip(self.examples, self.example_strings, strict=True):
            parts.append(_context_html(ex, strings, scale))
        if not self.examples:
            parts.append('<div class="fc-none">no activating context</div>')
        parts.append("</div>")
        if self.logit_top or self.logit_bottom:
            parts.append('<div class="fc-logits">')
            parts.append(_lens_html("Logit lens: top", self.logit_top, "fc-pos"))
            parts.append(_lens_html("Logit lens: bottom", self.logit_bottom, "fc-neg"))
            parts.append("</div>")
        parts.append("</div></article>")
        return "".join(parts)

    def _repr_html_(self) -> str:
        return f"<style>{CSS}</style>{self.to_html()}"


def _context_html(ex: Example, strings: Sequence[str], scale: float) -> str:
    alphas = token_alphas(np.maximum(ex.window_values, 0.0), max_value=scale if scale > 0 else None)
    spans = "".join(
        token_span(token, value, alpha, css_class="fc-peak" if i == ex.peak_index else "")
        for i, (token, value, alpha) in enumerate(
            zip(strings, ex.window_values, alphas, strict=True)
        )
    )
    return (
        f'<div class="fc-ctx"><span class="fc-val">{_fmt(ex.value, ".3f")}</span>'
        f'<span class="fc-text">{spans}</span>'
        f'<span class="fc-src">row {ex.row} · pos {ex.position}</span></div>'
    )


def _lens_html(title: str, rows: Sequence[tuple[str, float]], cls: str) -> str:
    body = "".join(
        f'<tr class="{cls}"><td>{escape_token(s)}</td><td>{v:+.3f}</td></tr>' for s, v in rows
    )
    return f'<h3>{escape(title)}</h3><table class="fc-lens">{body}</table>'


def feature_card_html(
    feature: int,
    examples: Any,
    stats: FeatureStats | None,
    token_strings: TokenStrings,
    logit_lens: LogitLens | None = None,
    *,
    n_examples: int | None = None,
    standalone: bool = True,
) -> str:
    """HTML of a single feature card (with its CSS when ``standalone``), e.g. for a notebook.

    Arguments as in `FeatureReport.build`.
    """
    report = FeatureReport.build(feature, examples, stats, token_strings, logit_lens, n_examples)
    return report._repr_html_() if standalone else report.to_html()


def _overview_html(stats: FeatureStats) -> str:
    """The page's summary box: density histogram and dead/dense counts."""
    s = stats.summary()
    return (
        f'<section class="overview">{density_histogram_svg(stats)}<div class="summary">'
        f"<b>{s['n_features']}</b> features · <b>{s['n_tokens']}</b> tokens<br>"
        f"dead (never fired): <b>{s['n_dead']}</b><br>"
        f"dense (density &gt; {escape(_fmt(s['dense_threshold']))}): <b>{s['n_dense']}</b><br>"
        f"median density of live features: <b>{escape(_fmt(s['median_live_density'], '.3e'))}</b>"
        "</div></section>"
    )


def write_feature_cards(
    path: str | os.PathLike,
    features: Sequence[int],
    examples: Any,
    stats: FeatureStats | None,
    token_strings: TokenStrings,
    logit_lens: LogitLens | None = None,
    title: str = "Feature cards",
    meta: Mapping[str, Any] | None = None,
    *,
    n_examples: int | None = None,
) -> Path:
    """Writes a self-contained HTML page of feature cards, atomically.

    Args:
      path: output .html file.
      features: latent indices to show, in order.
      examples: `MaxActivatingExamples` state (anything with ``top(feature)``).
      stats: `FeatureStats` for the whole SAE (density histogram and per-card
        numbers); if None and ``examples`` has counters, computed from them.
      token_strings: maps a list of token ids to one display string per token.
      logit_lens: optional ``{feature: (top, bottom)}`` lists of ``(string, value)``.
      title: page title.
      meta: extra key/value pairs shown in a table under the title (SAE id, site, ...).
      n_examples: contexts shown per feature (default: all kept).

    Returns:
      The written path.
    """
    if stats is None and hasattr(examples, "fire_counts"):
        stats = FeatureStats.from_examples(examples)
    n_features = stats.n_features if stats is not None else getattr(examples, "n_features", None)
    for f in features:
        if n_features is not None and not 0 <= int(f) < n_features:
            raise IndexError(f"write_feature_cards: feature {f} out of range [0, {n_features})")
    cards = [
        FeatureReport.build(
            int(f), examples, stats, token_strings, logit_lens, n_examples
        ).to_html()
        for f in features
    ]
    meta_rows = "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(v)}</td></tr>" for k, v in (meta or {}).items()
    )
    overview = _overview_html(stats) if stats is not None else ""
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{escape(title)}</h1><table class="meta">{meta_rows}</table>{overview}'
        '<div class="controls"><input id="fc-filter" type="search" '
        'placeholder="filter: feature id or text" aria-label="filter cards"> '
        f'<span id="fc-count">{len(cards)} cards</span></div>'
        f'<main id="fc-cards">{"".join(cards)}</main><script>{FILTER_JS}</script></body></html>\n'
    )
    return write_atomically(path, page)
