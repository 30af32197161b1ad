"""HTML escaping and token highlighting: the one place that turns text and per-token values into HTML.

`escape` escapes any value for text or attribute use; `escape_token` also makes invisible characters
visible (newline "↵", tab "⇥", carriage return "␍", the empty token "∅"). `token_span` draws one
token on a background whose opacity is ``alpha`` (orange for positive values, blue for negative)
with the value in its tooltip; `token_alphas` maps values to opacities. `highlight_tokens` returns a
self-contained ``<div>`` of a whole sequence and `display_tokens` wraps it for notebooks. The
feature cards (`gemma_scope_pz.analysis.cards`) and the tour report draw their tokens through here.

BOS never sets the colour scale: `highlight_tokens` leaves position 0 uncoloured by default (its
activation, often ten times any real token's, would make every other token nearly transparent).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

POSITIVE_RGB = "255, 140, 0"
NEGATIVE_RGB = "30, 120, 255"
TOKEN_CLASS = "gs-tok"


def escape(value: Any) -> str:
    """``str(value)`` escaped for HTML text and quoted attribute values."""
    return html.escape(str(value), quote=True)


def escape_token(text: str, *, line_breaks: bool = False) -> str:
    """Escaped token text with whitespace made visible.

    Args:
      text: The decoded token.
      line_breaks: Keep a real line break after "↵" (and a tab after "⇥"), for ``pre-wrap`` text
        that should flow like the original; otherwise the token stays on one line.
    """
    if text == "":
        return '<span style="opacity:0.5">∅</span>'
    newline, tab = ("↵\n", "⇥\t") if line_breaks else ("↵", "⇥")
    return escape(text).replace("\r", "␍").replace("\n", newline).replace("\t", tab)


def token_alphas(values, *, max_value: float | None = None, mask=None) -> np.ndarray:
    """Opacity in [0, 1] per token: ``|value| / max_value``, clipped; 0 where masked out or NaN.

    ``max_value`` defaults to the largest ``|value|`` over the counted (``mask``) positions.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    counted = np.ones(values.shape, bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    if counted.shape != values.shape:
        raise ValueError(f"got {len(values)} values but a mask of {len(counted)} positions")
    magnitude = np.where(counted & np.isfinite(values), np.abs(values), 0.0)
    scale = float(magnitude.max()) if max_value is None and len(values) else max_value
    scale = float(scale) if scale else 1.0
    return np.clip(magnitude / scale, 0.0, 1.0)


def token_span(
    text: str, value: float, alpha: float, *, css_class: str = "", line_breaks: bool = False
) -> str:
    """One token as ``<span class=… style=… title=…>`` shaded by ``alpha``; tooltip ``'text': value``."""
    rgb = NEGATIVE_RGB if value < 0 else POSITIVE_RGB
    classes = f"{TOKEN_CLASS} {css_class}".strip()
    tooltip = escape(f"{text!r}: {float(value):.4g}")
    return (
        f'<span class="{classes}" style="background-color: rgba({rgb}, {alpha:.3f})" '
        f'title="{tooltip}">{escape_token(text, line_breaks=line_breaks)}</span>'
    )


def highlight_tokens(
    token_strings: Sequence[str],
    values,
    *,
    title: str | None = None,
    max_value: float | None = None,
    exclude_bos: bool = True,
    mask=None,
) -> str:
    """HTML ``<div>`` highlighting each token by its value (escaped, safe to embed in a page).

    Args:
      token_strings: The decoded text of each token.
      values: One number per token (a 1-D array-like of the same length).
      title: Optional heading shown above the text (escaped).
      max_value: The value that maps to full colour; defaults to the largest ``|value|`` over the
        counted tokens. Larger magnitudes are clipped.
      exclude_bos: Position 0 (BOS) is left uncoloured and does not set the scale.
      mask: Optional bool per token: tokens where it is False are left uncoloured and do not set
        the scale (e.g. `gemma_scope_pz.scope.tokens.token_mask`); combined with ``exclude_bos``.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) != len(token_strings):
        raise ValueError(f"got {len(token_strings)} tokens but {len(values)} values")
    counted = np.ones(len(values), bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    if counted.shape != values.shape:
        raise ValueError(f"got {len(values)} values but a mask of {len(counted)} positions")
    if exclude_bos and len(counted):
        counted = counted.copy()
        counted[0] = False
    alphas = token_alphas(values, max_value=max_value, mask=counted)
    body = "".join(
        token_span(token, value, alpha, line_breaks=True)
        for token, value, alpha in zip(token_strings, values, alphas, strict=True)
    )
    heading = f"<div><b>{escape(title)}</b></div>" if title else ""
    return (
        '<div class="gemma-scope-tokens" style="font-family: monospace; line-height: 1.6;">'
        f'{heading}<div style="white-space: pre-wrap;">{body}</div></div>'
    )


def display_tokens(token_strings: Sequence[str], values, **options):
    """`highlight_tokens` (same keyword options) as an ``IPython.display.HTML`` object, or the
    string when IPython is not installed."""
    snippet = highlight_tokens(token_strings, values, **options)
    try:
        from IPython.display import HTML
    except ImportError:
        return snippet
    return HTML(snippet)
