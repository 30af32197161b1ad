"""The real (offline) Gemma 3 270M sharded over a 2x4 mesh of simulated CPU devices.

The 270M has 4 query heads and 1 key/value head (multi-query attention): over ``"model"`` (4)
the query heads, the output projection, the MLP's 2048 neurons and the 262144-token embedding are
split; the single key/value head and the norms are replicated; the batch is split over ``"data"``.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.simulated_devices import run_result

SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np
    from penzai import pz
    import gemma_scope_pz as gs
    from gemma_scope_pz.parallel import make_mesh, shard
    from gemma_scope_pz.parallel.shard import device_bytes

    model = gs.load_model()
    tokens = np.random.default_rng(0).integers(3, 5000, size=(2, 12)).astype(np.int32)
    tokens[:, 0] = 2
    reference = np.asarray(gs.forward(model, tokens))
    sharded = shard(model, make_mesh(2, 4))
    got = gs.forward(sharded, tokens)
    specs = {}
    for p in pz.unbind_params(sharded)[1]:
        if p.label.startswith("blocks.0.") or p.label == "embedding":
            spec = tuple(p.value.data_array.sharding.spec)
            spec += (None,) * (len(p.value.named_axes) - len(spec))
            specs[p.label] = [n for n, a in zip(p.value.named_axes, spec) if a == "model"]
    total = sum(p.value.data_array.nbytes for p in pz.unbind_params(model)[1])
    print("RESULT" + json.dumps({
        "diff": float(np.abs(np.asarray(got) - reference).max()),
        "scale": float(np.abs(reference).max()),
        "same_argmax": bool((np.asarray(got).argmax(-1) == reference.argmax(-1)).all()),
        "logits_spec": str(got.sharding.spec),
        "specs": specs,
        "held": sorted(device_bytes(sharded).values()),
        "total": total,
    }))
    """
)


@pytest.mark.slow
def test_real_270m_on_a_2x4_mesh_matches_unsharded():
    out = run_result(["-c", SCRIPT])
    # float32 rounding of differently ordered reductions (logits of order 10-30).
    assert out["diff"] <= 1e-4 * max(1.0, out["scale"]), out
    assert out["same_argmax"]
    assert out["logits_spec"] == "P('data', None, 'model')"
    specs = out["specs"]
    # The named axis each parameter is split along over "model" (none: replicated).
    assert specs["embedding"] == ["vocabulary"]
    assert specs["blocks.0.attention.query"] == ["query_heads"]
    assert specs["blocks.0.attention.key"] == []  # the one key/value head
    assert specs["blocks.0.attention.value"] == []
    assert specs["blocks.0.attention.output"] == ["query_heads"]
    assert specs["blocks.0.mlp.gate"] == specs["blocks.0.mlp.up"] == ["neurons"]
    assert specs["blocks.0.mlp.down"] == ["neurons"]
    assert specs["blocks.0.pre_ffw_norm.scale"] == []
    held = out["held"]
    assert len(held) == 8 and len(set(held)) == 1
    # About a quarter each: only the key/value projections and norms are held whole.
    assert out["total"] / 4 < held[0] < out["total"] / 4 * 1.1
