"""GGUF (llama.cpp) Gemma 3 checkpoints: a lean reader and the conversion to canonical params.

The reader parses the header itself instead of using ``gguf.GGUFReader``: the latter builds a
Python object for every one of the 262144 tokenizer strings, which takes ~10 s for the 270M
model. Here string arrays are skipped unless asked for, and tensor data stays memory-mapped
until ``gguf.quants.dequantize`` turns it into float32, one tensor at a time.

Layout facts (llama.cpp ``convert_hf_to_gguf.py``, ``Gemma3Model``): tensors keep the PyTorch
``[out, in]`` order (ggml lists dimensions innermost first, so numpy order is the reverse);
q/k are *not* permuted for Gemma; every ``*norm.weight`` is stored as ``1 + w``, i.e. already
the effective multiplier; embedding rows beyond the tokenizer's vocabulary are dropped.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import pathlib
import struct
from typing import Any

import gguf
import numpy as np
from tqdm.auto import tqdm

import gemma_scope_pz.models.checkpoints.layout as layout
from gemma_scope_pz.models.config import Gemma3Config

__all__ = ["GGUFFile", "TensorInfo", "config_from_gguf", "load_gguf", "read_gguf"]

# GGUF metadata value types: struct format of the scalar ones.
_SCALAR_FORMATS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY = 8, 9
# Tensor types that are plain numpy arrays on disk (everything else goes through dequantize).
_PLAIN_TYPES = {
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F64: np.float64,
}
# Files smaller than this load in seconds and show no progress bar.
_PROGRESS_MIN_BYTES = 1 << 30
# llama.cpp block tensor name -> canonical name within "blocks.{i}.".
_BLOCK_NAMES = {
    "attn_norm": "pre_attention_norm",
    "post_attention_norm": "post_attention_norm",
    "ffn_norm": "pre_ffw_norm",
    "post_ffw_norm": "post_ffw_norm",
    "attn_q_norm": "attn.query_norm",
    "attn_k_norm": "attn.key_norm",
    "attn_q": "attn.query",
    "attn_k": "attn.key",
    "attn_v": "attn.value",
    "attn_output": "attn.output",
    "ffn_gate": "mlp.gate",
    "ffn_up": "mlp.up",
    "ffn_down": "mlp.down",
}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a GGUF file.

    Attributes:
      name: Tensor name, e.g. ``"blk.0.attn_q.weight"``.
      ggml_type: Storage type (F32, Q4_K, ...).
      shape: Logical shape in numpy order (the reverse of ggml's dimension list).
      offset: Absolute byte offset of the data in the file.
      nbytes: Size of the stored data in bytes.
    """

    name: str
    ggml_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclasses.dataclass
class GGUFFile:
    """A parsed GGUF header plus a read-only memory map of the file.

    Attributes:
      path: The file.
      metadata: Key/value metadata; string arrays are ``None`` unless read with
        ``string_arrays=True``; numeric arrays are numpy arrays.
      tensors: Tensor descriptions by name, in file order.
    """

    path: pathlib.Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]

    def raw(self, name: str) -> np.ndarray:
        """The stored data of ``name`` as a memory-mapped array (bytes for quantized types)."""
        info = self.tensors[name]
        data = np.memmap(
            self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,)
        )
        if info.ggml_type in _PLAIN_TYPES:
            return data.view(_PLAIN_TYPES[info.ggml_type]).reshape(info.shape)
        return data.reshape(gguf.quants.quant_shape_to_byte_shape(info.shape, info.ggml_type))

    def dequantized(self, name: str) -> tuple[np.ndarray, bool]:
        """``(float array in numpy order, owned)``; ``owned`` is False for memory-mapped F32."""
        info = self.tensors[name]
        try:
            values = gguf.quants.dequantize(self.raw(name), info.ggml_type)
        except NotImplementedError as error:
            raise ValueError(f"{self.path}: tensor {name!r}: {error}") from error
        return values.reshape(info.shape), info.ggml_type != gguf.GGMLQuantizationType.F32


