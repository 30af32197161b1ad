"""One input convention (text, ids, ragged lists, arrays) and length bucketing of the runners."""

from __future__ import annotations

import numpy as np
import pytest
from penzai import pz

from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.gemma3 import Gemma3LM, forward
from gemma_scope_pz.models.inputs import as_token_batch, bucket_length, pad_rows
from gemma_scope_pz.models.sampling import generate

CONFIG = Gemma3Config.tiny()


class _CharTokenizer:
    """A stand-in tokenizer: one id per character (ord % 50 + 10), BOS = 2."""

    def encode(self, text, add_bos=True):
        return [2] * add_bos + [ord(c) % 50 + 10 for c in text]


def test_bucket_length():
    assert [bucket_length(n) for n in (1, 15, 16, 17, 32, 33, 100)] == [16, 16, 16, 32, 32, 64, 128]
    assert bucket_length(100, limit=64) == 100  # never below the length itself
    assert bucket_length(40, limit=48) == 48  # capped at the context
    with pytest.raises(ValueError, match="length must be >= 1"):
        bucket_length(0)


def test_pad_rows_both_sides():
    tokens, mask = pad_rows([[5, 6, 7], [8]], side="right")
    assert tokens.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[True] * 3, [True, False, False]]
    tokens, mask = pad_rows([[5, 6, 7], [8]], side="left", pad_id=1)
    assert tokens.tolist() == [[5, 6, 7], [1, 1, 8]]
    assert mask.tolist() == [[True] * 3, [False, False, True]]
    with pytest.raises(ValueError, match="pad_side"):
        pad_rows([[1]], side="middle")


def test_every_input_form_gives_the_same_batch():
    tok = _CharTokenizer()
    expected = np.array([[2, 10 + ord("h") % 50, 10 + ord("i") % 50]], np.int32)
    for form in (
        "hi",
        ["hi"],
        [int(i) for i in expected[0]],
        [list(expected[0])],
        expected,
        expected[0],
    ):
        tokens, mask = as_token_batch(form, tok)
        assert tokens.dtype == np.int32
        np.testing.assert_array_equal(tokens, expected, err_msg=repr(form))
        assert mask.all()
    ragged, mask = as_token_batch([[2, 5, 6], [2, 7]], pad_side="left")
    assert ragged.tolist() == [[2, 5, 6], [0, 2, 7]] and mask.tolist()[1] == [False, True, True]


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ([], ValueError, "empty"),
        ([[2, 3], []], ValueError, "row 1 has no tokens"),
        ([2, "a"], TypeError, "mix"),
        ([[2.5, 3.0]], TypeError, "row 0 is not a list of integer"),
        (np.zeros((2, 2, 2), np.int32), ValueError, r"shape \(2, 2, 2\)"),
        (np.zeros((1, 3), np.float32), TypeError, "integers"),
    ],
)
def test_bad_inputs(bad, error, match):
    with pytest.raises(error, match=match):
        as_token_batch(bad, _CharTokenizer())


def test_forward_takes_text_with_the_given_model_tokenizer(monkeypatch):
    from gemma_scope_pz.models import inputs

    model = Gemma3LM.random(CONFIG, seed=0)
    monkeypatch.setattr(inputs, "tokenizer_of", lambda _: _CharTokenizer())
    ids = _CharTokenizer().encode("abc")
    np.testing.assert_array_equal(
        np.asarray(forward(model, "abc")), np.asarray(forward(model, np.array([ids])))
    )


@pytest.fixture
def traces(monkeypatch):
    """Counts traces of the model body (each is one compilation of a jitted runner)."""
    calls = []
    original = pz.nn.EmbeddingLookup.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(pz.nn.EmbeddingLookup, "__call__", counting)
    return calls


def test_bucketed_forward_equals_unbucketed_and_compiles_once(traces):
    model = Gemma3LM.random(CONFIG, seed=1)
    rng = np.random.default_rng(0)
    lengths = (3, 5, 9, 13)  # all in the 16 bucket
    batches = [rng.integers(3, CONFIG.vocab_size, size=(2, n)).astype(np.int32) for n in lengths]
    bucketed = [np.asarray(forward(model, tokens)) for tokens in batches]
    assert len(traces) == 1  # one shape compiled for four lengths
    for tokens, got in zip(batches, bucketed):
        plain = np.asarray(forward(model, tokens, bucket=False))
        assert got.shape == (2, tokens.shape[1], CONFIG.vocab_size)
        np.testing.assert_allclose(got, plain, rtol=0, atol=1e-5 * np.abs(plain).max())
    assert len(traces) == 1 + len(lengths)


def test_bucketed_forward_with_left_padding():
    model = Gemma3LM.random(CONFIG, seed=2)
    tokens = np.array([[0, 0, 2, 9, 11], [2, 4, 5, 6, 7]], np.int32)
    bucketed = np.asarray(forward(model, tokens, pad_id=0))
    plain = np.asarray(forward(model, tokens, pad_id=0, bucket=False))
    real = tokens != 0  # pad rows attend to nothing real: their logits carry no meaning
    np.testing.assert_allclose(bucketed[real], plain[real], rtol=0, atol=1e-5 * np.abs(plain).max())


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_bucketed_generate_equals_unbucketed(temperature):
    model = Gemma3LM.random(CONFIG, seed=3)
    prompts = [[2, 5, 9, 4], [2, 7]]
    kwargs = dict(max_new_tokens=5, temperature=temperature, seed=4, stop_token=None)
    bucketed = generate(model, prompts, **kwargs)
    plain = generate(model, prompts, bucket=False, **kwargs)
    assert bucketed == plain
    assert [len(row) for row in bucketed] == [5, 5]


def test_generate_reuses_compiled_code_for_new_lengths(traces):
    model = Gemma3LM.random(CONFIG, seed=5)
    generate(model, [[2, 5, 6]], max_new_tokens=3)
    first = len(traces)
    for prompt, steps in (([2, 5, 6, 7, 8], 4), ([2] * 9, 7), ([2, 3], 2)):
        generate(model, [prompt], max_new_tokens=steps)
    assert len(traces) == first
    generate(model, [[2] * 17], max_new_tokens=3)  # a new prompt bucket (32) compiles once
    assert len(traces) == 2 * first
