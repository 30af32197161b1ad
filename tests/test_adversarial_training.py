"""Training and export under faults and bad input (issue 9): what is refused, and what stays exact.

* a checkpoint written with other hyper-parameters is refused on resume, naming every field;
* a run killed mid-way and resumed exports byte-identical files to an uninterrupted run;
* a run whose steps were mostly skipped for non-finite data fails with the count;
* ``train_dictionary(reuse=True)`` reuses an export only for the same config and activations, and
  replaces it atomically otherwise.
"""

import json
import os

import numpy as np
import pytest

from gemma_scope_pz.train.config import TrainConfig, apply_overrides
from gemma_scope_pz.train.export import export_gemma_scope_2, export_saelens
from gemma_scope_pz.train.normalize import Normaliser
from gemma_scope_pz.train.pipeline import train_dictionary
from gemma_scope_pz.train.store import ActivationCache
from gemma_scope_pz.train.trainer import train

SITE = "blocks.3.resid_post"


def _config(tmp_path, **overrides) -> TrainConfig:
    base = TrainConfig.from_dict(
        dict(
            sae=dict(
                d_in=8,
                d_sae=32,
                architecture="topk",
                k=4,
                site_in=SITE,
                site_out=SITE,
                norm_estimation_batches=2,
            ),
            loss=dict(sparsity_warmup_steps=2),
            optim=dict(lr=1e-2, warmup_steps=2),
            run=dict(
                batch_size=32,
                total_steps=6,
                log_every=2,
                checkpoint_every=2,
                progress_bar=False,
                model_name="gemma3-270m",
                checkpoint_dir=str(tmp_path / "checkpoints"),
                log_path=str(tmp_path / "metrics.jsonl"),
            ),
        )
    )
    return apply_overrides(base, overrides)


def _data(n=512, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * 3 + 0.5).astype(np.float32)


class Killed(Exception):
    pass


def _killed_at(x, step_to_die, batch=32):
    def batch_at(step):
        if step == step_to_die:
            raise Killed
        return x[(step * batch) % len(x) :][:batch]

    return batch_at


def _batches(x, batch=32):
    return lambda step: x[(step * batch) % len(x) :][:batch]


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"sae.k": 8}, ["sae.k"]),
        ({"optim.lr": 5e-3, "optim.lr_decay": "constant"}, ["optim.lr", "optim.lr_decay"]),
        ({"run.total_steps": 10}, ["num_steps"]),
        ({"loss.aux_k_coeff": 0.5}, ["loss.aux_k_coeff"]),
        ({"run.dtype": "bfloat16", "run.seed": 3}, ["run.dtype", "run.seed"]),
    ],
)
def test_resume_refuses_other_hyperparameters_naming_them(tmp_path, changes, named):
    x = _data()
    with pytest.raises(Killed):
        train(_config(tmp_path), _killed_at(x, 3))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    with pytest.raises(ValueError, match="cannot resume") as err:
        train(_config(tmp_path, **changes), _batches(x))
    for field in named:
        assert field in str(err.value)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before  # nothing lost or written


def test_resume_accepts_operational_changes(tmp_path):
    x = _data()
    with pytest.raises(Killed):
        train(_config(tmp_path), _killed_at(x, 3))
    result = train(_config(tmp_path, **{"run.log_every": 3, "run.progress_bar": True}), _batches(x))
    assert result.metrics[-1]["step"] == 5


def test_export_after_kill_and_resume_is_byte_identical(tmp_path):
    x = _data()
    config = _config(tmp_path)
    full = train(config, _batches(x))
    export_gemma_scope_2(full, tmp_path / "a" / "gs2")
    export_saelens(full, tmp_path / "a" / "saelens")
    with pytest.raises(Killed):
        train(config, _killed_at(x, 3), resume=False)
    resumed = train(config, _batches(x))
    export_gemma_scope_2(resumed, tmp_path / "b" / "gs2")
    export_saelens(resumed, tmp_path / "b" / "saelens")
    for name in ("gs2/params.safetensors", "gs2/config.json", "saelens/sae_weights.safetensors"):
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert a == b, name


def test_normaliser_holds_float32_values_however_it_was_built():
    x = _data() * 7.3
    fresh = Normaliser.estimate("center_unit", [x[:256], x[256:]])
    restored = Normaliser.from_arrays(fresh.to_arrays(), "center_unit")
    assert fresh.in_scale == restored.in_scale and fresh.out_scale == restored.out_scale
    assert np.array_equal(fresh.in_shift, restored.in_shift)
    assert fresh.in_scale == float(np.float32(fresh.in_scale))


