"""Context packing and activation harvesting against a direct capture() on a tiny random model."""

import numpy as np
import pytest

from gemma_scope_pz.data.corpus import Corpus
from gemma_scope_pz.data.packing import batch_contexts, pack_contexts, real_token_mask
from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.fingerprint import weights_fingerprint
from gemma_scope_pz.models.gemma3 import Gemma3LM, random_params
from gemma_scope_pz.scope.interventions import capture
from gemma_scope_pz.train.harvest import HarvestInfo, harvest, harvest_array

CONTEXT_LEN = 8
BATCH = 3


class FakeTokenizer:
    """One token per character: ids 3..63 (fits the tiny config's vocabulary of 64)."""

    bos_id, eos_id, pad_id = 2, 1, 0

    def encode(self, text, add_bos=True, add_eos=False):
        ids = [3 + (ord(c) - ord("a")) % 61 for c in text]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos


TOK = FakeTokenizer()


@pytest.fixture(scope="module")
def model_and_params():
    config = Gemma3Config.tiny()
    params = random_params(config, seed=1)
    return Gemma3LM.from_params(config, params), params


def _docs(lengths):
    # Document k repeats the letter "a"+k, so every token says which document it came from.
    return [chr(ord("a") + k) * n for k, n in enumerate(lengths)]


LENGTHS = [3, 7, 15, 1, 20, 0, 9]


