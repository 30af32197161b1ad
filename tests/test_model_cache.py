"""What the runners remember per model (`models.stateful.per_model`): reused while the model lives and
its parameters keep their arrays, rebuilt when a parameter is given a new value, dropped with the model."""

from __future__ import annotations

import gc

import jax
from penzai import pz

from gemma_scope_pz.models import sampling, stateful
from gemma_scope_pz.models.sampling import generate

PROMPTS = [[2, 11, 12, 13, 14], [2, 21, 22]]


def _parameters(model) -> list[pz.Parameter]:
    return [leaf for leaf in jax.tree_util.tree_leaves(model) if isinstance(leaf, pz.Parameter)]


def _count_sampler_builds(monkeypatch) -> list[int]:
    builds = []
    real = sampling.KVCachingTransformerLM.from_uncached

    def counted(*args, **kwargs):
        builds.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling.KVCachingTransformerLM, "from_uncached", counted)
    return builds


def test_generate_builds_the_sampler_once_per_shape(make_tiny_model, monkeypatch):
    model = make_tiny_model(seed=5)
    builds = _count_sampler_builds(monkeypatch)
    first = generate(model, PROMPTS, max_new_tokens=5)
    assert generate(model, PROMPTS, max_new_tokens=5) == first
    generate(model, [[2, 5, 6]], max_new_tokens=3)
    assert len(builds) == 2  # batch 2 and batch 1: two cache shapes, each built once
    generate(model, PROMPTS, max_new_tokens=5)
    assert len(builds) == 2


def _array_ids(tree) -> set[int]:
    return {id(leaf) for leaf in jax.tree_util.tree_leaves(tree) if isinstance(leaf, jax.Array)}


def test_a_new_parameter_value_is_seen(make_tiny_model, monkeypatch):
    model, other = make_tiny_model(seed=5), make_tiny_model(seed=6)
    before = generate(model, PROMPTS, max_new_tokens=6)
    want = generate(other, PROMPTS, max_new_tokens=6)
    old = _array_ids([p.value for p in _parameters(model)])
    builds = _count_sampler_builds(monkeypatch)
    for mine, theirs in zip(_parameters(model), _parameters(other), strict=True):
        mine.value = theirs.value  # the penzai idiom: give a parameter a new value in place
    new = _array_ids([p.value for p in _parameters(model)])
    assert generate(model, PROMPTS, max_new_tokens=6) == want
    assert len(builds) == 1 and before  # rebuilt once, from the new arrays only
    values = stateful._DERIVED[id(model)].values.values()
    (sampler,) = [v for v in values if isinstance(v, sampling._Sampler)]
    assert new <= _array_ids(sampler.leaves) and not old & _array_ids(sampler.leaves)


def test_per_model_forgets_a_dead_model_and_keeps_only_what_it_may(make_tiny_model):
    model = make_tiny_model(seed=7)
    key = id(model)
    value = stateful.per_model(model, "k", lambda: object())
    assert stateful.per_model(model, "k", lambda: object()) is value
    kept = stateful.per_model(model, "big", lambda: [1], remember=lambda v: False)
    assert stateful.per_model(model, "big", lambda: [2], remember=lambda v: False) is not kept
    for n in range(10):
        stateful.per_model(model, ("lru", n), lambda n=n: n, keep=4)
    assert len(stateful._DERIVED[key].values) == 4
    del model
    gc.collect()
    assert key not in stateful._DERIVED
