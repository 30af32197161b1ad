"""TrainConfig: nested sections, type conversion and validation, overrides, old flat files."""

import dataclasses
import json
import pathlib
import warnings

import pytest

from gemma_scope_pz.train.config import (
    FLAT_NAMES,
    DictionaryConfig,
    LossConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    config_fields,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cfg(**sections):
    base = dict(
        sae=dict(
            d_in=8,
            d_sae=32,
            architecture="matryoshka",
            matryoshka_prefixes=[8, 16],
            site_in="blocks.3.resid_post",
        ),
        loss=dict(target_l0=20.0),
        run=dict(total_steps=10),
    )
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return TrainConfig.from_dict(base)


def test_json_and_yaml_round_trip(tmp_path):
    cfg = _cfg()
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    cfg.to_json(tmp_path / "c.json")
    cfg.to_yaml(str(tmp_path / "c.yaml"))
    assert TrainConfig.from_json(tmp_path / "c.json") == cfg
    assert TrainConfig.from_yaml(str(tmp_path / "c.yaml")) == cfg
    assert cfg.sae.matryoshka_prefixes == (8, 16, 32)
    assert set(json.loads(cfg.to_json())) == {"sae", "loss", "optim", "run"}
    assert cfg.to_flat_dict()["loss.target_l0"] == 20.0


def test_sections_built_directly_equal_the_parsed_ones():
    cfg = TrainConfig(
        sae=DictionaryConfig(
            d_in=8, d_sae=32, architecture="matryoshka", matryoshka_prefixes=(8, 16)
        ),
        loss=LossConfig(target_l0=20),
        run=RunConfig(total_steps=10),
    )
    cfg = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, site_in="blocks.3.resid_post"))
    assert cfg == _cfg()
    assert isinstance(cfg.loss.target_l0, float) and cfg.optim == OptimConfig()


def test_yaml_strings_become_annotated_types():
    cfg = TrainConfig.from_yaml(
        "sae: {d_in: 4, d_sae: 8, k: '2'}\noptim: {lr: 5e-4}\nrun: {total_tokens: 1e3}\n"
    )
    assert cfg.optim.lr == 5e-4 and type(cfg.optim.lr) is float  # PyYAML reads 5e-4 as a string
    assert cfg.sae.k == 2 and type(cfg.sae.k) is int
    assert cfg.run.total_tokens == 1000 and type(cfg.run.total_tokens) is int


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("optim", {"lr": 0}, r"optim\.lr=0\.0: must be > 0"),
        ("optim", {"lr": -1e-3}, r"optim\.lr"),
        ("optim", {"lr": "fast"}, r"optim\.lr='fast': expected a number"),
        ("optim", {"lr": float("nan")}, r"optim\.lr=nan: expected a finite number"),
        ("sae", {"k": 0}, r"sae\.k=0: must be >= 1"),
        ("sae", {"k": 2.5}, r"sae\.k=2\.5: expected an integer"),
        ("sae", {"k": True}, r"sae\.k=True: expected an integer, got a boolean"),
        ("sae", {"d_sae": 0}, r"sae\.d_sae=0"),
        ("sae", {"d_out": 0}, r"sae\.d_out=0"),
        (
            "sae",
            {"unit_norm_decoder": "false"},
            r"sae\.unit_norm_decoder='false': expected true or false",
        ),
        ("sae", {"architecture": "gated"}, r"sae\.architecture='gated': expected one of"),
        ("sae", {"matryoshka_prefixes": [16, 8]}, r"sae\.matryoshka_prefixes=\[16, 8\]"),
        ("sae", {"affine_skip": True}, r"sae\.affine_skip needs a transcoder"),
        ("run", {"total_steps": 0}, r"run\.total_steps=0: must be >= 1"),
        ("run", {"total_steps": -5}, r"run\.total_steps=-5"),
        ("run", {"batch_size": 0}, r"run\.batch_size=0"),
        ("optim", {"adam_b1": 1.5}, r"optim\.adam_b1=1\.5: must be <= 1"),
        ("loss", {"l1_coeff": -1}, r"loss\.l1_coeff=-1\.0: must be >= 0"),
    ],
)
def test_invalid_values_are_named(section, values, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**{section: values})


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sae: {d_in: 4, d_sae: 8}\noptim: {lr: 0}\nrun: {total_steps: 3}\n")
    with pytest.raises(ValueError, match=rf"{path}: optim\.lr=0\.0: must be > 0"):
        TrainConfig.from_yaml(path)
    path.write_text("sae: {d_in: 4\n")
    with pytest.raises(ValueError, match=rf"{path}: not valid YAML"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ValueError, match="expected a mapping"):
        TrainConfig.from_yaml("- 1\n- 2\n")


def test_missing_and_unknown_keys_are_named():
    text = _cfg().to_json().replace('"l1_coeff"', '"l1_coef"')
    with pytest.raises(ValueError, match=r"loss\.l1_coef"):
        TrainConfig.from_json(text)
    with pytest.raises(ValueError, match=r"learning_rate"):
        TrainConfig.from_yaml(
            "sae: {d_in: 4, d_sae: 8}\nrun: {total_steps: 3}\nlearning_rate: 0.1\n"
        )
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['sae.d_sae'\]"):
        TrainConfig.from_yaml("sae: {d_in: 4}\nrun: {total_steps: 3}\n")
    with pytest.raises(ValueError, match="run.total_steps or run.total_tokens"):
        TrainConfig.from_yaml("sae: {d_in: 4, d_sae: 8}\n")
    with pytest.raises(ValueError, match="section 'run' must be a mapping"):
        TrainConfig.from_yaml("sae: {d_in: 4, d_sae: 8}\nrun: 3\n")


