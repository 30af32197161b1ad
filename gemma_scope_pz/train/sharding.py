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
__all__ = ["DATA", "MODEL", "batch_sharding", "check_divisible", "make_mesh", "state_shardings"]


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
