"""Device meshes and logical-axis sharding rules."""
from gold_jax.sharding.mesh import MESH_AXES, make_mesh, mesh_sizes
from gold_jax.sharding.rules import (
    BATCH_AXES,
    LOGICAL_AXIS_RULES,
    logical_to_sharding,
    logical_to_spec,
    mesh_axes,
    replicated_fraction,
)

__all__ = [
    "BATCH_AXES", "MESH_AXES", "make_mesh", "mesh_sizes", "LOGICAL_AXIS_RULES", "mesh_axes", "logical_to_spec",
    "logical_to_sharding", "replicated_fraction",
]
