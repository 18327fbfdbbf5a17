"""Device meshes and logical-axis sharding rules."""
from gold_jax.sharding.mesh import MESH_AXES, make_mesh, mesh_sizes
from gold_jax.sharding.rules import (
    LOGICAL_AXIS_RULES,
    logical_to_sharding,
    logical_to_spec,
    replicated_fraction,
)

__all__ = [
    "MESH_AXES", "make_mesh", "mesh_sizes", "LOGICAL_AXIS_RULES", "logical_to_spec",
    "logical_to_sharding", "replicated_fraction",
]
