"""Deprecated: the offline default corpus moved to ``gemma_scope_pz.data`` (``data.corpus.
default_corpus`` and, for its texts, ``data.offline``); this alias goes in the next release."""

import warnings

from gemma_scope_pz.data.corpus import default_corpus
from gemma_scope_pz.data.offline import (
    DEFAULT_CORPUS_NAME,
    DEPENDENCY_PACKAGES,
    build_default_documents,
)

warnings.warn(
    "gemma_scope_pz.train.default_corpus moved to gemma_scope_pz.data.corpus (default_corpus) "
    "and gemma_scope_pz.data.offline",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "DEFAULT_CORPUS_NAME",
    "DEPENDENCY_PACKAGES",
    "build_default_documents",
    "default_corpus",
]
