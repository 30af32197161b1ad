"""Mesh shapes and sharding rules on the test process's devices (no simulated devices needed)."""

from __future__ import annotations

import jax
import pytest

from gemma_scope_pz.parallel import DEFAULT_RULES, ShardingRules, make_mesh, mesh_shapes


def test_mesh_shapes_keep_model_dividing_every_dimension():
    assert mesh_shapes(8) == [(8, 1), (4, 2), (2, 4), (1, 8)]
    # 27B: 16 key/value heads, 21504 neurons, 262208 tokens.
    assert mesh_shapes(32, (16, 21504, 262208)) == [(32, 1), (16, 2), (8, 4), (4, 8), (2, 16)]
    # 270M: 4 query heads; nearest to model=8 first.
    assert mesh_shapes(8, (4, 2048), near=8) == [(2, 4), (4, 2), (8, 1)]
    assert mesh_shapes(8, data_dims=(3,)) == [(1, 8)]


def test_rules_split_one_axis_per_mesh_axis():
    rules = DEFAULT_RULES
    query = ("embedding", "head_groups", "query_heads", "projection")
    assert rules.axis_map(query) == {"head_groups": "model"}
    assert rules.axis_map(("embedding", "query_heads", "projection")) == {"query_heads": "model"}
    assert rules.axis_map(("neurons", "embedding")) == {"neurons": "model"}
    assert rules.axis_map(("batch", "seq", "vocabulary")) == {
        "vocabulary": "model",
        "batch": "data",
    }
    assert rules.axis_map(("embedding",)) == {}
    assert ShardingRules(model_axes=("neurons",)).axis_map(("vocabulary", "embedding")) == {}


def test_make_mesh_names_axes_and_refuses_impossible_shapes():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "model")
    assert mesh.shape == {"data": len(jax.devices()), "model": 1}
    n = len(jax.devices())
    with pytest.raises(ValueError, match=rf"needs {2 * n} devices, only {n} available"):
        make_mesh(2 * n, 1)
    with pytest.raises(ValueError, match="axis sizes must be positive"):
        make_mesh(0, 1)
    with pytest.raises(ValueError, match=rf"{n} devices are not divisible by model={n + 1}"):
        make_mesh(-1, n + 1)
