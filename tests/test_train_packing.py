"""Concatenated packing (no compute on padding): contexts against a plain-Python reference of the
SAELens rule, harvested rows against capture(), and the streaming refill's valid rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

from gemma_scope_pz.data.corpus import as_corpus
from gemma_scope_pz.data.packing import pack_concatenated, pack_contexts, real_token_mask
from gemma_scope_pz.scope.interventions import capture
from gemma_scope_pz.train import buffer as buffer_lib
from gemma_scope_pz.train.harvest import harvest_array
from tests.conftest import CharTokenizer

TOK = CharTokenizer()
BOS, PAD = TOK.bos_id, TOK.pad_id
SITE = "blocks.1.resid_post"
LENGTHS = [3, 7, 15, 1, 20, 0, 9, 4]


def _docs(lengths=LENGTHS):
    # Document k repeats letter k, so every token says which document it came from.
    return [chr(ord("a") + k) * n for k, n in enumerate(lengths)]


def _reference(docs, context_len):
    """SAELens's rule written out token by token: stream ``BOS d0 BOS d1 ...``; every context
    starts with BOS, taking the stream's own BOS when a document starts there."""
    stream = [t for d in docs if d for t in [BOS, *TOK.encode(d, add_bos=False)]]
    contexts, i = [], 0
    while i < len(stream):
        context = [BOS]
        if stream[i] == BOS:
            i += 1
        take = stream[i : i + context_len - 1]
        i += len(take)
        context += take
        if len(context) > 1:
            contexts.append(context + [PAD] * (context_len - len(context)))
    return np.array(contexts, np.int32)


@pytest.mark.parametrize("context_len", [2, 5, 8, 16])
def test_pack_concatenated_matches_the_reference_rule(context_len):
    got = np.stack(list(pack_concatenated(_docs(), TOK, context_len)))
    np.testing.assert_array_equal(got, _reference(_docs(), context_len))
    assert (got[:, 0] == BOS).all() and not (got[:-1] == PAD).any()
    # every document token appears once, in order; only the last context may hold padding
    mask = real_token_mask(got, PAD, bos_id=BOS)
    expected = [t for d in _docs() for t in TOK.encode(d, add_bos=False)]
    np.testing.assert_array_equal(got[mask], expected)


def test_pack_concatenated_drop_tail_and_fewer_contexts():
    full = np.stack(list(pack_concatenated(_docs(), TOK, 8)))
    dropped = np.stack(list(pack_concatenated(_docs(), TOK, 8, tail="drop")))
    assert (full[-1] == PAD).any()
    np.testing.assert_array_equal(dropped, full[:-1])
    per_document = np.stack(list(pack_contexts(_docs(), TOK, 8)))
    # no position is wasted on padding: fewer forward positions than one document per context
    assert len(full) < len(per_document)
    assert real_token_mask(per_document, PAD).sum() == sum(LENGTHS)
    with pytest.raises(ValueError, match="tail"):
        list(pack_concatenated(_docs(), TOK, 8, tail="wrap"))


def test_harvest_concat_rows_equal_capture_at_document_tokens(tiny_model):
    rows, info = harvest_array(
        tiny_model, TOK, _docs(), SITE, n_tokens=None, context_len=8, batch_size=3,
        packing="concat", progress=False,
    )  # fmt: skip
    contexts = np.stack(list(pack_concatenated(_docs(), TOK, 8)))
    acts = np.asarray(capture(tiny_model, contexts, SITE)[SITE])
    mask = real_token_mask(contexts, PAD, bos_id=BOS)
    assert rows[SITE].shape == (sum(LENGTHS), 32) and info.packing == "concat"
    np.testing.assert_allclose(rows[SITE], acts[mask], rtol=1e-5, atol=1e-5)
    # a resumed harvest continues without gaps or duplicates
    rest, _ = harvest_array(
        tiny_model, TOK, _docs(), SITE, n_tokens=None, context_len=8, batch_size=3,
        packing="concat", start_row=13, progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(rest[SITE], rows[SITE][13:])
    with pytest.raises(ValueError, match="packing must be one of"):
        harvest_array(tiny_model, TOK, _docs(), SITE, n_tokens=5, packing="glued")


def test_stream_refill_keeps_only_document_tokens(tiny_model):
    from gemma_scope_pz.train.stream_data import ContextStream, StreamConfig, make_data_step

    stream = StreamConfig(context_len=8, packing="concat", buffer_refills=2)
    contexts = ContextStream(as_corpus(_docs()), TOK, 4, 8, 64, packing_kind="concat")
    assert contexts.ignored_ids == (PAD, BOS)
    tokens = contexts.tokens(0)
    np.testing.assert_array_equal(tokens, np.stack(list(pack_concatenated(_docs(), TOK, 8)))[:4])
    fill, _ = make_data_step((SITE,), stream, contexts.ignored_ids, batch_size=4)
    buffer = buffer_lib.init_buffer({SITE: 32}, 2, tokens.size)
    buffer, n_bad = jax.jit(fill)(pz.freeze_params(tiny_model), buffer, tokens, jnp.int32(1))
    valid = np.asarray(buffer["valid"])[tokens.size :]
    mask = real_token_mask(tokens, PAD, bos_id=BOS).reshape(-1)
    np.testing.assert_array_equal(valid, mask)
    acts = np.asarray(capture(tiny_model, tokens, SITE)[SITE]).reshape(-1, 32)
    got = np.asarray(buffer["rows"][SITE])[tokens.size :]
    np.testing.assert_allclose(got[mask], acts[mask], rtol=1e-5, atol=1e-5)
    assert int(n_bad) == 0 and not np.asarray(buffer["valid"])[: tokens.size].any()
    with pytest.raises(ValueError, match="stream.packing"):
        StreamConfig(packing="glued")
