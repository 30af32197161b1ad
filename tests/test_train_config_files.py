"""Every config file under configs/ trains exactly what it trained before the defaults changed.

``tests/data/train_config_files.json`` holds ``TrainConfig.from_yaml(path).to_dict()`` of each file,
recorded before the JumpReLU defaults changed (issue 14): a file that relied on an old default now
writes it out, so every field must still read back equal.
"""

import json
from pathlib import Path

import pytest

from gemma_scope_pz.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RECORDED = json.loads((ROOT / "tests/data/train_config_files.json").read_text())


def test_every_config_file_is_recorded():
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
    assert files == sorted(RECORDED)


# Fields added after the recording, each with the condition under which it cannot change what a
# config file trains.
ADDED_FIELDS = {
    ("loss", "dead_preact_coeff"): lambda c: c.sae.activation != "jumprelu",  # JumpReLU only
    ("sae", "b_enc_init"): lambda c: c.sae.b_enc_init == "zeros",  # the old initial b_enc
}


@pytest.mark.parametrize("path", sorted(RECORDED))
def test_config_file_reads_back_the_recorded_values(path):
    config = TrainConfig.from_yaml(ROOT / path)
    values = json.loads(json.dumps(config.to_dict()))
    for section, fields in RECORDED[path].items():
        for key, value in fields.items():
            assert values[section][key] == value, (path, f"{section}.{key}")
    added = {(s, k) for s, fields in values.items() for k in fields if k not in RECORDED[path][s]}
    for field in added:
        assert field in ADDED_FIELDS and ADDED_FIELDS[field](config), (path, field)
