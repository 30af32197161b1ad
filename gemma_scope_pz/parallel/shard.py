"""Placing a model's (or any Penzai layer's) parameters on a device mesh.

``shard(model, mesh)`` returns a copy whose every parameter is a ``jax.Array`` with a
``NamedSharding`` chosen from its axis names by ``parallel.rules`` (penzai's
``toolshed.sharding_util.name_to_name_sharding`` builds the shardings). The runners
(``forward``, ``capture``, ``splice``, ``steer``, ``generate``, evaluation) are jitted, so XLA
partitions them from the parameters' placement; nothing else changes. Dictionaries inserted into
a sharded model may be sharded too (their ``"latents"`` split over ``"model"``), with the SAME mesh:
``mesh_of`` refuses a tree whose arrays live on two different meshes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from penzai import pz
from penzai.toolshed import sharding_util

from gemma_scope_pz.parallel.mesh import DATA, check_divides, describe
from gemma_scope_pz.parallel.rules import DEFAULT_RULES, ShardingRules

__all__ = [
    "batch_on_mesh",
    "device_bytes",
    "mesh_of",
    "shard",
    "shard_abstract",
    "shard_batch",
    "unshard",
]


def shard(tree: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """A copy of ``tree`` (a model, a dictionary, any Penzai layer) with parameters on ``mesh``.

    Args:
      tree: The layer; its ``pz.Parameter``s (and frozen ``pz.ParameterValue``s) are placed.
      mesh: A mesh with axes ``"data"`` and ``"model"`` (``parallel.make_mesh``).
      rules: Which named axes split over which mesh axis (``parallel.rules``).

    Raises:
      ValueError: A sharded axis does not divide by its mesh axis (naming the axis, the size and
        the mesh shapes that fit), or ``tree`` is already sharded over another mesh.
    """
    existing = mesh_of(tree)
    if existing is not None and existing != mesh:
        raise ValueError(
            f"shard: this model is already sharded over mesh {describe(existing)}; it cannot be "
            f"used with mesh {describe(mesh)}. Shard the unsharded model again "
            f"(gs.unshard(model) first) instead of resharding every call."
        )
    _check_fits(tree, mesh, rules)
    unbound, params = pz.unbind_params(tree)
    placed = [
        pz.Parameter(value=_place(p.value, mesh, rules, abstract=False), label=p.label)
        for p in params
    ]
    return (
        pz.select(pz.bind_variables(unbound, placed))
        .at_instances_of(pz.ParameterValue)
        .apply(lambda v: dataclasses.replace(v, value=_place(v.value, mesh, rules, False)))
    )


def shard_abstract(tree: Any, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Any:
    """``tree`` (frozen, leaves ``jax.ShapeDtypeStruct``) with shardings attached, for AOT lowering.

    Parameter and state values (e.g. KV caches: batch over ``"data"``, heads over ``"model"``) get
    the rules' shardings; every other leaf is replicated.
    """
    _check_fits(tree, mesh, rules)
    tree = (
        pz.select(tree)
        .at_instances_of(pz.ParameterValue | pz.StateVariableValue)
        .apply(lambda v: dataclasses.replace(v, value=_place(v.value, mesh, rules, True)))
    )
    replicated = NamedSharding(mesh, P())

    def other(leaf):
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=replicated)
        return leaf

    return jax.tree_util.tree_map(other, tree)


def unshard(tree: Any, device: jax.Device | None = None) -> Any:
    """A copy of ``tree`` with every parameter on one device (the first by default)."""
    device = device or jax.devices()[0]
    unbound, params = pz.unbind_params(tree)
    moved = [pz.Parameter(value=jax.device_put(p.value, device), label=p.label) for p in params]
    return pz.bind_variables(unbound, moved)


def shard_batch(array: Any, mesh: Mesh) -> jax.Array:
    """An input ``[batch, ...]`` with its rows split over ``"data"`` (data parallelism)."""
    array = jax.numpy.asarray(array)
    check_divides(mesh, {"the batch": (array.shape[0], DATA)}, what="the batch")
    return jax.device_put(array, NamedSharding(mesh, P(DATA)))


def batch_on_mesh(array: Any, tree: Any) -> Any:
    """``array`` ``[batch, ...]`` split over ``"data"`` of the mesh ``tree`` is sharded over
    (``tree`` may also be that mesh, or None).

    The runners call this on their token batch, so a sharded model runs data-parallel. Unchanged
    (replicated by ``jit``) when ``tree`` is not sharded, the ``"data"`` axis has size 1, or the
    batch does not divide by it (results are the same, only the work is not split).
    """
    mesh = tree if tree is None or isinstance(tree, Mesh) else mesh_of(tree)
    if mesh is None or mesh.shape[DATA] == 1 or array.shape[0] % mesh.shape[DATA]:
        return array
    return jax.device_put(array, NamedSharding(mesh, P(DATA)))


def mesh_of(tree: Any) -> Mesh | None:
    """The one mesh the arrays of ``tree`` are sharded over, or None (nothing sharded).

    Raises:
      ValueError: Arrays of ``tree`` are sharded over two different meshes (e.g. a dictionary
        sharded for another mesh spliced into a sharded model).
    """
    meshes: list[Mesh] = []
    for leaf in _array_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and not any(sharding.mesh == m for m in meshes):
            meshes.append(sharding.mesh)
    if len(meshes) > 1:
        raise ValueError(
            "this model holds arrays sharded over different meshes: "
            + " and ".join(describe(m) for m in meshes)
            + "; shard the model and every dictionary in it with the same mesh"
        )
    return meshes[0] if meshes else None


def _array_leaves(tree: Any):
    """The leaves of ``tree``, looking inside penzai variables (one walk, no tree rebuild)."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, pz.AbstractVariable):
            yield from jax.tree_util.tree_leaves(leaf.value)
        else:
            yield leaf


