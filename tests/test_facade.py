"""The public facade: every name resolves, and it covers each step a notebook takes."""

from __future__ import annotations

import inspect

import pytest

import gemma_scope_pz as gs

# What the README, docs/howto.md and both notebooks call, step by step.
NOTEBOOK_STEPS = {
    "load": ["load_model", "load_tokenizer", "load_sae", "load_clt", "load_gemma_scope_1"],
    "run": ["forward", "generate", "capture", "splice", "steer", "attach", "format_chat"],
    "measure": ["evaluate_sae", "top_features", "logit_lens", "display_tokens", "highlight_tokens"],
    "data": ["load_corpus", "pack_contexts", "corpus_contexts", "token_mask", "harvest_array"],
    "train": ["TrainConfig", "train_sae", "harvest_to_cache", "train_dictionary", "make_mesh"],
    "save": ["export_gemma_scope_2", "export_saelens", "save_sae", "save_gemma_scope_2"],
    "analyse": ["collect_examples", "feature_stats", "write_cards", "feature_card_html"],
    "offline": ["offline_dictionaries"],
}


@pytest.mark.parametrize("name", gs.__all__)
def test_every_facade_name_resolves(name):
    value = getattr(gs, name)
    assert callable(value), name
    assert inspect.getdoc(value), f"gs.{name} has no docstring"


def test_facade_covers_every_notebook_step():
    missing = [n for names in NOTEBOOK_STEPS.values() for n in names if n not in gs.__all__]
    assert not missing
    assert set(gs.__all__) <= set(dir(gs))


def test_aliases_point_to_the_owning_functions():
    assert gs.save_sae is gs.save_gemma_scope_2
    assert gs.feature_stats == gs.FeatureStats.from_examples
    assert gs.collect_examples.__name__ == "collect_max_activating"
    assert gs.write_cards.__name__ == "write_feature_cards"


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'load_everything'"):
        gs.load_everything  # noqa: B018
