"""TrainConfig serialisation and validation."""

import pytest

from gemma_scope_pz.train.config import TrainConfig


def _cfg(**kw):
    base = dict(
        d_in=8,
        d_sae=32,
        total_steps=10,
        architecture="matryoshka",
        matryoshka_prefixes=(8, 16),
        site_in="blocks.3.resid_post",
        target_l0=20.0,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_json_and_yaml_round_trip(tmp_path):
    cfg = _cfg()
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert TrainConfig.from_yaml(cfg.to_yaml()) == cfg
    cfg.to_json(tmp_path / "c.json")
    cfg.to_yaml(str(tmp_path / "c.yaml"))
    assert TrainConfig.from_json(tmp_path / "c.json") == cfg
    assert TrainConfig.from_yaml(str(tmp_path / "c.yaml")) == cfg
    assert cfg.matryoshka_prefixes == (8, 16, 32)


def test_unknown_key_is_rejected_by_name():
    text = _cfg().to_json().replace('"l1_coeff"', '"l1_coef"')
    with pytest.raises(ValueError, match="l1_coef"):
        TrainConfig.from_json(text)
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_yaml("d_in: 4\nd_sae: 8\ntotal_steps: 3\nlearning_rate: 0.1\n")


def test_invalid_values():
    with pytest.raises(ValueError, match="architecture"):
        _cfg(architecture="gated")
    with pytest.raises(ValueError, match="total_steps or total_tokens"):
        TrainConfig(d_in=4, d_sae=8)
    with pytest.raises(ValueError, match="matryoshka_prefixes"):
        _cfg(matryoshka_prefixes=(16, 8))
    with pytest.raises(ValueError, match="affine_skip"):
        _cfg(affine_skip=True)


def test_derived_values():
    cfg = TrainConfig(
        d_in=4,
        d_sae=8,
        total_tokens=1000,
        batch_size=64,
        architecture="topk",
        k=2,
        dead_window_tokens=640,
    )
    assert cfg.num_steps == 16 and cfg.dead_window_steps == 10 and cfg.effective_aux_k == 4
    assert not cfg.is_transcoder
    assert TrainConfig(d_in=4, d_sae=8, total_steps=1, d_out=6).is_transcoder
