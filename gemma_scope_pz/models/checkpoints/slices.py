"""Reading a slice of a canonical tensor from a Hugging Face checkpoint, and nothing else of it.

Loading into shards (``parallel.load``) asks, for each device, for a block of a canonical
tensor (``checkpoints.layout``): e.g. the key/value heads 4..7 of ``blocks.3.attn.query``
``[d_model, n_heads, head_dim]``. A stored ``[out, in]`` tensor is the canonical one with its
axes grouped and permuted (``query``: stored rows are (heads, head_dim), columns d_model), so a
block of whole inner axes is a contiguous range of stored rows or columns. ``HFSliceReader``
reads that range with safetensors' ``get_slice`` (no other bytes of the tensor), arranges it in
the canonical layout and converts it (dtype, norms ``w`` -> ``1 + w``), counting the bytes read.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

import gemma_scope_pz.models.checkpoints.layout as layout
from gemma_scope_pz.models.checkpoints.hf import hf_layout, open_safetensors
from gemma_scope_pz.models.config import param_shapes

__all__ = ["STORED_GROUPS", "HFSliceReader", "stored_block"]

# Per role: for each stored [out, in] dimension, the canonical axes it holds (outer first).
STORED_GROUPS: dict[str, tuple[tuple[int, ...], ...]] = {
    "embedding": ((0,), (1,)),
    "norm": ((0,),),
    "query": ((1, 2), (0,)),  # [heads * head_dim, d_model] -> [d_model, heads, head_dim]
    "kv": ((1, 2), (0,)),
    "output": ((2,), (0, 1)),  # [d_model, heads * head_dim] -> [heads, head_dim, d_model]
    "ffw_in": ((1,), (0,)),  # [d_ff, d_model] -> [d_model, d_ff]
    "ffw_out": ((1,), (0,)),  # [d_model, d_ff] -> [d_ff, d_model]
}


def stored_block(read, kind: str, shape: tuple[int, ...], index: tuple[slice, ...]) -> np.ndarray:
    """The canonical block ``index`` (one ``slice`` per canonical axis) of a stored tensor.

    Args:
      read: ``read(slices)`` returns the stored tensor's block at a tuple of ``slice``s.
      kind: The role (``layout.canonical_kind``), deciding how stored dims group canonical axes.
      shape: The canonical shape.
      index: The block wanted; an axis sliced inside a stored dimension whose inner axes are
        not whole is read over the whole range of that dimension's inner axes, then cut.
    """
    groups = STORED_GROUPS[kind]
    bounds = [s.indices(n) for s, n in zip(index, shape, strict=True)]
    ranges, fine, inner = [], [], [slice(None)] * len(shape)
    for group in groups:
        outer, rest = group[0], group[1:]
        start, stop, _ = bounds[outer]
        size = int(np.prod([shape[a] for a in rest], dtype=np.int64))
        ranges.append(slice(start * size, stop * size))
        fine += [stop - start, *(shape[a] for a in rest)]
        for a in rest:  # inner axes are read whole and cut afterwards
            inner[a] = slice(*bounds[a][:2])
    block = np.asarray(read(tuple(ranges))).reshape(fine)
    order = [a for group in groups for a in group]
    block = block.transpose(np.argsort(order))
    return block[tuple(inner)]


class HFSliceReader:
    """Blocks of the canonical tensors of a local transformers folder, read slice by slice.

    Attributes:
      directory: The checkpoint folder.
      config: Its ``Gemma3Config`` (from ``config.json``).
      shapes: Canonical key -> canonical shape (``param_shapes(config)``).
      bytes_read: Stored bytes read so far (the data of every block returned, stored dtype).
    """

    def __init__(self, directory: str | pathlib.Path):
        self.directory = pathlib.Path(directory)
        self.config, self._files, names = hf_layout(self.directory)
        self.shapes = param_shapes(self.config)
        self._stored = {key: name for name, key in names.items()}
        self._handles: dict[pathlib.Path, Any] = {}
        self._contexts: list[Any] = []
        self.bytes_read = 0

    def read(self, key: str, index: tuple[slice, ...], dtype: Any) -> np.ndarray:
        """Block ``index`` of canonical tensor ``key`` as a C-contiguous ``dtype`` array.

        Raises:
          ValueError: The stored tensor has the wrong shape or the block holds NaN/Inf (naming
            the file and tensor).
        """
        name = self._stored[key]
        file = self._files[name]
        handle = self._open(file)
        stored = handle.get_slice(name)
        expected = layout.out_in_stored_shape(key, self.config)
        layout.check_shape(file, name, tuple(stored.get_shape()), expected)
        kind = layout.canonical_kind(key)
        canonical = self.shapes[key]

        def read(slices):
            block = stored[slices]
            self.bytes_read += block.nbytes
            return block

        block = stored_block(read, kind, canonical, index)
        layout.check_finite(file, name, block)
        shift = 1.0 if kind == "norm" else 0.0
        return layout.materialize(block, np.dtype(dtype), owned=False, shift=shift)

    def _open(self, file: pathlib.Path) -> Any:
        if file not in self._handles:
            context = open_safetensors(file)
            self._handles[file] = context.__enter__()
            self._contexts.append(context)
        return self._handles[file]

    def close(self) -> None:
        """Closes the safetensors files opened so far."""
        for context in self._contexts:
            context.__exit__(None, None, None)
        self._handles.clear()
        self._contexts.clear()

    def __enter__(self) -> HFSliceReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
