"""Loading a checkpoint straight into shards: each device reads only its slices of each tensor.

``load_sharded(resolved, mesh)`` (``gs.load_model(source, mesh=mesh)``) builds every canonical
tensor (``models.checkpoints.layout``) as a ``jax.Array`` already split the way ``parallel.rules``
splits the parameter made from it:

* Hugging Face safetensors: for each of this process's devices, that device's block of the
  tensor (from the sharding's index map) is read by ``checkpoints.slices.HFSliceReader`` (just
  that range of the stored tensor, converted to the parameter dtype), sent to the device, and
  the pieces become one ``jax.Array`` (``jax.make_array_from_single_device_arrays``). The host
  holds about one device's block of one tensor at a time; each host reads only its devices'.
* Kaggle / orbax: the stored tensors are restored with a sharding on their head / neuron /
  vocabulary axis (orbax reads each device's part), then converted to the canonical layout and
  dtype on the devices, one stored tensor at a time.
* GGUF: read whole (its quantized blocks do not slice), then ``shard``.

The model is then built from the sharded canonical arrays and ``shard`` confirms every
parameter's placement (a no-op where it already matches).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from penzai import pz

from gemma_scope_pz.models.checkpoints import layout, load_params
from gemma_scope_pz.models.config import Gemma3Config
from gemma_scope_pz.models.gemma3 import Gemma3LM
from gemma_scope_pz.models.sources import ResolvedSource
from gemma_scope_pz.parallel.aot import abstract_model
from gemma_scope_pz.parallel.rules import DEFAULT_RULES, ShardingRules
from gemma_scope_pz.parallel.shard import shard, shard_abstract

__all__ = ["canonical_specs", "load_sharded"]

# Names of the canonical tensors' axes; penzai's head axes all come from "heads".
_CANONICAL_AXES = {
    "embedding": ("vocabulary", "embedding"),
    "query": ("embedding", "heads", "projection"),
    "kv": ("embedding", "heads", "projection"),
    "output": ("heads", "projection", "embedding"),
    "ffw_in": ("embedding", "neurons"),
    "ffw_out": ("neurons", "embedding"),
}
_HEAD_AXES = ("head_groups", "heads", "query_heads")


def load_sharded(
    resolved: ResolvedSource,
    mesh: Mesh,
    *,
    dtype: Any = jnp.float32,
    activation_dtype: Any = None,
    rules: ShardingRules = DEFAULT_RULES,
    reader: Any = None,
) -> Gemma3LM:
    """The model of ``resolved`` with its parameters on ``mesh``, read slice by slice.

    Args:
      resolved: The checkpoint (``models.sources.resolve_source``).
      mesh: A ``("data", "model")`` mesh (``parallel.make_mesh``).
      dtype: Parameter dtype (each slice is converted as it is read).
      activation_dtype: Activation dtype (defaults to ``dtype``).
      rules: Which named axes split over which mesh axis.
      reader: For Hugging Face folders, a ``checkpoints.slices.HFSliceReader`` to read with
        (tests count its ``bytes_read``); by default one is opened on ``resolved.path``.

    Raises:
      ValueError: A sharded dimension does not divide its mesh axis (before any tensor is read),
        or a checkpoint error naming the file and tensor.
    """
    dtype = jnp.dtype(dtype)
    if resolved.format == "hf":
        from gemma_scope_pz.models.checkpoints.slices import HFSliceReader

        reader = reader or HFSliceReader(resolved.path)
        with reader:
            config = reader.config
            specs = canonical_specs(config, mesh, rules, dtype)
            params = {
                key: _from_blocks(reader, key, reader.shapes[key], mesh, spec, dtype)
                for key, spec in specs.items()
            }
    elif resolved.format == "orbax":
        config, params = _orbax_sharded(resolved, mesh, rules, dtype)
    else:
        config, params = load_params(resolved, dtype=np.dtype(dtype))
        shard_abstract(abstract_model(config, dtype), mesh, rules)  # divisibility first
        with jax.default_device(jax.local_devices(backend="cpu")[0]):  # not all on chip 0
            model = Gemma3LM.from_params(
                config, params, dtype=dtype, activation_dtype=activation_dtype
            )
        return shard(model, mesh, rules)
    model = Gemma3LM.from_params(config, params, dtype=dtype, activation_dtype=activation_dtype)
    return shard(model, mesh, rules)


def canonical_specs(
    config: Gemma3Config, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES, dtype=jnp.float32
) -> dict[str, P]:
    """Canonical key -> ``PartitionSpec`` matching how ``rules`` split the parameter built from it.

    Raises:
      ValueError: A sharded dimension does not divide its mesh axis (``shard``'s message).
    """
    model = shard_abstract(abstract_model(config, dtype), mesh, rules)  # checks divisibility
    specs: dict[str, P] = {}
    for value in pz.select(model).at_instances_of(pz.ParameterValue).get_sequence():
        key = value.label.removesuffix(".scale").replace(".attention.", ".attn.")
        axes = _CANONICAL_AXES.get(layout.canonical_kind(key), ())
        placed = rules.axis_map(value.value.named_shape)
        spec = [None] * len(layout.out_in_stored_shape(key, config))
        for name, mesh_axis in placed.items():
            canonical = "heads" if name in _HEAD_AXES else name
            if canonical in axes:
                spec[axes.index(canonical)] = mesh_axis
        specs[key] = P(*spec)
    return specs


def _from_blocks(reader, key: str, shape, mesh: Mesh, spec: P, dtype) -> jax.Array:
    """One canonical tensor as a sharded array; each local device's block read by ``reader``
    and sent before the next is read (so the host holds about one block at a time)."""
    sharding = NamedSharding(mesh, spec)
    pieces = [
        jax.device_put(reader.read(key, index, dtype), device)
        for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items()
    ]
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, pieces)


def _orbax_sharded(resolved: ResolvedSource, mesh: Mesh, rules: ShardingRules, dtype):
    """(config, canonical sharded arrays) of an orbax checkpoint, restored into shards."""
    from gemma_scope_pz.models.checkpoints.orbax import orbax_layout, restore_sharded

    config, table, tree = orbax_layout(resolved.path)
    specs = canonical_specs(config, mesh, rules, dtype)
    stored_specs: dict[str, list] = {}
    for key, (stored, shape, pick) in table.items():
        spec = stored_specs.setdefault(stored, [None] * len(shape))
        for axis, mesh_axis in enumerate(specs[key]):
            if mesh_axis is not None:
                spec[pick.stored_axis(axis)] = mesh_axis
    shardings = {k: NamedSharding(mesh, P(*s)) for k, s in stored_specs.items()}
    restored = restore_sharded(resolved.path, tree, shardings)
    uses: dict[str, int] = {}
    for stored, _, _ in table.values():
        uses[stored] = uses.get(stored, 0) + 1
    params = {}
    for key, (stored, _, pick) in table.items():
        shift = 1.0 if layout.canonical_kind(key) == "norm" else 0.0
        out = NamedSharding(mesh, specs[key])
        params[key] = _convert(pick, shift, dtype, out)(restored[stored])
        if not bool(jnp.isfinite(params[key]).all()):
            raise ValueError(f"{resolved.path}: tensor {stored!r} contains NaN or Inf values")
        uses[stored] -= 1
        if not uses[stored]:
            del restored[stored]
    return config, params


def _convert(pick: Callable, shift: float, dtype, out: NamedSharding) -> Callable:
    """Jitted stored -> canonical conversion on the devices (pick, transpose, shift, cast)."""

    def convert(stored):
        part = pick(stored)
        if shift:
            part = part.astype(jnp.float32) + shift
        return part.astype(dtype)

    return jax.jit(convert, out_shardings=out)
