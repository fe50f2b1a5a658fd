"""The GPU (Triton) and TPU (Mosaic) variants lower from this CPU-only machine.

Cross-platform lowering runs Pallas' own lowering of every kernel (forward, both backward
kernels, decode) to Triton IR or Mosaic MLIR, so unsupported ops, bad block shapes or
index maps fail here. It does NOT run Triton's or Mosaic's compilers, nor the kernels: their
numerics on real GPUs/TPUs are untested by this suite.
"""

import contextlib

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import backends, flash_attention, flash_decode


def _abstract_tpu():
    try:
        from jax._src.mesh import AbstractDevice  # private: Mosaic reads the chip from it
    except ImportError:
        pytest.skip("this jax has no AbstractDevice to stand in for a TPU")
    device = AbstractDevice(device_kind="TPU v5 lite", num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


TARGETS = {"triton": ("gpu", "cuda", contextlib.nullcontext), "tpu": ("tpu", "tpu", _abstract_tpu)}


@pytest.mark.parametrize("backend", ["triton", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_for_accelerators(backend, dtype, monkeypatch):
    platform, lowering_platform, context = TARGETS[backend]
    monkeypatch.setattr(backends, "current_platform", lambda: platform)
    q = jnp.zeros((2, 200, 4, 96), dtype)  # padded sequence; head_dim 96 (Triton pads to 128)
    kv = jnp.zeros((2, 200, 2, 96), dtype)
    segs = jnp.zeros((2, 200), jnp.int32)

    def train_step(q, k, v):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(
            q, k, v, causal=True, segment_ids=segs, backend=backend), q, k, v)
        return out, vjp(out)

    def decode_step(q, k, v):
        return flash_decode(q[:, :2], k, v, jnp.array([5, 150], jnp.int32), backend=backend)

    with context():
        for fn in (train_step, decode_step):
            text = jax.jit(fn).trace(q, kv, kv).lower(
                lowering_platforms=(lowering_platform,)).as_text()
            assert ("triton" if backend == "triton" else "tpu_custom_call") in text
