"""Data- and latent-parallel sharding of SAE training with ``jax.sharding``.

The trainer runs one jitted step on a 2-D device mesh with axes ``("data", "model")``:

* ``"data"``: the batch of activations is split over this axis (data parallelism). Each device
  computes the loss and gradients of its rows; XLA inserts the all-reduce of the gradients.
* ``"model"``: the latent dimension ``d_sae`` of wide dictionaries is split over this axis:
  ``w_enc [d_in, d_sae]`` by columns, ``w_dec [d_sae, d_out]`` by rows, and ``b_enc``,
  ``threshold`` and the dead-latent counters by entries (Adam moments follow their parameter).
  The encoder matmul then needs no communication; the decoder matmul ends in a reduction of
  partial reconstructions over ``"model"``. TopK/BatchTopK need a cross-shard top-k, which
  GSPMD derives from the sharded ``lax.top_k``.

Mapping onto hardware: put ``"model"`` on the fastest interconnect. On a TPU pod slice use
``model`` = the chips of one host or an ICI ring (e.g. 4 or 8) and ``data`` = the rest
(``make_mesh(data=n_devices // 8, model=8)``); across slices/DCN use data parallelism only. On
GPU clusters use ``model`` ≤ the GPUs of one NVLink node and ``data`` = nodes × (GPUs / model).
Narrow dictionaries (≤ 64k latents) are best trained with ``model=1`` (pure data parallel).
``parallel.mesh.make_mesh`` (``jax.make_mesh``) puts the last mesh axis on the most local devices.

Streaming training (:func:`~gemma_scope_pz.train.streaming.train_streaming` with ``mesh=``)
uses the same state shardings; each refill's contexts are split over ``"data"`` (each device runs
the model forward on its share), as are the shuffle buffer's slots and each drawn batch.

For multi-host runs, call ``jax.distributed.initialize()`` first and feed each host its slice
of the global batch (the trainer's ``batch_at(step)`` then returns the host-local rows).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gemma_scope_pz.parallel.mesh import DATA, MODEL, make_mesh

# The one home of mesh creation is parallel/mesh.py; re-exported here for the trainer's callers.
__all__ = [
    "DATA",
    "MODEL",
    "batch_sharding",
    "buffer_shardings",
    "check_divisible",
    "check_stream_mesh",
    "constrain_batch",
    "make_mesh",
    "on_mesh",
    "place_stream",
    "put_tokens",
    "state_shardings",
]


def _leaf_spec(path: tuple, leaf: Any, d_sae: int) -> P:
    names = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    shape = getattr(leaf, "shape", ())
    if "w_enc" in names and len(shape) == 2:
        return P(None, MODEL)
    if "w_dec" in names and len(shape) == 2:
        return P(MODEL, None)
    if len(shape) == 1 and shape[0] == d_sae and ("b_dec" not in names and "shift" not in names):
        return P(MODEL)
    return P()


def state_shardings(state: Any, mesh: Mesh, d_sae: int) -> Any:
    """NamedShardings for a trainer state pytree (params, Adam moments, counters)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, _leaf_spec(path, leaf, d_sae)), state
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a ``[batch, d]`` array split over ``"data"``."""
    return NamedSharding(mesh, P(DATA, None))


def check_divisible(mesh: Mesh, batch_size: int, d_sae: int) -> None:
    """Raises if the batch or ``d_sae`` does not split evenly over the mesh."""
    if batch_size % mesh.shape[DATA]:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by data axis {mesh.shape[DATA]}"
        )
    if d_sae % mesh.shape[MODEL]:
        raise ValueError(f"d_sae={d_sae} is not divisible by model axis {mesh.shape[MODEL]}")


def on_mesh(tree: Any, mesh: Mesh) -> Any:
    """``tree`` with every array not already on ``mesh`` replicated over it (arrays placed on
    ``mesh`` before, e.g. a model from ``gs.load_model(mesh=mesh)``, keep their sharding)."""

    def place(leaf):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return leaf
        if not isinstance(leaf, jax.Array):
            return leaf
        return jax.device_put(leaf, NamedSharding(mesh, P()))

    return jax.tree_util.tree_map(place, tree)


def buffer_shardings(buffer: Any, mesh: Mesh) -> Any:
    """Streaming shuffle buffer: its slots (rows of every site, valid flags) split over ``"data"``."""
    return jax.tree_util.tree_map(
        lambda leaf: NamedSharding(mesh, P(DATA, *([None] * (leaf.ndim - 1)))), buffer
    )


def constrain_batch(x: jax.Array | None, mesh: Mesh | None) -> jax.Array | None:
    """Inside a jitted program: rows of ``x`` split over ``"data"`` (nothing without a mesh)."""
    if x is None or mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh))


# --------------------------------------------------------------------------- streaming training
def place_stream(configs: Any, states: Any, buffer: Any, mesh: Mesh, constrain: bool = False):
    """``(states, buffer)`` of streaming training on ``mesh``: every dictionary's state sharded as
    :func:`state_shardings` (latents over ``"model"``, replicated over ``"data"``), the buffer's
    slots split over ``"data"``. Placed with ``device_put``, or (``constrain``, inside a jitted
    program) constrained with ``with_sharding_constraint``."""
    put = jax.lax.with_sharding_constraint if constrain else jax.device_put
    states = {
        name: put(state, state_shardings(state, mesh, configs[name].sae.d_sae))
        for name, state in states.items()
    }
    return states, put(buffer, buffer_shardings(buffer, mesh))


def check_stream_mesh(mesh: Mesh, configs: Any, n_contexts: int) -> None:
    """Raises unless every batch, every ``d_sae`` and the contexts of a refill split over ``mesh``."""
    for config in configs.values():
        check_divisible(mesh, config.run.batch_size, config.sae.d_sae)
    if n_contexts % mesh.shape[DATA]:
        raise ValueError(
            f"train_streaming: {n_contexts} contexts per refill do not split over the data axis "
            f"of size {mesh.shape[DATA]}; set stream.contexts_per_refill to a multiple of it"
        )


def put_tokens(tokens: Any, mesh: Mesh | None) -> jax.Array:
    """A refill's token ids ``[contexts, length]`` on the device; on a mesh, contexts split over
    ``"data"`` so that each device runs the model forward on its share."""
    if mesh is None:
        return jax.numpy.asarray(tokens)
    return jax.device_put(tokens, batch_sharding(mesh))
