"""SAE checkpoint files: finding them (local folder or Hugging Face Hub) and reading safetensors.

A source is a local folder, a hub repo id ``"owner/name"`` with a separate sub-folder, or a single
``"owner/name:folder"`` string. All hub access of the dictionary loaders goes through this module
(``hf_hub_download`` and ``list_repo_files``), so tests replace it here.

Safetensors files are a little-endian u64 header length, a JSON header (dtype, shape and byte range
of each tensor), then the raw bytes. The header is parsed and validated here as strictly as the
reference parser (offsets non-negative, contiguous from 0, non-overlapping, covering exactly the data
buffer, sizes matching shapes) so that bfloat16 files load without torch. Tensors are read one at a
time into 64-byte-aligned host buffers (in chunks, casting on the way), handed to ``jax.device_put``
(zero-copy on CPU) and the host reference dropped, so peak host memory stays close to the file size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from huggingface_hub import hf_hub_download, list_repo_files

from gemma_scope_pz.scope.formats.hook_names import ARCHITECTURE_NAMES

__all__ = [
    "CONFIG_FILE",
    "FLOAT_DTYPES",
    "NPZ_FILE",
    "PARAMS_FILE",
    "CheckpointError",
    "TensorEntry",
    "LOADERS",
    "check_jumprelu",
    "check_shapes",
    "check_type",
    "check_tensors",
    "fetch_files",
    "labels_from_folder",
    "list_folder_files",
    "load_tensors",
    "read_json",
    "read_safetensors_header",
    "read_tensor",
    "split_source",
]

CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
NPZ_FILE = "params.npz"
# Gemma Scope 2 config "type" -> the loader that reads it (a type no loader reads is refused by name).
LOADERS = {
    "sae": "load_sae",
    "transcoder": "load_sae",
    "clt": "load_clt",
    "crosscoder": "load_crosscoder",
}

_CHUNK_BYTES = 64 << 20
_MAX_HEADER_BYTES = 100_000_000  # the reference parser's limit
FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}
_ITEM_SIZES = {
    **{"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1},
    **{"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1},
}


class CheckpointError(ValueError):
    """A checkpoint file is malformed or disagrees with its config or the caller."""


# ---------------------------------------------------------------------------------------------
# Locating files


def is_local(source: str | os.PathLike) -> bool:
    """Whether ``source`` names a local path (a PathLike, an existing path, or "/", ".", "~")."""
    text = str(source)
    return (
        isinstance(source, os.PathLike) or os.path.exists(text) or text.startswith(("/", ".", "~"))
    )


def split_source(source: str | os.PathLike, folder: str | None) -> tuple[str, str | None, bool]:
    """(base, folder, is_local); "repo:folder" strings are split."""
    if is_local(source):
        return str(Path(source).expanduser()), folder, True
    text = str(source)
    if folder is None and ":" in text:
        text, folder = text.split(":", 1)
    if text.count("/") != 1:
        raise FileNotFoundError(
            f"{source!r} is neither an existing local folder nor a hub repo id 'owner/name' "
            "(give the folder separately or as 'owner/name:folder')"
        )
    return text, folder, False


def fetch_files(
    source: str | os.PathLike,
    folder: str | None,
    names: Sequence[str],
    revision: str | None,
    optional: Sequence[str] = (),
) -> tuple[dict[str, Path], str]:
    """Local paths of ``names`` (downloading from the hub if needed) and a source label."""
    base, folder, local = split_source(source, folder)
    paths: dict[str, Path] = {}
    if local:
        root = Path(base) / folder if folder else Path(base)
        for name in [*names, *optional]:
            path = root / name
            if path.is_file():
                paths[name] = path
            elif name not in optional:
                raise FileNotFoundError(f"{path}: missing file (expected in SAE folder {root})")
        return paths, str(root)
    prefix = f"{folder.strip('/')}/" if folder else ""
    for name in [*names, *optional]:
        try:
            paths[name] = Path(
                hf_hub_download(repo_id=base, filename=prefix + name, revision=revision)
            )
        except Exception as exc:  # the hub raises several error types
            if name in optional:
                continue
            raise FileNotFoundError(f"could not download {base}/{prefix}{name}: {exc}") from exc
    return paths, f"{base}:{folder or ''}"


def list_folder_files(
    source: str | os.PathLike, folder: str | None, revision: str | None
) -> list[str]:
    """Names (relative to the folder) of the files in a local folder or a hub repo folder."""
    base, folder, local = split_source(source, folder)
    if local:
        root = Path(base) / folder if folder else Path(base)
        return [path.name for path in root.glob("*")]
    prefix = f"{folder.strip('/')}/" if folder else ""
    return [
        name[len(prefix) :]
        for name in list_repo_files(base, revision=revision)
        if name.startswith(prefix)
    ]


def labels_from_folder(folder: str) -> dict[str, str]:
    """``width_label`` ("16k") and ``l0_label`` ("small") parsed from a folder name, if present."""
    match = re.search(r"width_([0-9]+[kmKM]?)(?:_l0_([A-Za-z0-9]+))?", folder)
    labels = {}
    if match:
        labels["width_label"] = match.group(1)
        if match.group(2):
            labels["l0_label"] = match.group(2)
    return labels


def read_json(path: Path) -> dict:
    """A JSON object from ``path``; CheckpointError naming the file if it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def check_type(config: Mapping, accepted: tuple[str, ...], where: str, what: str) -> str:
    """The config's ``type`` (default ``accepted[0]``); CheckpointError naming it and its loader if not accepted."""
    kind = config.get("type", accepted[0])
    if kind not in accepted:
        use = f" (use {LOADERS[kind]})" if kind in LOADERS else ""
        raise CheckpointError(f"{where}: type {kind!r} is not {what}{use}")
    return kind


