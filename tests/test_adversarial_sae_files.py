"""Adversarial SAE files: every malformed input is a one-line error naming the file and what is wrong,
and nothing is written or lost (loaders write nothing; a refused or failing save leaves no folder, no
temporary sibling, and an existing export untouched)."""

from __future__ import annotations

import errno
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from gemma_scope_pz.scope.formats import (
    CheckpointError,
    load_gemma_scope_1,
    load_sae,
    save_gemma_scope_2,
    save_saelens,
)
from gemma_scope_pz.scope.formats import gemma_scope_2 as gs2_module
from gemma_scope_pz.scope.formats.files import read_safetensors_header
from gemma_scope_pz.scope.layers import AutoEncoder, SaeMeta

D, W = 4, 6


def tensors(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w_enc": rng.normal(size=(D, W)).astype(np.float32),
        "b_enc": rng.normal(size=W).astype(np.float32),
        "w_dec": rng.normal(size=(W, D)).astype(np.float32),
        "b_dec": rng.normal(size=D).astype(np.float32),
        "threshold": np.abs(rng.normal(size=W)).astype(np.float32),
    }


def write_config(folder: Path, **changes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"type": "sae", "architecture": "jump_relu", "width": W, "model_name": "google/gemma-3-270m",
              "hf_hook_point_in": "model.layers.2.output", **changes}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))


