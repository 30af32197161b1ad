"""Running Gemma 3 and dictionaries on a device mesh.

``mesh`` builds ``("data", "model")`` meshes, ``rules`` says which named axes split over which mesh
axis, ``shard`` places parameters (``shard(model, mesh)``, also ``gs.shard``), ``load`` reads a
checkpoint straight into shards (``gs.load_model(source, mesh=mesh)``). See docs/parallel.md.
"""

from gemma_scope_pz.parallel.mesh import DATA, MODEL, make_mesh, mesh_shapes
from gemma_scope_pz.parallel.rules import DEFAULT_RULES, ShardingRules
from gemma_scope_pz.parallel.shard import (
    device_bytes,
    mesh_of,
    shard,
    shard_abstract,
    shard_batch,
    unshard,
)

__all__ = [
    "DATA",
    "DEFAULT_RULES",
    "MODEL",
    "ShardingRules",
    "device_bytes",
    "make_mesh",
    "mesh_of",
    "mesh_shapes",
    "shard",
    "shard_abstract",
    "shard_batch",
    "unshard",
]
