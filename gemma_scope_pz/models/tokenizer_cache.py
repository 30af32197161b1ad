"""The on-disk cache of SentencePiece models built from GGUF vocabularies.

Building Gemma 3's 262144-piece model from GGUF metadata takes a few seconds, so
:meth:`gemma_scope_pz.models.tokenizer.Gemma3Tokenizer.from_gguf` stores the serialized model
as ``<cache_dir>/tokenizer-<hash>.model``, keyed by a digest of the vocabulary metadata and the
version of the GGUF-to-SentencePiece mapping.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from gemma_scope_pz.io import default_cache_dir

__all__ = ["default_cache_dir", "model_cache_path"]

# Bump when the GGUF -> SentencePiece mapping changes, so stale cached models are not reused.
_BUILDER_VERSION = 1


def model_cache_path(vocab_digest: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the model built from a vocabulary with digest ``vocab_digest`` is cached.

    Args:
      vocab_digest: the ``"_digest"`` of ``read_gguf_tokenizer_metadata``.
      cache_dir: the cache folder (default :func:`default_cache_dir`).
    """
    key = hashlib.sha256(f"{vocab_digest}/v{_BUILDER_VERSION}".encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"tokenizer-{key}.model"
