"""Which Pallas lowering runs a kernel, chosen from the platform or named by the caller.

Backends:

- ``"interpret"``: the GPU-style kernels (one program per query block, an in-kernel loop over
  key blocks) run by Pallas' HLO interpreter, ``pallas_call(..., interpret=True)``. Runs
  anywhere; the default on CPU.
- ``"triton"``: the same GPU-style kernels lowered through Pallas' Triton backend. The default
  on GPUs. (Pallas' Mosaic GPU lowering, the faster path on Hopper, needs kernels written
  against warpgroup/TMA primitives; it is not implemented here.)
- ``"tpu"``: the TPU-style kernels (the key-block loop is the last, sequential grid axis, with
  VMEM scratch accumulators) lowered through Mosaic TPU. The default on TPUs.
- ``"tpu_interpret"``: the TPU-style kernels run on the CPU by Pallas' TPU interpreter
  (``interpret=pltpu.InterpretParams()``), which simulates memory spaces and the grid; block
  shapes are additionally checked against TPU's (8, 128) tiling by this package.
"""

from __future__ import annotations

from typing import Any

import jax

BACKENDS = ("interpret", "triton", "tpu", "tpu_interpret")
# Platforms each backend can run on.
_RUNS_ON = {
    "interpret": ("cpu", "gpu", "tpu"),
    "triton": ("gpu",),
    "tpu": ("tpu",),
    "tpu_interpret": ("cpu",),
}
_DEFAULT_FOR_PLATFORM = {"cpu": "interpret", "gpu": "triton", "tpu": "tpu"}


def current_platform() -> str:
    """'cpu', 'gpu' or 'tpu' for the default JAX backend (ROCm and CUDA both count as 'gpu')."""
    platform = jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def available_backends(platform: str | None = None) -> tuple[str, ...]:
    """The backends that can run on `platform` (default: the current one)."""
    platform = platform or current_platform()
    return tuple(b for b in BACKENDS if platform in _RUNS_ON[b])


def resolve_backend(backend: str | None) -> str:
    """Returns the backend to use; raises ValueError for one that cannot run here."""
    platform = current_platform()
    if backend is None:
        if platform not in _DEFAULT_FOR_PLATFORM:
            raise ValueError(
                f"pallas_kernels: no default backend for platform {platform!r}; "
                f"pass backend= one of {BACKENDS}."
            )
        return _DEFAULT_FOR_PLATFORM[platform]
    if backend not in BACKENDS:
        raise ValueError(
            f"pallas_kernels: unknown backend {backend!r}; choose one of {BACKENDS} "
            "(or None to pick by platform)."
        )
    if platform not in _RUNS_ON[backend]:
        raise ValueError(
            f"pallas_kernels: backend {backend!r} cannot run on platform {platform!r}; "
            f"available here: {available_backends(platform)} (or backend=None)."
        )
    return backend


def is_tpu_style(backend: str) -> bool:
    """True for backends that run the TPU-style (grid-over-keys, VMEM scratch) kernels."""
    return backend in ("tpu", "tpu_interpret")


def interpret_arg(backend: str) -> Any:
    """The `interpret=` argument of pl.pallas_call for `backend`."""
    if backend == "interpret":
        return True
    if backend == "tpu_interpret":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return False


def compiler_params(backend: str, *, dimension_semantics=None, num_warps=None, num_stages=None):
    """Backend-specific compiler parameters (None where the backend takes none)."""
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=dimension_semantics)
    if backend == "triton":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return None


def check_tpu_tiling(name: str, block_shape, array_shape) -> None:
    """Raises ValueError unless a block's last two dims obey TPU's (8, 128) tiling.

    Mosaic TPU requires each of the last two block dims to be divisible by 8 (second to last)
    and 128 (last), or to equal the array's dim. The TPU interpreter does not check this, so
    we do, to catch kernels that would only fail on real hardware.
    """
    block = [1 if b is None else b for b in block_shape]
    for axis, tile in ((-2, 8), (-1, 128)):
        if len(block) < -axis:
            continue
        if block[axis] % tile and block[axis] != array_shape[axis]:
            raise ValueError(
                f"pallas_kernels: TPU block for {name} has shape {tuple(block_shape)} over array "
                f"{tuple(array_shape)}; dim {axis} must be a multiple of {tile} or the full dim. "
                "Choose block sizes that are multiples of 8 (queries) and 128 (keys)."
            )
