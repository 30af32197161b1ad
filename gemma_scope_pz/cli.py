"""Deprecated alias of :mod:`gemma_scope_pz.app.cli` (kept one release); use ``gemma-scope-pz`` or
``python -m gemma_scope_pz``."""

import sys
import warnings

from gemma_scope_pz.app.cli import build_parser, main

__all__ = ["build_parser", "main"]

warnings.warn(
    "gemma_scope_pz.cli moved to gemma_scope_pz.app.cli; run `python -m gemma_scope_pz`",
    DeprecationWarning,
    stacklevel=2,
)

if __name__ == "__main__":
    sys.exit(main())