class _Cursor:
    """Sequential little-endian reads from a buffer, with file-naming truncation errors."""

    def __init__(self, buffer: Any, path: pathlib.Path):
        self.buffer, self.path, self.pos = buffer, path, 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buffer):
            raise ValueError(f"{self.path}: truncated GGUF header at byte {self.pos}")
        (value,) = struct.unpack_from("<" + fmt, self.buffer, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        if self.pos + length > len(self.buffer):
            raise ValueError(f"{self.path}: truncated GGUF header at byte {self.pos}")
        text = bytes(self.buffer[self.pos : self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def value(self, value_type: int, string_arrays: bool) -> Any:
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type])
        if value_type == _STRING:
            return self.string()
        if value_type != _ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF value type {value_type} at {self.pos}")
        item_type, count = self.unpack("I"), self.unpack("Q")
        if item_type in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[item_type]
            size = struct.calcsize(fmt) * count
            if self.pos + size > len(self.buffer):
                raise ValueError(f"{self.path}: truncated GGUF header at byte {self.pos}")
            values = np.frombuffer(self.buffer, dtype="<" + fmt, count=count, offset=self.pos)
            self.pos += size
            return values.copy()
        if item_type == _STRING:
            items = [self.string() if string_arrays else self._skip_string() for _ in range(count)]
            return items if string_arrays else None
        return [self.value(item_type, string_arrays) for _ in range(count)]

    def _skip_string(self) -> None:
        length = self.unpack("Q")
        self.pos += length


def read_gguf(path: str | os.PathLike, *, string_arrays: bool = False) -> GGUFFile:
    """Parses the header of a GGUF (v2/v3, little-endian) file.

    Args:
      path: The ``.gguf`` file.
      string_arrays: Also decode string arrays (the tokenizer vocabulary); slower.

    Raises:
      ValueError: Not a GGUF file, unsupported version, truncated header, or a tensor whose
        data extends past the end of the file (the message names the tensor).
    """
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{path}: empty file, not a GGUF checkpoint")
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        cursor = _Cursor(buffer, path)
        if cursor.unpack("I") != gguf.GGUF_MAGIC:
            raise ValueError(f"{path}: not a GGUF file (bad magic)")
        version = cursor.unpack("I")
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version} (big-endian file?)")
        n_tensors, n_kv = cursor.unpack("Q"), cursor.unpack("Q")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cursor.string()
            metadata[key] = cursor.value(cursor.unpack("I"), string_arrays)
        entries = []
        for _ in range(n_tensors):
            name = cursor.string()
            dims = [cursor.unpack("Q") for _ in range(cursor.unpack("I"))]
            type_id, offset = cursor.unpack("I"), cursor.unpack("Q")
            entries.append((name, dims, type_id, offset))
        alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        data_start = -(-cursor.pos // alignment) * alignment
        file_size = len(buffer)
    finally:
        buffer.close()
    tensors: dict[str, TensorInfo] = {}
    for name, dims, type_id, offset in entries:
        try:
            ggml_type = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"{path}: tensor {name!r} has unknown ggml type {type_id}") from None
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        nbytes = int(np.prod(dims, dtype=np.int64)) // block_size * type_size
        start = data_start + offset
        if start + nbytes > file_size:
            raise ValueError(
                f"{path}: truncated file: tensor {name!r} needs bytes {start}..{start + nbytes} "
                f"but the file has {file_size}"
            )
        tensors[name] = TensorInfo(name, ggml_type, tuple(reversed(dims)), start, nbytes)
    return GGUFFile(path=path, metadata=metadata, tensors=tensors)


def _float(value: Any) -> float:
    """Metadata floats are float32; return their shortest decimal (1e-6, not 9.99e-7)."""
    return float(str(np.float32(value)))


