"""Logical axis names -> mesh axes, by one rules table; shardings of state, batches and
activations.

Parameters name their dimensions logically (`embed`, `mlp`, `heads`, ...) through the metadata
of their `nnx.Variable`s, which optax's states inherit (their moments are `tree_map`s of the
parameters). One table maps those names to mesh axes, so sharding is data, not model code. While
the trainer traces a step (`activations`), model code pins activations by the same names
(`constrain`) and reads weights all-gathered over the batch axes (`gathered`, FSDP); outside a
step both do nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from genai_jax.parallel.mesh import AXES, MeshError

Rules = Mapping[str, "str | tuple[str, ...] | None"]

# logical name -> mesh axes it is split over, in order of preference; a name not listed is
# replicated. The batch is split over data and fsdp. Tensor parallelism splits heads and the MLP
# hidden dimension (Megatron). FSDP splits the model dimension of every weight, and the other
# dimension of the arrays that have no model dimension (biases of heads and of the MLP), so
# each device holds 1/fsdp of every parameter. An array uses each mesh axis at most once, its
# dimensions taking their axes left to right. `config.mesh.rules` overrides entries.
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "mlp": ("tensor", "fsdp"),
    "heads": "tensor",
    "kv": "fsdp",
    "vocab": "tensor",
    "conv_in": "fsdp",
    "conv_out": "fsdp",
}


def _axes(entry) -> tuple[str, ...]:
    """The mesh axes of a rule or PartitionSpec entry (None, one name or a tuple of names)."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _entry(axes) -> str | tuple[str, ...] | None:
    """The rule or PartitionSpec entry of a list of mesh axes."""
    return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def rules_as_config(rules: Rules = DEFAULT_RULES) -> dict[str, str]:
    """The rules as config strings: mesh axes joined by commas, "" for replicated."""
    return {name: ",".join(_axes(axes)) for name, axes in rules.items()}


def rules_from_config(mesh_cfg) -> dict[str, str | tuple[str, ...] | None]:
    """The rules table of `config.mesh.rules` (`{"embed": "fsdp", "batch": "data,fsdp",
    "kv": ""}`); names it leaves out keep their default."""
    rules = dict(DEFAULT_RULES)
    for name, value in dict(mesh_cfg.get("rules", None) or {}).items():
        axes = tuple(a.strip() for a in str(value).split(",") if a.strip())
        unknown = [a for a in axes if a not in AXES]
        if unknown or len(set(axes)) < len(axes):
            raise MeshError(f"mesh.rules.{name}={value!r}: give distinct mesh axes from "
                            f"{list(AXES)}, comma-separated ('' = replicated)")
        rules[name] = _entry(axes)
    return rules


def logical_axes(tree):
    """The logical names of every leaf of a state pytree (None for unannotated leaves)."""
    is_var = lambda x: isinstance(x, nnx.Variable)

    def names(x):
        return x.get_metadata().get("out_sharding") if is_var(x) else None

    return jax.tree.map(names, tree, is_leaf=is_var)


def spec_for(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: jax.sharding.Mesh,
             rules: Rules) -> PartitionSpec:
    """The PartitionSpec of one array. Each dimension takes the longest prefix of its rule's
    mesh axes (skipping axes of size 1 and axes an earlier dimension took) whose sizes divide it,
    so a dimension the mesh does not divide is split less or replicated, never refused."""
    if not axes:
        return PartitionSpec()
    used, spec = set(), []
    for name, dim in zip(axes, shape, strict=True):
        mesh_axes = [a for a in _axes(rules.get(name) if name else None)
                     if a not in used and mesh.shape[a] > 1]
        while mesh_axes and dim % int(np.prod([mesh.shape[a] for a in mesh_axes])):
            mesh_axes.pop()
        used.update(mesh_axes)
        spec.append(_entry(mesh_axes))
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


def data_parallel_size(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> int:
    """How many ways the batch is split (by default over `data` and `fsdp`: FSDP is data
    parallel too)."""
    return int(np.prod([mesh.shape[a] for a in _axes(rules["batch"])]))


def check_process_rows(sharding: NamedSharding, batch_size: int) -> None:
    """Each process feeds its contiguous share of every batch (`process_rows`): the batch
    sharding must give each process's devices exactly those rows, which holds when the batch
    axes span the processes (e.g. not when several processes only split `tensor`)."""
    n, i = jax.process_count(), jax.process_index()
    if n == 1:
        return
    held = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        held.update(range(*index[0].indices(batch_size)))
    share = batch_size // n
    if held != set(range(i * share, (i + 1) * share)):
        raise MeshError(f"the batch axes {sharding.spec[0]} do not split the batch over the "
                        f"{n} processes: each process must hold its own rows, so lay the mesh "
                        "out with data/fsdp across processes (tensor within one)")


# The mesh and rules that `constrain` applies while a step is traced (see `activations`).
_ACTIVE: contextvars.ContextVar[tuple[jax.sharding.Mesh, Rules] | None] = (
    contextvars.ContextVar("genai_jax_activation_sharding", default=None))


@contextlib.contextmanager
def activations(mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
    """While this is active, `constrain` in model code pins activations to `mesh` by `rules`;
    outside it (e.g. in a sampler traced without a mesh) `constrain` does nothing."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


@contextlib.contextmanager
def unconstrained():
    """While this is active, `constrain` and `gathered` do nothing: for model code traced on
    one example inside a `vmap` over the batch (DP-SGD's per-example gradients), where the
    batch dimension the rules name is the vmapped one and the model's own is of size 1; the
    compiler then propagates the shardings of the inputs and the parameters."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`x` with its sharding pinned by logical `axes` (one name or None per dimension).

    Model code marks the activations whose sharding the compiler cannot infer well from the
    parameters (the residual stream, attention heads, the MLP hidden layer, the logits), so that
    tensor parallelism splits heads and the MLP the Megatron way and the batch stays split over
    the data-parallel axes, instead of GSPMD resharding whole tensors between layers.
    """
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, spec_for(axes, x.shape, mesh, rules)))


def gathered(w: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """A weight as a layer computes with it: all-gathered over the mesh axes the batch is split
    over (FSDP stores 1/fsdp of each weight and gathers it just before use), still split over
    the others (tensor parallelism). Without this the compiler may instead split the
    contraction over `fsdp` and reshard the batch-split activations to match."""
    active = _ACTIVE.get()
    if active is None:
        return w
    mesh, rules = active
    batch_axes = set(_axes(rules.get("batch")))
    spec = [_entry([a for a in _axes(entry) if a not in batch_axes])
            for entry in spec_for(axes, w.shape, mesh, rules)]
    return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, PartitionSpec(*spec)))


def fetch(tree):
    """NumPy copies of `tree`'s arrays, whole, on every process: an array spread over several
    processes' devices (sampled from sharded parameters) is all-gathered first, so every
    process must call this at the same point."""
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(one, tree)


def bytes_per_device(tree) -> dict:
    """Bytes of `tree`'s arrays that each (addressable) device holds, measured from the shards."""
    held: dict = {}
    for leaf in jax.tree.leaves(tree):
        for shard in getattr(leaf, "addressable_shards", ()):
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def process_rows(rows, process_index: int | None = None, process_count: int | None = None):
    """This process's contiguous share of the leading axis of `rows` (global batch order)."""
    i = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    size = len(rows) // n
    return rows[i * size:(i + 1) * size]


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """Assemble a global jax.Array batch from this process's rows (multi-host safe)."""
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)
