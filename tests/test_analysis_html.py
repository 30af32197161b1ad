"""Escaping and token highlighting (analysis/html.py), and the deprecated scope.highlight alias."""

import importlib
import re
import sys

import numpy as np
import pytest

from gemma_scope_pz.analysis.html import (
    display_tokens,
    escape,
    escape_token,
    highlight_tokens,
    token_alphas,
)

SPAN = re.compile(
    r'<span class="gs-tok" style="background-color: rgba\(([\d, ]+), ([\d.]+)\)" title="([^"]*)">'
)


def test_escape_and_visible_whitespace():
    assert escape('<a href="x">\'&') == "&lt;a href=&quot;x&quot;&gt;&#x27;&amp;"
    assert escape_token("a\nb\tc\r") == "a↵b⇥c␍"
    assert escape_token("a\nb\tc", line_breaks=True) == "a↵\nb⇥\tc"
    assert escape_token("<b>") == "&lt;b&gt;" and "∅" in escape_token("")


def test_highlight_escapes_and_scales():
    tokens = ["<bos>", "<script>alert(1)</script>", " and", "\n", "&amp;", '"q"', ""]
    values = np.array([40.0, 2.0, 1.0, 0.0, -4.0, np.nan, 8.0])
    out = highlight_tokens(tokens, values, title="<b>latent 7</b>", max_value=4.0)
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert "&lt;b&gt;latent 7&lt;/b&gt;" in out
    assert "&amp;amp;" in out and "↵" in out and "∅" in out
    spans = SPAN.findall(out)
    assert len(spans) == len(tokens)
    alphas = [float(a) for _, a, _ in spans]
    # BOS uncoloured, then |v| / max_value clipped, NaN -> 0
    assert alphas == [0.0, 0.5, 0.25, 0.0, 1.0, 0.0, 1.0]
    assert spans[4][0] != spans[1][0]  # negative values use another colour
    assert "2" in spans[1][2] and "&lt;script&gt;" in spans[1][2]  # tooltip: token and value
    assert "40" in spans[0][2]  # BOS keeps its value in the tooltip
    with pytest.raises(ValueError, match="2 tokens but 3 values"):
        highlight_tokens(["a", "b"], [1, 2, 3])


def test_bos_never_sets_the_colour_scale():
    """Issue 10: BOS at ~35 made real tokens nearly transparent."""
    values = [35.0, 2.0, 4.0, 1.0]
    default = [float(a) for _, a, _ in SPAN.findall(highlight_tokens(list("abcd"), values))]
    assert default == [0.0, 0.5, 1.0, 0.25]
    raw = highlight_tokens(list("abcd"), values, exclude_bos=False)
    assert [float(a) for _, a, _ in SPAN.findall(raw)] == pytest.approx(
        [1.0, 2 / 35, 4 / 35, 1 / 35], abs=1e-3
    )
    masked = highlight_tokens(list("abcd"), values, mask=[True, True, False, True])
    assert [float(a) for _, a, _ in SPAN.findall(masked)] == [0.0, 1.0, 0.0, 0.5]
    np.testing.assert_allclose(token_alphas([1.0, -3.0, 6.0], max_value=3.0), [1 / 3, 1.0, 1.0])
    with pytest.raises(ValueError, match="3 values but a mask of 2 positions"):
        token_alphas([1, 2, 3], mask=[True, False])


def test_display_tokens():
    shown = display_tokens(["x", "y"], [1.0, 2.0])
    assert "y" in (shown if isinstance(shown, str) else shown.data)


def test_deprecated_alias_warns_and_reexports():
    sys.modules.pop("gemma_scope_pz.scope.highlight", None)
    with pytest.warns(DeprecationWarning, match=r"analysis\.html"):
        old = importlib.import_module("gemma_scope_pz.scope.highlight")
    assert old.highlight_tokens_html is highlight_tokens
    assert old.display_tokens is display_tokens