def config_from_gguf(file: GGUFFile) -> Gemma3Config:
    """Builds the config from ``gemma3.*`` metadata and the embedding's row count.

    Fields GGUF does not record (query_pre_attn_scalar, local RoPE base unless
    ``rope.freq_base_swa`` is present, sliding-window pattern unless present) come from the
    preset with the same depth and width, else Gemma 3 defaults (``head_dim``, 10000, 6).
    """
    meta, path = file.metadata, file.path
    arch = meta.get("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"{path}: general.architecture is {arch!r}, expected 'gemma3'")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"gemma3.{key}", default)
        if value is None:
            raise ValueError(f"{path}: missing metadata key 'gemma3.{key}'")
        return value

    d_model, n_layers, n_heads = (
        get("embedding_length"),
        get("block_count"),
        get("attention.head_count"),
    )
    head_dim = get("attention.key_length", d_model // n_heads)
    if get("attention.value_length", head_dim) != head_dim:
        raise ValueError(f"{path}: key_length {head_dim} != value_length, unsupported")
    if "token_embd.weight" not in file.tensors:
        raise ValueError(f"{path}: missing tensor 'token_embd.weight'")
    embed_shape = file.tensors["token_embd.weight"].shape
    preset = layout.matching_preset(n_layers, d_model)
    pattern = meta.get("gemma3.attention.sliding_window_pattern")
    if pattern is None:
        pattern = preset.sliding_window_pattern if preset else 6
    elif not np.isscalar(pattern):  # per-layer "is sliding" flags
        flags = [bool(flag) for flag in pattern]
        pattern = flags.index(False) + 1 if False in flags else len(flags) + 1
        if flags != [(i + 1) % pattern != 0 for i in range(len(flags))]:
            raise ValueError(f"{path}: sliding_window_pattern {flags} is not periodic")
    scale = meta.get("gemma3.rope.scaling.factor")
    return Gemma3Config(
        vocab_size=int(embed_shape[0]),
        d_model=int(d_model),
        n_layers=int(n_layers),
        n_heads=int(n_heads),
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        head_dim=int(head_dim),
        d_ff=int(get("feed_forward_length")),
        sliding_window=int(get("attention.sliding_window")),
        query_pre_attn_scalar=preset.query_pre_attn_scalar if preset else head_dim,
        local_rope_base=_float(
            get("rope.freq_base_swa", preset.local_rope_base if preset else 10_000.0)
        ),
        global_rope_base=_float(get("rope.freq_base", 1_000_000.0)),
        global_rope_scale=_float(scale) if scale else (preset.global_rope_scale if preset else 1.0),
        sliding_window_pattern=int(pattern),
        norm_eps=_float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_seq_len=int(get("context_length", preset.max_seq_len if preset else 32_768)),
        name=preset.name if preset else "custom",
    )


def _canonical_names(config: Gemma3Config) -> dict[str, str]:
    """GGUF tensor name -> canonical key."""
    names = {"token_embd.weight": "embedding", "output_norm.weight": "final_norm"}
    for i in range(config.n_layers):
        for short, key in _BLOCK_NAMES.items():
            names[f"blk.{i}.{short}.weight"] = f"blocks.{i}.{key}"
    return names


def load_gguf(
    path: str | os.PathLike, *, dtype: Any = np.float32
) -> tuple[Gemma3Config, dict[str, np.ndarray]]:
    """Loads a Gemma 3 GGUF as ``(config, canonical params)``, dequantizing tensor by tensor."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    file = read_gguf(path)
    config = config_from_gguf(file)
    names = _canonical_names(config)
    # Gemma ties the output projection to the embedding; a stray "output.weight" is ignored.
    extra = [name for name in file.tensors if name not in names and name != "output.weight"]
    if extra:
        raise ValueError(f"{path}: unexpected tensors {extra[:8]}")
    missing = [name for name in names if name not in file.tensors]
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    params: dict[str, np.ndarray] = {}
    # A bar only where reading takes a while: not for the 270M (a few seconds), nor from cache.
    quiet = path.stat().st_size < _PROGRESS_MIN_BYTES
    for name, key in tqdm(names.items(), desc=f"GGUF {path.name}", leave=False, disable=quiet):
        kind = layout.canonical_kind(key)
        expected = layout.out_in_stored_shape(key, config)
        layout.check_shape(path, name, file.tensors[name].shape, expected)
        values, owned = file.dequantized(name)
        layout.check_finite(path, name, values)
        view = layout.out_in_to_canonical(kind, values, config)
        params[key] = layout.materialize(view, dtype, owned=owned)
    return config, params
