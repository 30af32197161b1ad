"""Reading safetensors files tensor by tensor, with bounded host memory.

The format is a little-endian u64 header length, a JSON header (dtype, shape and byte range of
each tensor), then raw bytes. The header is parsed here so that bfloat16 files load without
torch. Tensors are read one at a time into 64-byte-aligned host buffers (in chunks, casting on
the way), handed to ``jax.device_put`` (zero-copy on CPU) and the host reference dropped, so
peak host memory stays close to the file size.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gemma_scope_pz.scope.checkpoint_files import CheckpointError

__all__ = [
    "FLOAT_DTYPES",
    "TensorEntry",
    "check_shapes",
    "check_tensors",
    "load_tensors",
    "read_safetensors_header",
    "read_tensor",
]

_CHUNK_BYTES = 64 << 20
FLOAT_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype name ("F32", "BF16", ...), shape, byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors listed in ``path``'s header (``__metadata__`` skipped), bounds-checked.

    Raises:
      CheckpointError: naming the file, for a short file, bad JSON, a malformed entry or a
        tensor that runs past the end of the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} exceeds the file size {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise CheckpointError(f"{path}: unreadable safetensors header: {exc}") from exc
    infos = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, end = (int(v) for v in entry["data_offsets"])
            infos[key] = TensorEntry(
                str(entry["dtype"]),
                tuple(int(d) for d in entry["shape"]),
                8 + n + begin,
                8 + n + end,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: malformed header entry for {key!r}: {entry!r}") from exc
        if 8 + n + end > size:
            raise CheckpointError(
                f"{path}: tensor {key!r} runs past the end of the file (truncated?)"
            )
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
