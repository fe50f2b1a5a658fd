"""Device mesh, logical-axis rules, sharding of state and batches."""

from genai_jax.parallel.mesh import AXES, MeshError, data_parallel_size, make_mesh, mesh_shape
from genai_jax.parallel.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    global_batch,
    logical_axes,
    process_rows,
    spec_for,
    state_shardings,
)

__all__ = ["AXES", "DEFAULT_RULES", "MeshError", "batch_sharding", "data_parallel_size",
           "global_batch", "logical_axes", "make_mesh", "mesh_shape", "process_rows", "spec_for",
           "state_shardings"]