def raw_safetensors(header: dict, data: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def f32_entry(shape, begin):
    return {
        "dtype": "F32",
        "shape": list(shape),
        "data_offsets": [begin, begin + 4 * int(np.prod(shape))],
    }


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


HEADER_CASES = {
    "negative offset": (
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}},
        b"\0" * 8,
        r"malformed header entry for 'a'",
    ),
    "end before begin": (
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
        b"\0" * 8,
        r"'a' F32\(2,\) needs 8 bytes but its data_offsets are \[8, 0\]",
    ),
    "overlap": (
        {"a": f32_entry([2], 0), "b": f32_entry([2], 4)},
        b"\0" * 12,
        r"tensor 'b' starts at data offset 4: overlaps the previous tensor \(expected 8\)",
    ),
    "gap": (
        {"a": f32_entry([2], 0), "b": f32_entry([2], 12)},
        b"\0" * 20,
        r"tensor 'b' starts at data offset 12: leaves a gap \(expected 8\)",
    ),
    "not from zero": (
        {"a": f32_entry([2], 4)},
        b"\0" * 12,
        r"'a' starts at data offset 4: leaves a gap",
    ),
    "trailing bytes": ({"a": f32_entry([2], 0)}, b"\0" * 12, r"4 bytes after the last tensor"),
    "past the end": (
        {"a": f32_entry([4], 0)},
        b"\0" * 8,
        r"tensor 'a' runs past the end of the file",
    ),
    "size != shape": (
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
        b"\0" * 8,
        r"'a' F32\(3,\) needs 12 bytes but its data_offsets are \[0, 8\]",
    ),
    "unknown dtype": (
        {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
        b"\0" * 16,
        r"tensor 'a' has unknown dtype 'F128'",
    ),
    "float offsets": (
        {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}},
        b"\0" * 8,
        r"malformed header entry for 'a'",
    ),
    "negative dim": (
        {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
        b"\0" * 8,
        r"malformed header entry for 'a'",
    ),
    "bool as int": (
        {"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
        b"\0" * 4,
        r"malformed header entry for 'a'",
    ),
    "missing field": (
        {"a": {"dtype": "F32", "shape": [2]}},
        b"\0" * 8,
        r"malformed header entry for 'a'",
    ),
    "header is a list": ([1, 2], b"", r"safetensors header is not a JSON object"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_safetensors_headers_validated_like_the_reference_parser(tmp_path, case):
    header, data, match = HEADER_CASES[case]
    path = tmp_path / "params.safetensors"
    path.write_bytes(raw_safetensors(header, data))
    with pytest.raises(CheckpointError, match=match) as info:
        read_safetensors_header(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_header_length_and_json(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(
        CheckpointError, match=r"header length 1000000000000 exceeds the file size 10"
    ):
        read_safetensors_header(path)
    path.write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(CheckpointError, match="unreadable safetensors header"):
        read_safetensors_header(path)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"not a safetensors file \(only 3 bytes\)"):
        read_safetensors_header(path)


def test_valid_files_with_metadata_still_read(tmp_path):
    save_file(tensors(), str(tmp_path / "params.safetensors"), metadata={"format": "np"})
    infos = read_safetensors_header(tmp_path / "params.safetensors")
    assert infos["w_enc"].shape == (D, W) and "__metadata__" not in infos


@pytest.mark.parametrize(
    "change,config,match",
    [
        (
            lambda t: t.pop("threshold"),
            {},
            r"params\.safetensors: missing tensor\(s\) \['threshold'\]",
        ),
        (
            lambda t: t["b_enc"].__setitem__(1, np.inf),
            {},
            r"tensor 'b_enc' \(6,\) contains NaN or Inf",
        ),
        (
            lambda t: t["w_enc"].__setitem__((0, 0), np.nan),
            {},
            r"tensor 'w_enc' \(4, 6\) contains NaN or Inf",
        ),
        (
            lambda t: t.update(b_dec=t["b_dec"].astype(np.int64)),
            {},
            r"tensor 'b_dec' has dtype I64",
        ),
        (lambda t: None, {"type": "crosscoder"}, r"type 'crosscoder' is not an SAE/transcoder"),
        (lambda t: None, {"type": "mystery"}, r"type 'mystery' is not an SAE/transcoder"),
        (lambda t: None, {"architecture": "gated"}, r"unsupported architecture 'gated'"),
        (lambda t: None, {"width": "6"}, r"config\.json says width=6"),
        (
            lambda t: None,
            {"affine_connection": "false"},
            r"affine_connection must be true or false, got 'false'",
        ),
        (
            lambda t: None,
            {"hf_hook_point_in": "model.layers.٣.output"},
            r"unknown Gemma Scope hook point",
        ),
    ],
)
def test_bad_gemma_scope_2_folders(tmp_path, change, config, match):
    folder = tmp_path / "sae"
    t = tensors()
    change(t)
    write_config(folder, **config)
    save_file(t, str(folder / "params.safetensors"))
    before = listing(tmp_path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_sae(folder)
    assert "\n" not in str(info.value) and str(folder) in str(info.value)
    assert listing(tmp_path) == before  # a loader writes nothing


def test_config_not_json_or_not_an_object(tmp_path):
    write_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_sae(tmp_path)
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"config\.json: expected a JSON object, got list"):
        load_sae(tmp_path)


def test_npz_object_arrays_refused_by_name_never_unpickled(tmp_path):
    a = {k.replace("w_", "W_"): v for k, v in tensors().items()}
    a["W_dec"] = np.array([{"evil": 1}], dtype=object)
    np.savez(tmp_path / "params.npz", **a)
    with pytest.raises(
        CheckpointError, match=r"params\.npz: array 'W_dec' is not a plain numeric array"
    ):
        load_gemma_scope_1(tmp_path)
    a = {k.replace("w_", "W_"): v for k, v in tensors().items()}
    a["threshold"] = np.array(["a", "b"])
    np.savez(tmp_path / "params.npz", **a)
    with pytest.raises(
        CheckpointError, match=r"array 'threshold' \(2,\) has dtype <U1, expected floats"
    ):
        load_gemma_scope_1(tmp_path)
    a.pop("threshold")
    np.savez(tmp_path / "params.npz", **a)
    with pytest.raises(CheckpointError, match=r"missing array\(s\) \['threshold'\]"):
        load_gemma_scope_1(tmp_path)
    (tmp_path / "params.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match=r"params\.npz: not a readable \.npz file"):
        load_gemma_scope_1(tmp_path)


def _sae(activation="jumprelu", threshold_shift=0.0) -> AutoEncoder:
    t = tensors(1)
    meta = SaeMeta(D, W, D, site_in="blocks.2.resid_post", site_out="blocks.2.resid_post",
                   extra={"model_name": "270m"})  # fmt: skip
    th = t.pop("threshold") + threshold_shift
    return AutoEncoder.from_arrays(**t, threshold=th if activation == "jumprelu" else None,
                                   activation=activation, k=2 if activation == "topk" else None, meta=meta)  # fmt: skip


@pytest.mark.parametrize("save", [save_gemma_scope_2, save_saelens])
def test_refused_save_leaves_existing_export_untouched(tmp_path, save):
    out = save(_sae(), tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = _sae("jumprelu", threshold_shift=-10.0) if save is save_saelens else _sae("topk")
    with pytest.raises(ValueError):
        save(bad, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert listing(tmp_path) == sorted(["export", *(f"export/{n}" for n in before)])


def test_disk_full_during_save(tmp_path, monkeypatch):
    out = save_gemma_scope_2(_sae(), tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*_, **__):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gs2_module, "save_file", full)
    with pytest.raises(OSError, match=r"no space left on device while writing .*export"):
        save_gemma_scope_2(_sae(), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary sibling left
