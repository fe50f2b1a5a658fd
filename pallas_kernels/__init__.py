"""Pallas kernels for attention and denoising, with pure-jnp references; importable without
genai_jax.

    from pallas_kernels import flash_attention, flash_decode
    out = flash_attention(q, k, v, causal=True)        # [batch, seq, heads, head_dim]
    out = flash_decode(q_new, k_cache, v_cache, lengths)
    h = group_norm_modulate_silu(x, gamma, beta, scale, shift, groups=32)  # NHWC
    x_prev = sampler_step(x_t, eps_hat, noise, ddim_coefficients(alpha_bars, t, t_prev),
                          parameterization="eps")

`backend=None` picks the platform's lowering: "interpret" on CPU, "triton" on GPU, "tpu" on
TPU; "tpu_interpret" runs the TPU kernels on the CPU (see pallas_kernels.backends).
`python -m pallas_kernels.benchmark` times the kernels against XLA (and cuDNN on GPU).
"""

from pallas_kernels.backends import BACKENDS, available_backends, resolve_backend
from pallas_kernels.config import BlockSizes
from pallas_kernels.decode import flash_decode
from pallas_kernels.flash_attention import SegmentIds, flash_attention
from pallas_kernels.group_norm import group_norm_modulate_silu
from pallas_kernels.sampler import (
    SamplerCoefficients,
    ddim_coefficients,
    ddpm_coefficients,
    linear_alpha_bars,
    sampler_step,
)

__all__ = [
    "BACKENDS",
    "BlockSizes",
    "SamplerCoefficients",
    "SegmentIds",
    "available_backends",
    "ddim_coefficients",
    "ddpm_coefficients",
    "flash_attention",
    "flash_decode",
    "group_norm_modulate_silu",
    "linear_alpha_bars",
    "resolve_backend",
    "sampler_step",
]
