"""The Gemma 3 tokenizer: a SentencePiece BPE model with byte fallback.

The tokenizer can be loaded from Gemma's own ``tokenizer.model`` file, wrapped around the
``gemma`` library's ``gm.text.Gemma3Tokenizer``, or rebuilt from the vocabulary stored in a
GGUF file's metadata (``tokenizer.ggml.*``), which is what the offline default does::

    tok = load_tokenizer()                       # offline Gemma 3 270M GGUF
    tok.encode("Hello world!")                   # [2, 9259, 1902, 236888]
    tok.split("Hello world!")                    # ['Hello', ' world', '!']
    tok.encode(format_chat("Hi"))                # [2, 105, 2364, 107, ...]

Rebuilding from a GGUF (:mod:`gemma_scope_pz.models.gguf_vocab`) produces a real
``sentencepiece`` model proto (one piece per token, with Gemma's normalizer settings) which is
cached under ``~/.cache/gemma_scope_pz`` keyed by a hash of the vocabulary, so only the first
load pays for building it. The chat template lives in :mod:`gemma_scope_pz.models.chat_template`
and is re-exported here, as are the GGUF vocabulary functions and the special token ids.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from gemma_scope_pz.io import write_atomically
from gemma_scope_pz.models.chat_template import format_chat
from gemma_scope_pz.models.gemma_library_tokenizer import DelegatingProcessor
from gemma_scope_pz.models.gguf_vocab import (
    read_gguf_tokenizer_metadata,
    sentencepiece_proto_from_gguf_metadata,
)
from gemma_scope_pz.models.sources import find_tokenizer_file, resolve_default_gguf, resolve_source
from gemma_scope_pz.models.special_tokens import (
    BOS_ID,
    BYTE_PIECE,
    END_OF_TURN_ID,
    EOS_ID,
    EXPECTED_PIECES,
    PAD_ID,
    SPACE_SYMBOL,
    START_OF_TURN_ID,
    UNK_ID,
)
from gemma_scope_pz.models.token_ids import check_token_ids, pad_rows
from gemma_scope_pz.models.tokenizer_cache import default_cache_dir, model_cache_path

__all__ = [
    "BOS_ID",
    "END_OF_TURN_ID",
    "EOS_ID",
    "PAD_ID",
    "START_OF_TURN_ID",
    "UNK_ID",
    "Gemma3Tokenizer",
    "as_tokenizer",
    "chat_prefix_length",
    "default_cache_dir",
    "format_chat",
    "load_tokenizer",
    "read_gguf_tokenizer_metadata",
    "sentencepiece_proto_from_gguf_metadata",
]

logger = logging.getLogger(__name__)


def _processor_from_bytes(data: bytes, where: str) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=data)
    except Exception as err:  # sentencepiece raises RuntimeError/OSError with terse messages
        raise ValueError(f"{where}: not a valid SentencePiece model ({err})") from err


# --------------------------------------------------------------------------------------------
# The tokenizer
# --------------------------------------------------------------------------------------------


class Gemma3Tokenizer:
    """Gemma 3's SentencePiece tokenizer with batching, display and chat helpers.

    A plain Python object (not a pytree) wrapping a ``sentencepiece.SentencePieceProcessor``.
    Build one with :func:`load_tokenizer` or the ``from_*`` classmethods.

    Attributes:
      bos_id: beginning-of-sequence id (2), added by :meth:`encode` by default.
      eos_id: end-of-sequence id (1).
      pad_id: padding id (0), used by :meth:`encode_batch` and skipped by :meth:`decode`.
      unk_id: unknown-piece id (3).
      start_of_turn_id: ``<start_of_turn>`` (105; 106 in Gemma 2's vocabulary).
      end_of_turn_id: ``<end_of_turn>`` (106; 107 in Gemma 2's vocabulary).
      vocab_size: number of pieces (262144 for Gemma 3, 256000 for Gemma 2).
      source: where the tokenizer came from, for messages.
    """

    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID
    unk_id = UNK_ID
    start_of_turn_id = START_OF_TURN_ID
    end_of_turn_id = END_OF_TURN_ID

    def __init__(self, processor: spm.SentencePieceProcessor | Any, source: str = "processor"):
        """Wraps a SentencePieceProcessor and checks it has Gemma's special-token ids.

        Gemma 3 has the turn markers at 105/106, Gemma 2 at 106/107: they are looked up by piece.
        """
        self._sp = processor
        self.source = source
        self.vocab_size = int(processor.get_piece_size())
        if self.vocab_size <= END_OF_TURN_ID:
            raise ValueError(
                f"{source}: vocabulary of {self.vocab_size} pieces is not Gemma 3's (nor Gemma 2's)"
            )
        if not getattr(processor, "has_pieces", True):
            return  # a duck-typed tokenizer without a piece list: nothing to check
        if int(processor.piece_to_id("<start_of_turn>")) == START_OF_TURN_ID + 1:  # Gemma 2
            self.start_of_turn_id, self.end_of_turn_id = START_OF_TURN_ID + 1, END_OF_TURN_ID + 1
        expected = {
            k: v for k, v in EXPECTED_PIECES.items() if k not in (START_OF_TURN_ID, END_OF_TURN_ID)
        }
        expected[self.start_of_turn_id] = "<start_of_turn>"
        expected[self.end_of_turn_id] = "<end_of_turn>"
        for token_id, piece in expected.items():
            found = processor.id_to_piece(token_id)
            if found.replace(" ", SPACE_SYMBOL) != piece:
                raise ValueError(f"{source}: id {token_id} is {found!r}, expected {piece!r}")

    @property
    def processor(self) -> spm.SentencePieceProcessor | Any:
        """The wrapped ``sentencepiece.SentencePieceProcessor`` (or look-alike), for direct use."""
        return self._sp

    def __repr__(self) -> str:
        return f"Gemma3Tokenizer(vocab_size={self.vocab_size}, source={self.source!r})"

    # -- builders ----------------------------------------------------------------------------

    @classmethod
    def from_gguf(
        cls, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
    ) -> Gemma3Tokenizer:
        """Builds the tokenizer from a GGUF file's ``tokenizer.ggml.*`` metadata.

        The built SentencePiece model is cached as ``<cache_dir>/tokenizer-<hash>.model``
        (default :func:`default_cache_dir`), keyed by a hash of the vocabulary metadata.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        start = time.perf_counter()
        meta = read_gguf_tokenizer_metadata(path)
        if "tokenizer.ggml.tokens" not in meta:
            raise ValueError(f"{path}: GGUF file has no tokenizer metadata (tokenizer.ggml.tokens)")
        cached = model_cache_path(meta["_digest"], cache_dir)
        if cached.is_file():
            try:
                processor = _processor_from_bytes(cached.read_bytes(), str(cached))
                logger.info("tokenizer from cache %s in %.2fs", cached, time.perf_counter() - start)
                return cls(processor, source=str(path))
            except ValueError:
                logger.warning("ignoring unreadable cached tokenizer %s", cached)
        data = sentencepiece_proto_from_gguf_metadata(meta, str(path))
        processor = _processor_from_bytes(data, str(path))
        try:
            write_atomically(cached, data)
        except OSError as err:
            logger.warning("could not cache tokenizer model at %s: %s", cached, err)
        logger.info("tokenizer built from %s in %.2fs", path, time.perf_counter() - start)
        return cls(processor, source=str(path))

    @classmethod
    def from_model_file(cls, path: str | os.PathLike) -> Gemma3Tokenizer:
        """Loads a SentencePiece ``tokenizer.model`` file (as shipped with Gemma 3)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model file not found: {path}")
        return cls(_processor_from_bytes(path.read_bytes(), str(path)), source=str(path))

    @classmethod
    def from_gemma(cls, tok: Any) -> Gemma3Tokenizer:
        """Wraps a ``gemma`` library tokenizer (``gm.text.Gemma3Tokenizer``) or look-alike.

        If ``tok`` holds a ``SentencePieceProcessor`` (attribute ``_sp``, ``sp``, ``tokenizer``
        or ``_tokenizer``) it is wrapped directly. Otherwise ``tok.encode(text, add_bos=False)``
        and ``tok.decode(ids)`` are used, with pieces from ``tok.tokens`` (needed by
        ``split``, ``token_strings`` and the piece look-ups; a TypeError without it) and the
        size from ``tok.vocab_size`` (default 262144).
        """
        if isinstance(tok, Gemma3Tokenizer):
            return tok
        for name in ("_sp", "sp", "tokenizer", "_tokenizer"):
            candidate = getattr(tok, name, None)
            if isinstance(candidate, spm.SentencePieceProcessor):
                return cls(candidate, source=f"{type(tok).__name__}.{name}")
        if not (callable(getattr(tok, "encode", None)) and callable(getattr(tok, "decode", None))):
            raise TypeError(f"{type(tok).__name__} is not a tokenizer: needs .encode and .decode")
        return cls(DelegatingProcessor(tok), source=type(tok).__name__)

    # -- encoding ----------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``; control markers such as ``<start_of_turn>`` are parsed."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = list(self._sp.encode(text))
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def encode_batch(
        self,
        texts: Sequence[str],
        add_bos: bool = True,
        max_len: int | None = None,
        pad_side: str = "right",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encodes and pads a batch of texts.

        Args:
          texts: the texts (a list, not a single str).
          add_bos: prepend BOS to each row.
          max_len: pad (or truncate, keeping the start) every row to this length; by default
            rows are padded to the longest one.
          pad_side: "right" (default; real tokens keep positions 0..n-1) or "left" (for
            generation, all rows end at the last column).

        Returns:
          ``(tokens, mask)``: int32 ``[batch, seq]`` ids padded with ``pad_id``, and a bool
          ``[batch, seq]`` mask that is True on real tokens.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch expects a list of str")
        if len(texts) == 0:
            raise ValueError("encode_batch got an empty list of texts")
        rows = [[self.bos_id] * add_bos + list(ids) for ids in self._sp.encode(list(texts))]
        return pad_rows(rows, pad_id=self.pad_id, side=pad_side, max_len=max_len)

    # -- decoding and display ----------------------------------------------------------------

    def _as_id_list(self, ids: Sequence[int] | np.ndarray | int) -> list[int]:
        array = np.asarray(ids)
        if array.ndim > 1:
            raise ValueError(f"expected a 1-D sequence of ids, got shape {array.shape}")
        return check_token_ids(array.reshape(-1), self.vocab_size, what=self.source).tolist()

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; padding, BOS and EOS (and other control tokens) are dropped.

        ``decode(encode(text)) == text`` for any text without the character "▁" (U+2581),
        which Gemma's tokenizer cannot tell from an escaped space.
        """
        skip = (self.pad_id, self.bos_id, self.eos_id)
        return self._sp.decode([i for i in self._as_id_list(ids) if i not in skip])

    def token_strings(self, ids: Sequence[int] | np.ndarray) -> list[str]:
        """One display string per id: "▁" shown as a space, control tokens as their piece.

        Runs of byte-fallback tokens are decoded as UTF-8; as in SentencePiece's own surface
        strings, the last byte of each character shows the whole character and the bytes before
        it show "", so the strings of an encoded text join back to the text. Stray bytes that
        form no character show as their piece, e.g. ``<0x80>``.
        """
        ids = self._as_id_list(ids)
        out: list[str] = []
        pos = 0
        while pos < len(ids):
            if not self._sp.is_byte(ids[pos]):
                piece = self._sp.id_to_piece(ids[pos])
                out.append(
                    piece if self._sp.is_control(ids[pos]) else piece.replace(SPACE_SYMBOL, " ")
                )
                pos += 1
                continue
            end = pos
            while end < len(ids) and self._sp.is_byte(ids[end]):
                end += 1
            out.extend(self._byte_run_strings(ids[pos:end]))
            pos = end
        return out

    def _byte_run_strings(self, ids: list[int]) -> list[str]:
        pieces = [self._sp.id_to_piece(i) for i in ids]
        raw = bytes(int(BYTE_PIECE.fullmatch(p).group(1), 16) for p in pieces)
        out: list[str] = []
        pos = 0
        while pos < len(raw):
            lead = raw[pos]
            width = 1 if lead < 0x80 else 2 if lead >> 5 == 6 else 3 if lead >> 4 == 14 else 4
            try:
                char = raw[pos : pos + width].decode("utf-8")
            except UnicodeDecodeError:
                char, width = pieces[pos], 1
            out.extend([""] * (width - 1) + [char])
            pos += width
        return out

    def split(self, text: str, add_bos: bool = False) -> list[str]:
        """Display strings of the tokens of ``text``: ``"".join(split(text)) == text``."""
        return self.token_strings(self.encode(text, add_bos=add_bos))

    def id_to_piece(self, token_id: int) -> str:
        """The raw SentencePiece piece of an id (spaces as "▁", bytes as ``<0x0A>``)."""
        (token_id,) = self._as_id_list([token_id])
        return self._sp.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int:
        """Id of a piece; spaces may be written as " " or "▁". Raises KeyError if unknown."""
        for candidate in (piece, piece.replace(" ", SPACE_SYMBOL)):
            token_id = int(self._sp.piece_to_id(candidate))
            if token_id != self.unk_id or candidate == self._sp.id_to_piece(self.unk_id):
                return token_id
        raise KeyError(f"piece {piece!r} is not in the vocabulary of {self.source}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _offline_tokenizer(cache_dir: str | os.PathLike | None = None) -> Gemma3Tokenizer:
    return Gemma3Tokenizer.from_gguf(resolve_default_gguf(), cache_dir)


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> Gemma3Tokenizer:
    return _offline_tokenizer()


def load_tokenizer(
    source: Any = None, cache_dir: str | os.PathLike | None = None
) -> Gemma3Tokenizer:
    """Loads a Gemma 3 tokenizer from any supported source.

    Args:
      source: one of
        * ``None``: the offline Gemma 3 270M GGUF (the ``offline`` extra), memoized;
        * any checkpoint source ``load_model`` accepts (``models.sources.resolve_source``): a
          ``.gguf`` file (vocabulary from its metadata), a SentencePiece ``tokenizer.model``,
          a directory holding one (or a single ``.gguf``), ``"hf:<repo_id>"`` (only
          ``tokenizer.model`` is fetched), ``"kaggle:<handle>"``;
        * a :class:`Gemma3Tokenizer` (returned as is) or a ``gemma`` library tokenizer;
        * a model from ``load_model``: the tokenizer of the checkpoint it was read from.
      cache_dir: where GGUF-built models are cached (default :func:`default_cache_dir`).

    Returns:
      The tokenizer.
    """
    if source is None:
        return _default_tokenizer() if cache_dir is None else _offline_tokenizer(cache_dir)
    if isinstance(source, Gemma3Tokenizer):
        return source
    if getattr(source, "body", None) is not None and hasattr(source, "config"):
        return load_tokenizer(getattr(source, "source", None), cache_dir)  # a Gemma3LM
    if not isinstance(source, (str, os.PathLike)):
        return Gemma3Tokenizer.from_gemma(source)
    try:
        resolved = resolve_source(source, want="tokenizer")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"tokenizer source not found: {err}") from None
    if resolved.format == "sentencepiece":
        return Gemma3Tokenizer.from_model_file(resolved.path)
    if resolved.format == "gguf":
        return Gemma3Tokenizer.from_gguf(resolved.path, cache_dir)
    found = find_tokenizer_file(resolved.root)
    if found is None:
        raise FileNotFoundError(f"no tokenizer.model in {source} ({resolved.root})")
    return Gemma3Tokenizer.from_model_file(found)


def as_tokenizer(obj: Any = None) -> Gemma3Tokenizer:
    """Coerces ``obj`` (our tokenizer, a gemma-library tokenizer, or a source spec) to one."""
    return load_tokenizer(obj)


# --------------------------------------------------------------------------------------------
# Chat prompts
# --------------------------------------------------------------------------------------------


def chat_prefix_length(tokenizer: Any, messages: str | Sequence[dict[str, Any]]) -> int:
    """Number of tokens (BOS included) of the prompt ``format_chat(messages)``.

    Tokens at this index and after are the model's reply when the reply is appended to the
    prompt text.
    """
    return len(as_tokenizer(tokenizer).encode(format_chat(messages, add_generation_prompt=True)))