def test_mostly_skipped_run_fails_with_the_count(tmp_path):
    x = _data()

    def mostly_nan(step):
        batch = x[:32].copy()
        if step >= 2:  # the normaliser batches are fine, every training step after 1 is not
            batch[0, 0] = np.nan
        return batch

    config = _config(tmp_path, **{"run.checkpoint_dir": None})
    with pytest.raises(FloatingPointError, match=r"4 of 6 steps were skipped .*first at step 2"):
        train(config, mostly_nan)

    def one_nan(step):
        batch = x[:32].copy()
        if step == 4:
            batch[1, 1] = np.inf
        return batch

    result = train(config, one_nan)
    assert result.n_skipped == 1
    assert result.to_autoencoder().meta.extra["n_skipped_steps"] == 1


def test_all_steps_skipped_is_refused_even_with_a_lenient_fraction(tmp_path):
    x = _data()
    config = _config(tmp_path, **{"run.checkpoint_dir": None, "run.max_skipped_fraction": 0.99})
    poisoned = np.where(np.arange(len(x))[:, None] % 2 == 0, np.nan, x).astype(np.float32)
    with pytest.raises(FloatingPointError, match=r"6 of 6 steps were skipped"):
        train(config, lambda step: poisoned[:32])


def _cache(tmp_path, x, corpus="texts-a"):
    with ActivationCache.create_or_resume(
        tmp_path / "cache", model_name="gemma3-270m", sites=[SITE], widths=[8], corpus=corpus
    ) as cache:
        cache.append(x)
    return ActivationCache.open(tmp_path / "cache")


def test_train_dictionary_reuses_only_a_matching_export(tmp_path):
    cache = _cache(tmp_path, _data())
    config = _config(tmp_path, **{"run.checkpoint_dir": None, "run.log_path": None})
    first = train_dictionary(config, cache, tmp_path / "out")
    assert not first.reused and first.n_skipped == 0
    again = train_dictionary(config, cache, tmp_path / "out")
    assert again.reused
    # another k: the export is not reused; the old checkpoints of k=4 are refused by name
    other = apply_overrides(config, {"sae.k": 8})
    with pytest.raises(ValueError, match=r"sae\.k: checkpoint 4 vs config 8"):
        train_dictionary(other, cache, tmp_path / "out")
    # the refused run left the earlier export whole
    assert json.loads((tmp_path / "out" / "gemma_scope_2" / "config.json").read_text())["l0"] > 0
    fresh = train_dictionary(other, cache, tmp_path / "fresh")
    assert not fresh.reused
    assert fresh.sae.meta.extra["train_config"]["sae"]["k"] == 8


def test_train_dictionary_does_not_reuse_an_export_of_other_activations(tmp_path):
    config = _config(tmp_path, **{"run.checkpoint_dir": None, "run.log_path": None})
    first = train_dictionary(config, _cache(tmp_path / "a", _data(seed=0)), tmp_path / "out")
    export = tmp_path / "out" / "gemma_scope_2" / "params.safetensors"
    before = export.read_bytes()
    other_data = _cache(tmp_path / "b", _data(seed=1), corpus="texts-b")
    # neither the export nor the checkpoints of the first run are taken for the other activations
    with pytest.raises(ValueError, match=r"run\.data_fingerprint: checkpoint"):
        train_dictionary(config, other_data, tmp_path / "out")
    assert export.read_bytes() == before
    second = train_dictionary(config, other_data, tmp_path / "other")
    assert not first.reused and not second.reused
    assert (tmp_path / "other" / "gemma_scope_2" / "params.safetensors").read_bytes() != before
    leftovers = [n for n in os.listdir(tmp_path / "out") if n.startswith(".")]
    assert leftovers == []  # no temporary folders left behind


def test_replacing_an_export_is_atomic(tmp_path):
    result = train(_config(tmp_path, **{"run.checkpoint_dir": None}), _batches(_data()))
    folder = tmp_path / "gs2"
    export_gemma_scope_2(result, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    broken = apply_overrides(result.config, {"run.model_name": "not-a-gemma"})
    with pytest.raises(ValueError, match="not a Gemma 3 model"):
        export_gemma_scope_2(type(result)(**{**vars(result), "config": broken}), folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["gs2", "metrics.jsonl"]