def test_old_flat_files_still_load_with_a_warning(tmp_path):
    flat = {"d_in": 4, "d_sae": 8, "k": 2, "architecture": "topk", "lr": "5e-4", "total_steps": 3}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(flat))
    with pytest.warns(DeprecationWarning, match="flat config keys are deprecated"):
        cfg = TrainConfig.from_json(path)
    assert (cfg.sae.k, cfg.sae.architecture, cfg.optim.lr, cfg.run.total_steps) == (
        2,
        "topk",
        5e-4,
        3,
    )
    with pytest.warns(DeprecationWarning, match=r"TrainConfig\.sae\.k"):
        assert cfg.k == 2  # old flat attribute reads keep working for one release
    with pytest.raises(AttributeError, match="no attribute 'kk'"):
        cfg.kk  # noqa: B018
    with pytest.warns(DeprecationWarning, match="replace"):
        changed = cfg.replace(k=3, log_path="x.jsonl")
    assert (changed.sae.k, changed.run.log_path) == (3, "x.jsonl")
    assert cfg.replace(run=RunConfig(total_steps=5)).num_steps == 5


def test_every_old_flat_name_has_one_home():
    # the 48 fields of the flat config + run.max_skipped_fraction + run.data_fingerprint
    # + loss.frequency_coeff, loss.max_firing_fraction + sae.sparse_jumprelu, sae.sparse_cap
    # + loss.dead_preact_coeff + sae.b_enc_init
    assert len(FLAT_NAMES) == 56
    assert {f.key for f in config_fields()} == {f"{s}.{n}" for n, s in FLAT_NAMES.items()}
    assert all(f.help for f in config_fields())


def test_shipped_config_is_nested_and_valid():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        cfg = TrainConfig.from_yaml(ROOT / "configs" / "resid_post_l9_4096.yaml")
    assert (cfg.sae.d_sae, cfg.sae.architecture, cfg.optim.lr, cfg.run.batch_size) == (
        4096,
        "batchtopk",
        5e-4,
        2048,
    )


def test_overrides_parse_strings_into_annotated_types():
    cfg = TrainConfig.from_overrides(
        _cfg(),
        [
            "sae.k=4",
            "optim.lr=1e-3",
            "sae.unit_norm_decoder=false",
            "loss.target_l0=none",
            "sae.matryoshka_prefixes=4,8",
            "run.log_path=/tmp/x.jsonl",
        ],
    )
    assert (cfg.sae.k, cfg.optim.lr, cfg.sae.unit_norm_decoder) == (4, 1e-3, False)
    assert cfg.loss.target_l0 is None and cfg.sae.matryoshka_prefixes == (4, 8, 32)
    assert cfg.run.log_path == "/tmp/x.jsonl"
    with pytest.raises(ValueError, match=r"override 'sae\.kk'"):
        apply_overrides(cfg, {"sae.kk": "3"})
    with pytest.raises(ValueError, match=r"sae\.k='x'"):
        apply_overrides(cfg, {"sae.k": "x"})
    with pytest.raises(ValueError, match=r"sae\.affine_skip='maybe': expected true or false"):
        apply_overrides(cfg, {"sae.affine_skip": "maybe"})
    with pytest.raises(ValueError, match=r"optim\.lr=0\.0: must be > 0"):
        apply_overrides(cfg, {"optim.lr": "0"})
    with pytest.raises(ValueError, match="expected section.field=value"):
        TrainConfig.from_overrides(cfg, ["sae.k"])


def test_field_metadata_drives_cli_help():
    fields = {f.key: f for f in config_fields()}
    assert fields["sae.k"].type_name == "int" and fields["sae.k"].default == 32
    assert fields["optim.lr"].help.startswith("Peak learning rate")
    assert fields["run.total_steps"].type_name == "int | None"
    assert "batchtopk" in fields["sae.architecture"].type_name
    assert fields["sae.d_in"].default is dataclasses.MISSING


def test_derived_values():
    cfg = TrainConfig.from_dict(
        dict(
            sae=dict(d_in=4, d_sae=8, architecture="topk", k=2),
            loss=dict(dead_window_tokens=640),
            run=dict(total_tokens=1000, batch_size=64),
        )
    )
    assert cfg.num_steps == 16 and cfg.dead_window_steps == 10 and cfg.effective_aux_k == 4
    assert not cfg.sae.is_transcoder
    assert _cfg(sae=dict(architecture="relu", d_out=6)).sae.is_transcoder
    hyper = cfg.hyperparameters()
    assert "optim.lr" in hyper and "run.log_path" not in hyper and "run.checkpoint_dir" not in hyper


def test_sections_may_be_given_as_mappings():
    cfg = TrainConfig(
        sae={"d_in": 8, "d_sae": 32, "architecture": "matryoshka", "matryoshka_prefixes": [8, 16]},
        loss={"target_l0": 20},
        run={"total_steps": "10"},
    )
    cfg = apply_overrides(cfg, {"sae.site_in": "blocks.3.resid_post"})
    assert cfg == _cfg() and isinstance(cfg.sae, DictionaryConfig)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sae.kk'\]"):
        TrainConfig(sae={"d_in": 8, "d_sae": 32, "kk": 1}, run={"total_steps": 1})
    with pytest.raises(TypeError, match="TrainConfig.optim: expected OptimConfig"):
        TrainConfig(sae={"d_in": 8, "d_sae": 32}, run={"total_steps": 1}, optim=3)
