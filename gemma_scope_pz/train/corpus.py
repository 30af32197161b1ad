"""Deprecated: corpora moved to ``gemma_scope_pz.data.corpus`` (this alias goes in the next release)."""

import warnings

from gemma_scope_pz.data.corpus import (
    Corpus,
    as_corpus,
    default_corpus,
    hash_documents,
    load_corpus,
)

warnings.warn(
    "gemma_scope_pz.train.corpus moved to gemma_scope_pz.data.corpus "
    "(or use gemma_scope_pz.load_corpus)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["Corpus", "as_corpus", "default_corpus", "hash_documents", "load_corpus"]
