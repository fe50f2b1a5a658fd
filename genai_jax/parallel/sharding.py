"""Logical axis names -> mesh axes, by one rules table; shardings of state and batches.

Parameters name their dimensions logically (`embed`, `mlp`, `heads`, ...) through the metadata
of their `nnx.Variable`s, which optax's states inherit (their moments are `tree_map`s of the
parameters). One table maps those names to mesh axes, so sharding is data, not model code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

# logical name -> mesh axis (or axes) it is split over; a name not listed is replicated.
# FSDP shards the model dimension of every weight; tensor parallelism splits heads and the MLP
# hidden dimension (Megatron); the batch is split over data and fsdp.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "vocab": "tensor",
    "conv_in": None,
    "conv_out": "fsdp",
}


def logical_axes(tree):
    """The logical names of every leaf of a state pytree (None for unannotated leaves)."""
    is_var = lambda x: isinstance(x, nnx.Variable)

    def names(x):
        return x.get_metadata().get("out_sharding") if is_var(x) else None

    return jax.tree.map(names, tree, is_leaf=is_var)


def spec_for(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: jax.sharding.Mesh,
             rules: Mapping[str, str | tuple[str, ...] | None]) -> PartitionSpec:
    """The PartitionSpec of one array; a dimension the mesh axes do not divide is replicated,
    and a mesh axis is used at most once per array."""
    if not axes:
        return PartitionSpec()
    used, spec = set(), []
    for name, dim in zip(axes, shape, strict=True):
        mesh_axes = rules.get(name) if name else None
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        size = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
        if not mesh_axes or dim % size:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """NamedShardings for every array leaf of `abstract_state` (from `jax.eval_shape`)."""
    is_var = lambda x: isinstance(x, nnx.Variable)

    def sharding(x):
        if is_var(x):
            spec = spec_for(x.get_metadata().get("out_sharding"), x.shape, mesh, rules)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding, abstract_state, is_leaf=is_var)


def batch_sharding(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes."""
    axes = rules["batch"]
    return NamedSharding(mesh, PartitionSpec(axes))


def process_rows(rows, process_index: int | None = None, process_count: int | None = None):
    """This process's contiguous share of the leading axis of `rows` (global batch order)."""
    i = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    size = len(rows) // n
    return rows[i * size:(i + 1) * size]


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """Assemble a global jax.Array batch from this process's rows (multi-host safe)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
