"""Device mesh, logical-axis rules, sharding of state, batches and activations; multi-host start."""

from genai_jax.parallel.distributed import (
    initialize,
    publish_error,
    stop_when_another_process_fails,
)
from genai_jax.parallel.mesh import AXES, MeshError, make_mesh, mesh_shape
from genai_jax.parallel.sharding import (
    DEFAULT_RULES,
    activations,
    batch_sharding,
    bytes_per_device,
    check_process_rows,
    constrain,
    data_parallel_size,
    fetch,
    gathered,
    global_batch,
    logical_axes,
    process_rows,
    rules_as_config,
    rules_from_config,
    spec_for,
    state_shardings,
    unconstrained,
)

__all__ = ["AXES", "DEFAULT_RULES", "MeshError", "activations", "batch_sharding",
           "bytes_per_device", "check_process_rows", "constrain", "data_parallel_size", "fetch",
           "gathered", "global_batch", "initialize", "logical_axes", "make_mesh", "mesh_shape",
           "process_rows", "publish_error", "rules_as_config", "rules_from_config", "spec_for",
           "state_shardings", "stop_when_another_process_fails", "unconstrained"]
