"""Token highlighting: show per-token values (e.g. a latent's activation) as coloured text.

`highlight_tokens_html` returns a self-contained HTML snippet: one ``<span>`` per token
whose background opacity is proportional to ``|value| / max_value`` (orange for positive,
blue for negative values) and whose tooltip shows the value. Token text is HTML-escaped;
newlines are drawn as "↵" followed by a line break and tabs as "→", and spaces are kept
(``white-space: pre-wrap``). `display_tokens` wraps the snippet for notebooks.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np

_POSITIVE_RGB = "255, 140, 0"
_NEGATIVE_RGB = "30, 120, 255"


def _visible(token: str) -> str:
    """Escaped token text with newlines and tabs made visible."""
    if token == "":
        return '<span style="opacity:0.5">∅</span>'
    text = html.escape(token)
    return text.replace("\t", "→\t").replace("\r\n", "↵\n").replace("\n", "↵\n")


def highlight_tokens_html(
    token_strings: Sequence[str],
    values: np.ndarray,
    *,
    title: str | None = None,
    max_value: float | None = None,
) -> str:
    """HTML snippet highlighting each token by its value.

    Args:
      token_strings: The decoded text of each token.
      values: One number per token (a 1-D array-like of the same length).
      title: Optional heading shown above the text (escaped).
      max_value: The value that maps to full colour; defaults to ``max(|values|)``.
        Larger magnitudes are clipped.

    Returns:
      A ``<div>`` string safe to embed in a page.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) != len(token_strings):
        raise ValueError(f"got {len(token_strings)} tokens but {len(values)} values")
    finite = np.where(np.isfinite(values), values, 0.0)
    scale = float(np.max(np.abs(finite))) if max_value is None and len(values) else max_value
    scale = float(scale) if scale else 1.0
    alphas = np.clip(np.abs(finite) / scale, 0.0, 1.0)
    spans = []
    for token, value, alpha in zip(token_strings, values, alphas, strict=True):
        rgb = _NEGATIVE_RGB if value < 0 else _POSITIVE_RGB
        tooltip = html.escape(f"{token!r}: {value:.4g}", quote=True)
        spans.append(
            f'<span title="{tooltip}" style="background-color: rgba({rgb}, {alpha:.3f}); '
            f'border-radius: 2px;">{_visible(token)}</span>'
        )
    heading = f"<div><b>{html.escape(title)}</b></div>" if title else ""
    body = "".join(spans)
    return (
        '<div class="gemma-scope-tokens" style="font-family: monospace; line-height: 1.6;">'
        f'{heading}<div style="white-space: pre-wrap;">{body}</div></div>'
    )


def display_tokens(
    token_strings: Sequence[str],
    values: np.ndarray,
    *,
    title: str | None = None,
    max_value: float | None = None,
):
    """`highlight_tokens_html` as an ``IPython.display.HTML`` object (the string without IPython)."""
    snippet = highlight_tokens_html(token_strings, values, title=title, max_value=max_value)
    try:
        from IPython.display import HTML
    except ImportError:
        return snippet
    return HTML(snippet)