def check_jumprelu(config: Mapping, where: str, what: str) -> None:
    """CheckpointError unless the config's ``architecture`` (default "jump_relu") is JumpReLU."""
    arch = str(config.get("architecture", "jump_relu")).lower()
    if ARCHITECTURE_NAMES.get(arch) != "jumprelu":
        raise CheckpointError(
            f"{where}: {what} architecture {arch!r} is not supported (only jump_relu)"
        )


# ---------------------------------------------------------------------------------------------
# Reading safetensors


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype name ("F32", "BF16", ...), shape, byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def _parse_entry(path: Path, key: str, entry: object, data_start: int) -> TensorEntry:
    """One validated header entry (dtype known, shape and offsets non-negative ints, size = shape)."""
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]
        ok = (
            isinstance(dtype, str)
            and isinstance(shape, list)
            and all(type(d) is int and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(v) is int and v >= 0 for v in offsets)
        )
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: malformed header entry for {key!r}: {entry!r}") from exc
    if not ok:
        raise CheckpointError(f"{path}: malformed header entry for {key!r}: {entry!r}")
    if dtype not in _ITEM_SIZES:
        raise CheckpointError(f"{path}: tensor {key!r} has unknown dtype {dtype!r}")
    begin, end = offsets
    nbytes = int(np.prod(shape, dtype=np.int64)) * _ITEM_SIZES[dtype]
    if end < begin or end - begin != nbytes:
        raise CheckpointError(
            f"{path}: tensor {key!r} {dtype}{tuple(shape)} needs {nbytes} bytes but its "
            f"data_offsets are [{begin}, {end}]"
        )
    return TensorEntry(dtype, tuple(shape), data_start + begin, data_start + end)


