"""Faithfulness of the offline Gemma 3 270M against two independent references.

- tests/data/reference_270m.json: Hugging Face transformers (eager attention, float32) on the same GGUF,
  written by scripts/reference_transformers.py (token ids, logits at fixed vocabulary ids, greedy
  continuation, mean NLL).
- tests/reference_gemma3.py: a plain numpy Gemma 3 run on the weights our loader dequantized.
"""

import json
import pathlib

import numpy as np
import pytest

import gemma_scope_pz as gs
from tests import reference_gemma3 as ref

pytestmark = pytest.mark.slow
REFERENCE = json.loads((pathlib.Path(__file__).parent / "data" / "reference_270m.json").read_text())
PROMPTS = REFERENCE["prompts"]


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_tokenizer_ids_match_reference(real_tokenizer, name):
    assert real_tokenizer.encode(PROMPTS[name]["text"]) == PROMPTS[name]["input_ids"]


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_logits_match_transformers(real_model, name):
    p = PROMPTS[name]
    logits = np.asarray(gs.forward(real_model, np.array([p["input_ids"]])))[0]
    subset = logits[:, p["subset_ids"]]
    expected = np.asarray(p["subset_logits"])
    scale = np.asarray(p["max_abs_logit"])[:, None]
    rel = np.abs(subset - expected) / scale
    assert rel.max() <= 1e-3, f"max |Δlogit| / max|logit| = {rel.max():.2e}"
    assert np.abs(np.abs(logits).max(-1) - scale[:, 0]).max() <= 1e-3 * scale.max()
    assert [int(i) for i in np.argmax(logits, -1)] == [row[0] for row in p["top_ids"]]


def test_logits_match_numpy_oracle_on_loaded_weights(real_model):
    config, params = gs.load_params()
    tokens = np.array([PROMPTS["energy"]["input_ids"]])
    expected = ref.forward(config, params, tokens)
    got = np.asarray(gs.forward(real_model, tokens))
    rel = np.abs(got - expected).max() / np.abs(expected).max()
    assert rel <= 1e-3, f"max |Δlogit| / max|logit| = {rel:.2e}"


def test_greedy_continuation_matches_transformers(real_model, real_tokenizer):
    p = PROMPTS["capital"]
    out = gs.generate(real_model, [p["input_ids"]], max_new_tokens=15, stop_token=None)[0]
    assert out == p["greedy_ids"]
    assert real_tokenizer.decode(out) == p["greedy_text"]


def test_mean_nll_of_energy_sentence(real_model):
    p = PROMPTS["energy"]
    tokens = np.array([p["input_ids"]])
    logits = np.asarray(gs.forward(real_model, tokens), np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -logp[np.arange(tokens.shape[1] - 1), tokens[0, 1:]].mean()
    assert abs(nll - p["mean_nll"]) < 2e-3, nll
    assert abs(nll - 1.41) < 0.01


def test_long_context_beyond_the_sliding_window_matches_transformers(real_model):
    # 600 tokens: positions >= 512 exercise the 512-token window of the local layers.
    p = REFERENCE["long_context"]
    logits = np.asarray(gs.forward(real_model, np.array([p["input_ids"]])))[0, p["positions"]]
    subset = logits[:, p["subset_ids"]]
    rel = np.abs(subset - np.asarray(p["subset_logits"])) / np.asarray(p["max_abs_logit"])[:, None]
    assert rel.max() <= 1e-3, f"max |Δlogit| / max|logit| = {rel.max():.2e}"
    assert [int(i) for i in np.argmax(logits, -1)] == [row[0] for row in p["top_ids"]]
