"""Deprecated: `gemma_scope_pz.scope.gemma_scope_2` moved to `gemma_scope_pz.scope.formats.gemma_scope_2`.

Kept for one release so that existing imports keep working; import from the new place.
"""

from __future__ import annotations

import warnings

from gemma_scope_pz.scope.formats.gemma_scope_2 import *  # noqa: F403
from gemma_scope_pz.scope.formats.gemma_scope_2 import __all__  # noqa: F401

warnings.warn(
    "gemma_scope_pz.scope.gemma_scope_2 is deprecated; import from gemma_scope_pz.scope.formats.gemma_scope_2",
    DeprecationWarning,
    stacklevel=2,
)