def _check_layout(path: Path, infos: Mapping[str, TensorEntry], data_start: int, size: int) -> None:
    """Tensors must tile the data buffer exactly: from 0, contiguous, no overlap, to the file end."""
    position = data_start
    for key, info in sorted(infos.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.start != position:
            what = "overlaps the previous tensor" if info.start < position else "leaves a gap"
            raise CheckpointError(
                f"{path}: tensor {key!r} starts at data offset {info.start - data_start}: {what} "
                f"(expected {position - data_start})"
            )
        if info.end > size:
            raise CheckpointError(
                f"{path}: tensor {key!r} runs past the end of the file (truncated?)"
            )
        position = info.end
    if position != size:
        raise CheckpointError(
            f"{path}: {size - position} bytes after the last tensor (data does not match the header)"
        )


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors listed in ``path``'s header (``__metadata__`` skipped), fully validated.

    Raises:
      CheckpointError: naming the file (and tensor), for a short file, a bad header length, bad
        JSON, a malformed entry, an unknown dtype, a size that does not match the shape, overlapping
        or non-contiguous offsets, a truncated file or trailing bytes.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > _MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: header length {n} exceeds the file size {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    infos = {
        key: _parse_entry(path, key, entry, 8 + n)
        for key, entry in header.items()
        if key != "__metadata__"
    }
    _check_layout(path, infos, 8 + n, size)
    return infos


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array whose data is 64-byte aligned (jax.device_put is then zero-copy on CPU)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = (-raw.ctypes.data) % 64
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def read_tensor(path: Path, key: str, info: TensorEntry, dtype, tail_start: int = 0) -> np.ndarray:
    """Reads one tensor in row chunks into a fresh aligned ``dtype`` buffer, checking finiteness.

    With ``tail_start`` > 0 only ``tensor[:, tail_start:, ...]`` is kept (used for
    cross-layer decoders). Chunks keep temporaries (casts, the isfinite mask) small.
    """
    src = np.dtype(FLOAT_DTYPES[info.dtype])
    shape = info.shape if info.shape else (1,)
    if (info.end - info.start) != int(np.prod(shape)) * src.itemsize:
        raise CheckpointError(f"{path}: tensor {key!r} byte size does not match shape {info.shape}")
    out_shape = (shape[0], shape[1] - tail_start, *shape[2:]) if tail_start else shape
    out = aligned_empty(out_shape, dtype)
    row_bytes = int(np.prod(shape[1:])) * src.itemsize
    rows_per_chunk = max(1, _CHUNK_BYTES // max(row_bytes, 1))
    with open(path, "rb") as f:
        f.seek(info.start)
        for r0 in range(0, shape[0], rows_per_chunk):
            r1 = min(shape[0], r0 + rows_per_chunk)
            if not tail_start and src == out.dtype:
                f.readinto(memoryview(out[r0:r1].reshape(-1).view(np.uint8)))
            else:
                chunk = np.frombuffer(f.read((r1 - r0) * row_bytes), src)
                chunk = chunk.reshape(r1 - r0, *shape[1:])
                out[r0:r1] = chunk[:, tail_start:] if tail_start else chunk
            if not np.isfinite(out[r0:r1]).all():
                raise CheckpointError(f"{path}: tensor {key!r} {info.shape} contains NaN or Inf")
    return out.reshape(info.shape) if not info.shape else out


def load_tensors(
    path: Path,
    infos: Mapping[str, TensorEntry],
    keys: Sequence[str],
    dtype,
    tail_start: Mapping[str, int] | None = None,
) -> dict[str, jax.Array]:
    """Loads ``keys`` one at a time onto the default device."""
    out = {}
    for key in keys:
        host = read_tensor(path, key, infos[key], dtype, (tail_start or {}).get(key, 0))
        out[key] = jax.device_put(host)
        del host  # on CPU the device array now owns the buffer; elsewhere it is freed
    return out


def check_tensors(path: Path, infos: Mapping[str, TensorEntry], required: Sequence[str]) -> None:
    """Raises CheckpointError if a ``required`` tensor is missing or not a float dtype."""
    missing = [key for key in required if key not in infos]
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing}; file has {sorted(infos)}")
    for key, info in infos.items():
        if key in required and info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {key!r} has dtype {info.dtype}, expected one of {sorted(FLOAT_DTYPES)}"
            )


def check_shapes(
    path: Path,
    actual: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    why: str,
) -> None:
    """Raises CheckpointError (ending with ``why``) if a present tensor has another shape."""
    for key, want in expected.items():
        if key in actual and tuple(actual[key]) != tuple(want):
            raise CheckpointError(
                f"{path}: tensor {key!r} has shape {tuple(actual[key])}, expected {tuple(want)} ({why})"
            )
