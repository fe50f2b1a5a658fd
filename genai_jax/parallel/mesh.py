"""The device mesh: named axes `data`, `fsdp`, `tensor` built from `config.mesh`."""

from __future__ import annotations

import math

import jax
import numpy as np

from genai_jax.errors import UserError

AXES = ("data", "fsdp", "tensor")


class MeshError(UserError):
    """A mesh that does not fit the devices, or a batch that does not fit the mesh."""


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolve `-1` (at most one axis: the rest of the devices) and check the product."""
    sizes = [int(mesh_cfg[a]) for a in AXES]
    described = " x ".join(f"{a}={s}" for a, s in zip(AXES, sizes, strict=True))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh {described}: each axis is a positive size, and at most one is -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(f"mesh {described} does not divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise MeshError(f"mesh {described} has {math.prod(sizes)} devices but there are "
                        f"{num_devices}: make the product equal {num_devices} (or use -1)")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all devices of all processes)."""
    if devices is None:
        shape = mesh_shape(mesh_cfg, jax.device_count())
        return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), AXES)

