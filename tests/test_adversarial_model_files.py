"""Bad model files and bad token ids: each refused with a one-line error naming what is wrong."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from gemma_scope_pz.models.checkpoints import load_params
from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.gemma3 import Gemma3LM, check_token_ids, forward
from gemma_scope_pz.models.sampling import generate
from gemma_scope_pz.scope.interventions import capture
from tests import fixtures_checkpoints as fx

CONFIG = Gemma3Config.tiny()


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------ non-finite weights


@pytest.mark.parametrize("kind", ["gguf", "hf", "orbax"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_names_the_tensor(tmp_path, kind, bad):
    params = fx.random_params(CONFIG, seed=3)
    params["blocks.1.mlp.down"][2, 3] = bad
    path, _, _ = fx.write_checkpoint(kind, tmp_path, CONFIG, params=params)
    stored = {
        "gguf": r"blk\.1\.ffn_down\.weight",
        "hf": r"model\.layers\.1\.mlp\.down_proj\.weight",
        "orbax": r"layer_1/mlp/linear",
    }[kind]
    word = "NaN" if np.isnan(bad) else "Inf"
    with pytest.raises(ValueError, match=rf"'{stored}' contains {word}") as error:
        load_params(path)
    assert str(path.name) in _one_line(error) or kind == "hf"


# ------------------------------------------------------------------ safetensors headers


def _hf_dir(tmp_path, **kwargs):
    params = fx.random_params(CONFIG, seed=4)
    return fx.write_hf_dir(
        tmp_path / "hf", fx.hf_config(CONFIG), fx.hf_tensors(CONFIG, params), **kwargs
    )


def _rewrite_header(path, edit) -> None:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size :])


def _first_two(header):
    names = sorted(
        (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"]
    )
    return header[names[0]], header[names[1]]


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: _first_two(h)[1].__setitem__(
            "data_offsets", [4, _first_two(h)[1]["data_offsets"][1]]
        ),
        lambda h: _first_two(h)[0].__setitem__("data_offsets", [0, 10**12]),
        lambda h: _first_two(h)[1].__setitem__("data_offsets", [-8, 8]),
        lambda h: _first_two(h)[0].__setitem__("shape", [10**6]),
    ],
    ids=["overlapping", "past_end", "negative", "shape_mismatch"],
)
def test_bad_safetensors_header_names_the_file(tmp_path, edit):
    directory = _hf_dir(tmp_path)
    _rewrite_header(directory / "model.safetensors", edit)
    with pytest.raises(ValueError, match=r"model\.safetensors: invalid safetensors file") as error:
        load_params(directory)
    _one_line(error)


def test_truncated_safetensors_and_garbage_header(tmp_path):
    directory = _hf_dir(tmp_path)
    shard = directory / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 16])
    with pytest.raises(ValueError, match=r"model\.safetensors: invalid safetensors file"):
        load_params(directory)
    shard.write_bytes(struct.pack("<Q", 9) + b"{not json")
    with pytest.raises(ValueError, match=r"model\.safetensors: invalid safetensors file"):
        load_params(directory)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors"])
def test_shard_index_paths_stay_inside_the_folder(tmp_path, shard):
    directory = _hf_dir(tmp_path, shards=2)
    index = directory / "model.safetensors.index.json"
    content = json.loads(index.read_text())
    name = next(iter(content["weight_map"]))
    content["weight_map"][name] = shard
    index.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=r"index\.json: shard path .* outside the model folder"):
        load_params(directory)


def test_index_that_is_not_json_or_maps_a_missing_tensor(tmp_path):
    directory = _hf_dir(tmp_path, shards=2)
    index = directory / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    index.write_text("{oops")
    with pytest.raises(ValueError, match=r"index\.json: not a safetensors index"):
        load_params(directory)
    wrong = dict(good["weight_map"])
    name = "model.layers.0.mlp.up_proj.weight"
    other = next(s for s in set(wrong.values()) if s != wrong[name])
    wrong[name] = other
    index.write_text(json.dumps({"weight_map": wrong}))
    with pytest.raises(ValueError, match=rf"'{name}' is mapped to {other}, which lacks it"):
        load_params(directory)


def test_config_json_that_is_not_json(tmp_path):
    directory = _hf_dir(tmp_path)
    (directory / "config.json").write_text("{")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_params(directory)


# ------------------------------------------------------------------ token ids


def test_check_token_ids():
    ids = check_token_ids([[2, 5], [7, 63]], 64)
    assert ids.dtype == np.int32 and ids.tolist() == [[2, 5], [7, 63]]
    with pytest.raises(ValueError, match=r"token id 64 at index \(1, 0\) is outside .*\[0, 64\)"):
        check_token_ids([[2, 5], [64, 3]], 64)
    with pytest.raises(ValueError, match=r"token id -1 at index \(1,\)"):
        check_token_ids([2, -1], 64)
    with pytest.raises(TypeError, match="integers"):
        check_token_ids(np.array([2.0, 3.0]), 64)


def test_forward_and_generate_refuse_out_of_range_ids():
    model = Gemma3LM.random(CONFIG, seed=0)
    with pytest.raises(ValueError, match=r"token id 64 at index \(0, 2\)"):
        forward(model, np.array([[2, 5, 64]]))
    with pytest.raises(ValueError, match=r"prompts: token id 70"):
        generate(model, [[2, 5], [2, 70, 3]], max_new_tokens=2)
    with pytest.raises(ValueError, match="does not fit in int32"):
        forward(model, np.array([[2, 2**40]], dtype=np.int64))
    with pytest.raises(ValueError, match=r"token id -3 at index \(1, 1\)"):
        capture(model, [[2, 5], [2, -3]], "blocks.1.resid_post")
