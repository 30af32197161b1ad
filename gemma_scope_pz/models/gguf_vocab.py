"""Gemma's vocabulary from a GGUF file, rebuilt as a SentencePiece model.

llama.cpp stores the tokenizer in a GGUF file's metadata (``tokenizer.ggml.tokens``,
``.scores``, ``.token_type`` and the special ids). :func:`read_gguf_tokenizer_metadata` reads
those keys with :func:`gemma_scope_pz.models.checkpoints.gguf.read_gguf` (Gemma 3's 262144-token
vocabulary in a fraction of a second) and :func:`sentencepiece_proto_from_gguf_metadata` turns
them back into a serialized SentencePiece ``ModelProto`` equivalent to Gemma's own
``tokenizer.model``.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma_scope_pz.models.special_tokens import (
    BOS_ID,
    CONTROL_PIECES,
    EOS_ID,
    SPACE_SYMBOL,
    UNK_ID,
)

__all__ = ["read_gguf_tokenizer_metadata", "sentencepiece_proto_from_gguf_metadata"]

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


def read_gguf_tokenizer_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Reads the ``tokenizer.*`` key/value pairs of a GGUF file.

    The header is parsed by :func:`gemma_scope_pz.models.checkpoints.gguf.read_gguf` with string
    arrays decoded (unlike ``gguf.GGUFReader``, which builds a numpy view per string and takes
    ~10 s on Gemma's vocabulary).

    Args:
      path: a GGUF file (version 2 or 3, little-endian).

    Returns:
      ``{key: value}`` for every ``tokenizer.*`` key: strings as ``str``, scalars as Python
      numbers/bools, numeric arrays as numpy arrays, string arrays as lists of ``str``, plus
      ``"_digest"``: a SHA-256 hex digest of those keys and values (a cache key).

    Raises:
      ValueError: naming the file, if it is not a readable GGUF file.
    """
    from gemma_scope_pz.models.checkpoints.gguf import read_gguf  # imports gguf: kept lazy

    try:
        metadata = read_gguf(path, string_arrays=True).metadata
    except (struct.error, IndexError, ValueError) as err:
        if isinstance(err, ValueError) and str(Path(path)) in str(err):
            raise
        raise ValueError(f"{path}: malformed GGUF metadata ({err})") from err
    result = {key: value for key, value in metadata.items() if key.startswith("tokenizer.")}
    result["_digest"] = _metadata_digest(result)
    return result


def _metadata_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of keys and values; arrays by dtype, shape and bytes, the rest as JSON."""
    digest = hashlib.sha256()
    for key in sorted(meta):
        value = meta[key]
        digest.update(key.encode("utf-8") + b"\0")
        if isinstance(value, np.ndarray):
            digest.update(f"{value.dtype.str}{value.shape}".encode())
            digest.update(np.ascontiguousarray(value).tobytes())
        else:
            text = json.dumps(value, default=lambda item: np.asarray(item).tolist())
            digest.update(text.encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return digest.hexdigest()


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

    Raises:
      ValueError: naming ``where``, if the metadata is missing, not a SentencePiece ("llama")
        vocabulary, or inconsistent.
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
        piece_type = _piece_type(piece, _LLAMA_CPP_TYPES[llama_type], i == ids["unknown"])
        if piece_type == _PieceType.USER_DEFINED:
            piece = piece.replace(" ", SPACE_SYMBOL)
        proto.pieces.add(piece=piece, score=score, type=piece_type)
    _set_gemma_specs(
        proto, n, ids, pad_id, bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    )
    return proto.SerializeToString()


def _piece_type(piece: str, piece_type: int, is_unknown: bool) -> int:
    """Undoes llama.cpp's typing: UNKNOWN only for the unknown id, turn markers USER_DEFINED."""
    if is_unknown:
        return _PieceType.UNKNOWN
    if piece_type == _PieceType.UNKNOWN:
        return _PieceType.CONTROL
    if piece_type == _PieceType.CONTROL and piece not in CONTROL_PIECES:
        return _PieceType.USER_DEFINED
    return piece_type


def _set_gemma_specs(
    proto: sp_pb2.ModelProto, n: int, ids: dict[str, int], pad_id: int, dummy_prefix: bool
) -> None:
    """The trainer and normalizer settings of Gemma 3's own ``tokenizer.model``."""
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
    normalizer.add_dummy_prefix = dummy_prefix
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
