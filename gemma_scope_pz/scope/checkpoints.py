"""Deprecated: `gemma_scope_pz.scope.checkpoints` moved to `gemma_scope_pz.scope.formats`.

Kept for one release so that existing imports keep working; import from the new place.
"""

from __future__ import annotations

import warnings

from gemma_scope_pz.scope.formats import *  # noqa: F403
from gemma_scope_pz.scope.formats import __all__  # noqa: F401

warnings.warn(
    "gemma_scope_pz.scope.checkpoints is deprecated; import from gemma_scope_pz.scope.formats",
    DeprecationWarning,
    stacklevel=2,
)