def device_bytes(tree: Any) -> dict[jax.Device, int]:
    """Bytes of parameter data each device holds (from the arrays' addressable shards)."""
    _, params = pz.unbind_params(tree)
    out: dict[jax.Device, int] = {}
    for p in params:
        for leaf in jax.tree_util.tree_leaves(p.value):
            for piece in leaf.addressable_shards:
                out[piece.device] = out.get(piece.device, 0) + piece.data.nbytes
    return out


def _named_values(tree: Any) -> list[tuple[str, pz.nx.NamedArrayBase]]:
    """(label, NamedArray) of every parameter and frozen parameter or state value in ``tree``."""
    _, params = pz.unbind_params(tree)
    values = [(p.label, p.value) for p in params]
    frozen = pz.select(tree).at_instances_of(pz.ParameterValue | pz.StateVariableValue)
    values += [(v.label, v.value) for v in frozen.get_sequence()]
    return [
        (label, leaf)
        for label, value in values
        for leaf in jax.tree_util.tree_leaves(value, is_leaf=pz.nx.is_namedarray)
        if isinstance(leaf, pz.nx.NamedArrayBase)
    ]


def _check_fits(tree: Any, mesh: Mesh, rules: ShardingRules) -> None:
    """One error listing every sharded axis whose size does not divide its mesh axis."""
    dims: dict[str, tuple[int, str]] = {}
    for label, value in _named_values(tree):
        for name, axis in rules.axis_map(value.named_shape).items():
            size = value.named_shape[name]
            if not any(k.startswith(f"axis {name!r} ") and s == size for k, (s, _) in dims.items()):
                dims[f"axis {name!r} of {label}"] = (size, axis)
    check_divides(mesh, dims, what="the parameters")


def _place(value: Any, mesh: Mesh, rules: ShardingRules, abstract: bool) -> Any:
    """Every NamedArray in ``value`` placed (or, ``abstract``, given its sharding) by the rules."""

    def one(leaf):
        if not isinstance(leaf, pz.nx.NamedArrayBase):
            return leaf
        sharding = sharding_util.name_to_name_sharding(
            leaf, mesh, rules.axis_map(leaf.named_shape), as_shape_dtype_struct=abstract
        )
        return sharding if abstract else jax.device_put(leaf, sharding)

    return jax.tree_util.tree_map(one, value, is_leaf=pz.nx.is_namedarray)