def test_pack_contexts_never_mixes_documents():
    docs = _docs(LENGTHS)
    contexts = np.stack(list(pack_contexts(docs, TOK, CONTEXT_LEN)))
    assert contexts.dtype == np.int32 and contexts.shape[1] == CONTEXT_LEN
    assert (contexts[:, 0] == TOK.bos_id).all()
    mask = real_token_mask(contexts, TOK.pad_id)
    assert not mask[:, 0].any()
    # Mask = exactly the document tokens; each context holds one document only.
    assert (mask == (contexts > TOK.bos_id)).all()
    owners = [set(row[m].tolist()) for row, m in zip(contexts, mask, strict=True)]
    assert all(len(o) == 1 for o in owners)
    # Reading the contexts back in order gives every document's tokens, in order.
    per_doc = [int(mask[[o == {3 + k} for o in owners]].sum()) for k in range(len(LENGTHS))]
    assert per_doc == LENGTHS
    expected_rows = sum(-(-n // (CONTEXT_LEN - 1)) for n in LENGTHS)
    assert len(contexts) == expected_rows
    order = [next(iter(o)) for o in owners]
    assert order == sorted(order)


def test_pack_contexts_drop_tail_and_no_bos():
    docs = _docs(LENGTHS)
    dropped = np.stack(list(pack_contexts(docs, TOK, CONTEXT_LEN, tail="drop")))
    assert (dropped != TOK.pad_id).all()  # no padding anywhere
    assert len(dropped) == sum(n // (CONTEXT_LEN - 1) for n in LENGTHS)
    raw = np.stack(list(pack_contexts(docs, TOK, CONTEXT_LEN, add_bos=False)))
    assert (raw[:, 0] != TOK.bos_id).all()
    assert real_token_mask(raw, TOK.pad_id, has_bos=False).sum() == sum(LENGTHS)
    with pytest.raises(ValueError, match="tail"):
        list(pack_contexts(docs, TOK, CONTEXT_LEN, tail="wrap"))


def test_batch_contexts_pads_last_batch():
    contexts = list(pack_contexts(_docs(LENGTHS), TOK, CONTEXT_LEN))
    batches = list(batch_contexts(contexts, BATCH, CONTEXT_LEN, TOK.pad_id))
    assert all(b.shape == (BATCH, CONTEXT_LEN) for b in batches)
    stacked = np.concatenate(batches)
    np.testing.assert_array_equal(stacked[: len(contexts)], np.stack(contexts))
    assert (stacked[len(contexts) :] == TOK.pad_id).all()
    assert not real_token_mask(stacked[len(contexts) :], TOK.pad_id).any()


def _direct(model, docs, sites):
    """Second code path: capture() on all contexts at once, gathered at the real positions."""
    contexts = np.stack(list(pack_contexts(docs, TOK, CONTEXT_LEN)))
    acts = capture(model, contexts, sites)
    mask = real_token_mask(contexts, TOK.pad_id)
    return {s: np.asarray(acts[s])[mask] for s in sites}


def test_harvest_equals_direct_capture(model_and_params):
    model, _ = model_and_params
    docs = _docs(LENGTHS)
    sites = ["blocks.1.resid_post", "blocks.0.attn_out"]
    expected = _direct(model, docs, sites)
    n_total = sum(LENGTHS)
    batches = list(
        harvest(model, TOK, Corpus.from_texts(docs), sites, n_tokens=None,
                context_len=CONTEXT_LEN, batch_size=BATCH, progress=False)
    )  # fmt: skip
    assert all(set(b) == set(sites) for b in batches)
    for site in sites:
        got = np.concatenate([b[site] for b in batches])
        assert got.shape == (n_total, model.config.attn_width if "attn" in site else 32)
        np.testing.assert_allclose(got, expected[site], rtol=1e-5, atol=1e-5)


def test_harvest_n_tokens_start_row_and_dtype(model_and_params):
    model, _ = model_and_params
    docs = _docs(LENGTHS)
    site = "blocks.2.resid_pre"
    expected = _direct(model, docs, [site])[site]
    kw = dict(context_len=CONTEXT_LEN, batch_size=BATCH, progress=False)
    parts = list(harvest(model, TOK, docs, site, n_tokens=25, **kw))
    assert sum(len(p[site]) for p in parts) == 25
    assert all(len(p[site]) <= BATCH * (CONTEXT_LEN - 1) for p in parts)
    np.testing.assert_allclose(np.concatenate([p[site] for p in parts]), expected[:25], atol=1e-5)
    # Resuming at row 11 (inside a context) gives exactly the remaining rows.
    resumed = list(harvest(model, TOK, docs, site, n_tokens=40, start_row=11, **kw))
    np.testing.assert_allclose(
        np.concatenate([p[site] for p in resumed]), expected[11:40], atol=1e-5
    )
    arrays, info = harvest_array(
        model, TOK, docs, [site], n_tokens=30, dtype=np.float16, model_name="tiny-test", **kw
    )
    assert arrays[site].dtype == np.float16 and arrays[site].shape == (30, 32)
    np.testing.assert_allclose(arrays[site], expected[:30], rtol=2e-3, atol=2e-3)
    assert isinstance(info, HarvestInfo)
    assert info.n_tokens == 30 and info.context_len == CONTEXT_LEN and info.dtype == "float16"
    header = info.store_header()
    assert header["model_name"] == "tiny-test" and header["sites"] == [site]
    assert header["widths"] == [32] and header["context_length"] == CONTEXT_LEN
    assert header["corpus"] == f"texts@{Corpus.from_texts(docs).fingerprint}"
    assert header["model_fingerprint"] == weights_fingerprint(model)
    assert header["add_bos"] is True and header["tail"] == "pad"


def test_harvest_runs_out_with_warning(model_and_params):
    model, _ = model_and_params
    docs = _docs([5, 4])
    with pytest.warns(UserWarning, match="ran out after 9 of 100"):
        arrays, info = harvest_array(
            model, TOK, docs, "blocks.0.resid_post", n_tokens=100,
            context_len=CONTEXT_LEN, batch_size=BATCH, progress=False,
        )  # fmt: skip
    assert info.n_tokens == 9 == len(arrays["blocks.0.resid_post"])


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_transcoder_pairs_aligned(model_and_params):
    """mlp_out rows equal the numpy MLP + post-norm applied to the mlp_in row of the same index."""
    model, params = model_and_params
    layer, eps = 3, model.config.norm_eps
    sites = [f"blocks.{layer}.mlp_in", f"blocks.{layer}.mlp_out"]
    arrays, info = harvest_array(
        model, TOK, _docs(LENGTHS), sites, n_tokens=50,
        context_len=CONTEXT_LEN, batch_size=BATCH, progress=False,
    )  # fmt: skip
    x, y = (arrays[s].astype(np.float64) for s in sites)
    assert x.shape == y.shape == (50, 32)
    p = {k: params[f"blocks.{layer}.{k}"].astype(np.float64) for k in ("mlp.gate", "mlp.up", "mlp.down", "post_ffw_norm")}  # fmt: skip
    h = (_gelu_tanh(x @ p["mlp.gate"]) * (x @ p["mlp.up"])) @ p["mlp.down"]
    want = h / np.sqrt((h**2).mean(-1, keepdims=True) + eps) * p["post_ffw_norm"]
    np.testing.assert_allclose(y, want, rtol=1e-3, atol=1e-4)
    assert info.sites == tuple(sites) and info.widths == (32, 32)


def test_harvest_bad_input(model_and_params):
    model, _ = model_and_params
    kw = dict(n_tokens=10, context_len=CONTEXT_LEN, batch_size=BATCH, progress=False)
    with pytest.raises(ValueError, match="'nothing-in-here' yielded no tokens"):
        list(harvest(model, TOK, Corpus.from_texts(["", ""], name="nothing-in-here"), "blocks.0.mlp_in", **kw))  # fmt: skip
    with pytest.raises(ValueError, match="Unknown site"):
        list(harvest(model, TOK, ["abc"], "blocks.0.mlp_middle", **kw))
    with pytest.raises(ValueError, match="blocks 0..5"):
        list(harvest(model, TOK, ["abc"], "blocks.9.mlp_in", **kw))

    class WideTokenizer(FakeTokenizer):
        def encode(self, text, add_bos=True, add_eos=False):
            return [500] * len(text)

    with pytest.raises(
        ValueError, match=r"token id 500 is outside the model's vocabulary \[0, 64\)"
    ):
        list(harvest(model, WideTokenizer(), ["abc"], "blocks.0.mlp_in", **kw))

    class NegativeTokenizer(FakeTokenizer):
        def encode(self, text, add_bos=True, add_eos=False):
            return [5, -3] * len(text)

    with pytest.raises(ValueError, match=r"'texts': token id -3 is outside"):
        list(harvest(model, NegativeTokenizer(), ["abc"], "blocks.0.mlp_in", **kw))


@pytest.mark.slow
def test_pack_default_corpus_with_real_tokenizer(real_tokenizer):
    from gemma_scope_pz.data.corpus import default_corpus

    tok = real_tokenizer
    docs = default_corpus().head(40)
    contexts = np.stack(list(pack_contexts(docs, tok, 64)))
    mask = real_token_mask(contexts, tok.pad_id)
    assert (contexts[:, 0] == tok.bos_id).all()
    assert not np.isin(contexts[mask], [tok.bos_id, tok.pad_id]).any()
    assert mask.sum() == sum(len(tok.encode(d, add_bos=False)) for d in docs)


@pytest.mark.slow
def test_gemma_library_like_tokenizer_is_accepted(real_tokenizer):
    """A tokenizer without bos_id/pad_id (like gm.text.Gemma3Tokenizer) is wrapped by as_tokenizer."""
    from gemma_scope_pz.data.packing import pack_contexts

    class GmLike:
        def __init__(self, sp):
            self._sp = sp

        def encode(self, text, add_bos=False):
            return ([2] if add_bos else []) + list(self._sp.EncodeAsIds(text))

        def decode(self, ids):
            return self._sp.DecodeIds(list(ids))

    processor = real_tokenizer.processor
    contexts = list(
        pack_contexts(["Energy cannot be created or destroyed."], GmLike(processor), 16)
    )
    expected = list(pack_contexts(["Energy cannot be created or destroyed."], real_tokenizer, 16))
    assert len(contexts) == 1 and np.array_equal(contexts[0], expected[0])


def test_corpus_contexts_reads_from_either_end():
    from gemma_scope_pz.data.packing import corpus_contexts

    docs = ["alpha beta gamma", "delta epsilon", "zeta eta theta iota"]
    first = corpus_contexts(TOK, docs, 2, context_len=8)
    last = corpus_contexts(TOK, docs, 2, context_len=8, from_end=True)
    np.testing.assert_array_equal(first, np.stack(list(pack_contexts(docs, TOK, 8))[:2]))
    np.testing.assert_array_equal(last, np.stack(list(pack_contexts(docs[::-1], TOK, 8))[:2]))
    assert not np.array_equal(first, last)
    with pytest.raises(ValueError, match="yielded no tokens"):
        corpus_contexts(TOK, [""], 2, context_len=8)
