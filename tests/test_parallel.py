"""A tiny Gemma 3 sharded over 8 simulated CPU devices computes what the unsharded model does.

The runs happen in one subprocess (``tests/parallel_worker.py``): ``XLA_FLAGS`` must be set before
jax is imported. Meshes 1x8, 2x4 and 8x1 (data x model); the dictionary is sharded too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.simulated_devices import run_result

WORKER = Path(__file__).with_name("parallel_worker.py")
MESHES = ("1x8", "2x4", "8x1")
OPERATIONS = ("logits", "capture", "splice_error", "splice", "steer", "generate", "evaluate")


@pytest.fixture(scope="module")
def result() -> dict:
    return run_result([str(WORKER)])


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_operations_match_unsharded(result, mesh):
    diffs = result["diffs"][mesh]
    assert set(diffs) == set(OPERATIONS)
    for name, diff in diffs.items():
        # float32 rounding of a differently ordered reduction; the outputs are of order 10.
        assert diff <= 1e-6 * max(1.0, result["scale"][name]) * 10, (mesh, name, diff)
    assert diffs["generate"] == 0.0  # greedy tokens identical


def test_outputs_are_split_over_the_mesh(result):
    # Logits [batch, seq, vocabulary]: batch over "data" when it is > 1, vocabulary over "model".
    assert result["specs"] == {
        "1x8": "P(None, None, 'model')",
        "2x4": "P('data', None, 'model')",
        "8x1": "P('data',)",
    }


@pytest.mark.parametrize("mesh", MESHES)
def test_each_device_holds_its_share_of_the_parameters(result, mesh):
    sizes = result["sizes"][mesh]
    model_axis = int(mesh.split("x")[1])
    assert sizes["n_devices"] == 8
    # Replicated norms plus 1/model of every sharded weight, measured from addressable shards.
    assert sizes["held"] == [sizes["expected"]] * 8
    if model_axis > 1:
        assert sizes["held"][0] < sizes["total"] / model_axis * 1.5


def test_mesh_mismatches_are_clear_errors(result):
    errors = result["errors"]
    assert "already sharded over mesh (data=1, model=8)" in errors["reshard"]
    assert "(data=2, model=4)" in errors["reshard"]
    assert "different meshes" in errors["two_meshes"]


def test_shapes_that_do_not_divide_name_axis_sizes_and_fitting_meshes(result):
    errors = result["errors"]
    msg = errors["not_dividing"]
    assert "'head_groups'" in msg and "(size 2)" in msg and "'model' of size 8" in msg
    assert msg.endswith("fit: 4x2, 8x1")
    assert "needs 12 devices, only 8" in errors["bad_mesh"]
    assert "the batch (size 3)" in errors["batch"] and errors["batch"].endswith("fit: 1x8")
