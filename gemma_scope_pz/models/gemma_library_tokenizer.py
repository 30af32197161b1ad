"""An adapter giving ``gemma`` library tokenizers the SentencePieceProcessor interface.

:meth:`gemma_scope_pz.models.tokenizer.Gemma3Tokenizer.from_gemma` wraps a tokenizer's own
``SentencePieceProcessor`` when it has one; tokenizers without one (look-alikes that only offer
``encode``/``decode`` and a ``tokens`` list) go through :class:`DelegatingProcessor`.
"""

from __future__ import annotations

from typing import Any

from gemma_scope_pz.models.special_tokens import (
    BYTE_PIECE,
    CONTROL_PIECES,
    GEMMA3_VOCAB_SIZE,
    UNK_ID,
)

__all__ = ["DelegatingProcessor"]


class DelegatingProcessor:
    """The SentencePieceProcessor methods ``Gemma3Tokenizer`` uses, forwarded to ``tok``.

    Attributes:
      has_pieces: whether ``tok`` has a ``tokens`` list, needed for the piece look-ups
        (``id_to_piece``, ``piece_to_id``, ``is_byte``, ``is_control``).
    """

    def __init__(self, tok: Any):
        """Wraps ``tok``: ``tok.encode(text, add_bos=False)``, ``tok.decode(ids)``, optionally
        ``tok.tokens`` (the pieces) and ``tok.vocab_size`` (default: the number of pieces, else
        Gemma 3's 262144)."""
        self._tok = tok
        tokens = getattr(tok, "tokens", None)
        self._pieces = [str(p) for p in tokens] if tokens is not None else None
        size = getattr(tok, "vocab_size", None)
        if size is None:
            size = len(self._pieces) if self._pieces is not None else GEMMA3_VOCAB_SIZE
        self._size = int(size)
        self.has_pieces = self._pieces is not None
        self._index = {p: i for i, p in enumerate(self._pieces)} if self._pieces else None

    def get_piece_size(self) -> int:
        return self._size

    def encode(self, text: str | list[str]) -> list[int] | list[list[int]]:
        if isinstance(text, list):
            return [self.encode(t) for t in text]
        return [int(i) for i in self._tok.encode(text, add_bos=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def id_to_piece(self, i: int) -> str:
        if self._pieces is None:
            raise TypeError(f"{type(self._tok).__name__} has no .tokens list: pieces unavailable")
        return self._pieces[i]

    def piece_to_id(self, piece: str) -> int:
        self.id_to_piece(0)
        return self._index.get(piece, UNK_ID)

    def is_byte(self, i: int) -> bool:
        return self._pieces is not None and BYTE_PIECE.fullmatch(self._pieces[i]) is not None

    def is_control(self, i: int) -> bool:
        return self._pieces is not None and self._pieces[i] in CONTROL_PIECES

    def is_unknown(self, i: int) -> bool:
        return i == UNK_ID
