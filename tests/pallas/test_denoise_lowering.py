"""The denoising kernels' GPU (Triton) and TPU (Mosaic) variants lower from this CPU machine.

As in test_lowering.py: this runs Pallas' lowering of the group-norm forward and backward
kernels and of the sampler-step kernel to Triton IR / Mosaic MLIR, not Triton's or Mosaic's
compilers and not the kernels themselves.
"""

import jax
import jax.numpy as jnp
import pytest
from test_lowering import TARGETS

from pallas_kernels import (
    backends,
    ddim_coefficients,
    group_norm_modulate_silu,
    linear_alpha_bars,
    sampler_step,
)


@pytest.mark.parametrize("backend", ["triton", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_denoise_kernels_lower_for_accelerators(backend, dtype, monkeypatch):
    platform, lowering_platform, context = TARGETS[backend]
    monkeypatch.setattr(backends, "current_platform", lambda: platform)
    x = jnp.zeros((2, 16, 16, 256), dtype)  # UNet-like: 32 groups of 8 channels
    gamma, mod = jnp.zeros((256,), dtype), jnp.zeros((2, 256), dtype)
    image = jnp.zeros((2, 32, 32, 3), dtype)  # 24 rows of 128; blocks of 16 leave a partial

    def train_step(x, gamma, mod):
        out, vjp = jax.vjp(lambda *a: group_norm_modulate_silu(*a, groups=32, backend=backend),
                           x, gamma, gamma, mod, mod)
        return out, vjp(out)

    def sample_step(x, t):
        coeffs = ddim_coefficients(linear_alpha_bars(), t, t - 20, 1.0)
        return sampler_step(x, x, x, coeffs, parameterization="v", clip_x0=True,
                            guidance_scale=2.0, uncond_output=x, block_rows=16,
                            backend=backend)

    marker = "triton" if backend == "triton" else "tpu_custom_call"
    with context():
        for fn, args in ((train_step, (x, gamma, mod)),
                         (sample_step, (image, jnp.array([500, 30])))):
            text = jax.jit(fn).trace(*args).lower(
                lowering_platforms=(lowering_platform,)).as_text()
            assert marker in text


def test_triton_group_norm_needs_power_of_two_slabs(monkeypatch):
    monkeypatch.setattr(backends, "current_platform", lambda: "gpu")
    x = jnp.zeros((1, 8, 8, 320), jnp.float32)  # 10 channels per group (Stable Diffusion)
    gamma, mod = jnp.zeros((320,)), jnp.zeros((1, 320))
    with pytest.raises(ValueError, match="powers of two"):
        jax.jit(lambda x: group_norm_modulate_silu(x, gamma, gamma, mod, mod, groups=32,
                                                   backend="triton")).trace(x)
