"""Deprecated alias of `gemma_scope_pz.analysis.html` (token highlighting moved there); kept one release.

``highlight_tokens_html`` is now `gemma_scope_pz.analysis.html.highlight_tokens`; ``display_tokens``
keeps its name.
"""

from __future__ import annotations

import warnings

from gemma_scope_pz.analysis.html import display_tokens
from gemma_scope_pz.analysis.html import highlight_tokens as highlight_tokens_html

__all__ = ["display_tokens", "highlight_tokens_html"]

warnings.warn(
    "gemma_scope_pz.scope.highlight is deprecated: import highlight_tokens and display_tokens "
    "from gemma_scope_pz.analysis.html",
    DeprecationWarning,
    stacklevel=2,
)
