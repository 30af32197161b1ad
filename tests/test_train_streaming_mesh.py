"""Data-parallel streaming training on 8 simulated CPU devices equals the single-device run.

``XLA_FLAGS`` must be set before jax is imported, so the runs happen in one subprocess: this file
run as a script (``python tests/test_train_streaming_mesh.py``) trains an SAE and a TopK transcoder
of a tiny model from one stream twice on the same data order: on one device and on a ``4x2`` mesh
(4-way data parallel composed with 2-way latent sharding, the model itself sharded by
``parallel.shard`` as ``gs.load_model(mesh=)`` does).
It prints the largest differences of the weights and metrics, and the refusal of a refill that does
not split over the data axis.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

MESHES = ("4x2",)


class Tok:
    """One token per character, ids 3..62 (the tiny vocabulary is 64)."""

    bos_id, eos_id, pad_id = 2, 1, 0

    def encode(self, text, add_bos=True, add_eos=False):
        ids = [3 + (ord(c) - ord("a")) % 60 for c in text]
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos


def _worker() -> dict:
    import jax

    from gemma_scope_pz.data.corpus import Corpus
    from gemma_scope_pz.models.config import Gemma3Config
    from gemma_scope_pz.models.gemma3 import Gemma3LM
    from gemma_scope_pz.parallel import make_mesh, shard
    from gemma_scope_pz.train.config import TrainConfig
    from gemma_scope_pz.train.streaming import StreamConfig, train_streaming

    config = Gemma3Config.tiny(n_heads=16, n_kv_heads=8, head_dim=8, d_ff=64, n_layers=1)
    model = Gemma3LM.random(config, seed=1)
    rng = np.random.default_rng(0)
    docs = ["".join(chr(97 + int(c)) for c in rng.integers(0, 25, int(n)))
            for n in rng.integers(2, 20, 60)]  # fmt: skip
    run = {"batch_size": 32, "total_steps": 5, "log_every": 1, "progress_bar": False}
    configs = {
        "sae": TrainConfig(
            sae={"d_in": 32, "d_sae": 64, "site_in": "blocks.0.resid_post",
                 "norm_estimation_batches": 2},
            loss={"l0_coeff": 0.01, "sparsity_warmup_steps": 2},
            optim={"lr": 1e-2, "warmup_steps": 1}, run=run,
        ),
        "tc": TrainConfig(
            sae={"d_in": 32, "d_sae": 48, "site_in": "blocks.0.mlp_in",
                 "site_out": "blocks.0.mlp_out", "architecture": "topk", "k": 4,
                 "norm_estimation_batches": 2},
            optim={"lr": 1e-2, "warmup_steps": 1}, run=run,
        ),
    }  # fmt: skip
    stream = StreamConfig(context_len=8, contexts_per_refill=8, refill_every=2, buffer_refills=3,
                          seed=3, log_every=1, progress_bar=False)  # fmt: skip

    def train(mesh=None, lm=model, stream=stream, **kwargs):
        return train_streaming(lm, configs, Corpus.from_texts(docs), tokenizer=Tok(),
                               stream=stream, mesh=mesh, **kwargs)  # fmt: skip

    single = train()
    out = {"n_devices": len(jax.devices()), "compare": {}}
    for name in MESHES:
        data, model_axis = (int(n) for n in name.split("x"))
        mesh = make_mesh(data, model_axis)
        lm = shard(model, mesh) if model_axis > 1 else model
        sharded = train(mesh, lm)
        rows = {}
        for key, ref in single.dictionaries.items():
            got = sharded.dictionaries[key]
            rows[key] = {
                "params": {
                    k: float(np.max(np.abs(got.params[k] - v)) / (np.max(np.abs(v)) + 1e-12))
                    for k, v in ref.params.items()
                },
                "metrics": {
                    m: float(
                        np.max(
                            np.abs(
                                np.subtract(
                                    [r[m] for r in got.metrics], [r[m] for r in ref.metrics]
                                )
                            )
                        )
                    )
                    for m in ("loss", "fvu", "l0", "grad_norm")
                },  # fmt: skip
                "steps": [r["step"] for r in got.metrics],
                "fvu_first_last": [ref.metrics[0]["fvu"], ref.metrics[-1]["fvu"]],
            }
        out["compare"][name] = rows
        out.setdefault("resume", {})[name] = _resume_on_mesh(train, mesh, lm, sharded)
    odd = StreamConfig(context_len=8, contexts_per_refill=6, refill_every=2, buffer_refills=3)
    try:
        train(make_mesh(4, 2), stream=odd)
        out["refusal"] = ""
    except ValueError as exc:
        out["refusal"] = str(exc)
    return out


def _resume_on_mesh(train, mesh, lm, whole) -> dict:
    """Kill after 2 steps and resume, on the mesh: the first run's last step, the resumed run's
    steps and its largest weight difference from ``whole`` (the uninterrupted mesh run)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        first = train(mesh, lm, checkpoint_dir=folder, stop_at=2)
        again = train(mesh, lm, checkpoint_dir=folder)
    return {
        "first_step": first.step,
        "steps": {k: [r["step"] for r in d.metrics] for k, d in again.dictionaries.items()},
        "max_diff": max(
            float(np.max(np.abs(np.asarray(again.dictionaries[k].params[p]) - v)))
            for k, d in whole.dictionaries.items()
            for p, v in ((p, np.asarray(v)) for p, v in d.params.items())
        ),
    }


@pytest.fixture(scope="module")
def result() -> dict:
    from tests.simulated_devices import run_result

    return run_result([str(Path(__file__))], timeout=600)


@pytest.mark.slow  # one subprocess (~40 s of CPU, mostly compiling) shared by the module
@pytest.mark.parametrize("mesh", MESHES)
def test_data_parallel_stream_equals_single_device_run(result, mesh):
    assert result["n_devices"] == 8
    for name, row in result["compare"][mesh].items():
        assert row["steps"] == list(range(5)), (mesh, name)
        # The run trains (FVU falls), and every weight and metric matches to float tolerance.
        first, last = row["fvu_first_last"]
        assert last < first, (mesh, name, row)
        for key, diff in row["params"].items():
            assert diff < 1e-4, (mesh, name, key, diff)
        for key, diff in row["metrics"].items():
            assert diff < 1e-3, (mesh, name, key, diff)


@pytest.mark.slow  # shares the subprocess above
@pytest.mark.parametrize("mesh", MESHES)
def test_kill_and_resume_on_the_mesh_gives_identical_weights(result, mesh):
    resume = result["resume"][mesh]
    assert resume["first_step"] == 2
    assert resume["steps"] == {"sae": [2, 3, 4], "tc": [2, 3, 4]}
    assert resume["max_diff"] == 0.0, resume


@pytest.mark.slow  # shares the subprocess above
def test_contexts_that_do_not_split_over_the_data_axis_are_refused(result):
    assert "6 contexts per refill do not split over the data axis of size 4" in result["refusal"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print("RESULT" + json.dumps(_worker()))
