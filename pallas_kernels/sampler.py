"""One diffusion sampling step as a single Pallas kernel: network output -> x_{t-1}.

The step (every quantity float32 inside the kernel, per element):

    out   = uncond + w (cond - uncond)            classifier-free guidance, if requested
    x0    = (x_t - s eps) / a                     parameterization "eps" (eps = out)
    eps   = (x_t - a x0) / s                      parameterization "x0"  (x0 = out)
    x0, eps = a x_t - s v, s x_t + a v            parameterization "v"   (v = out)
    x0    = clip(x0, -1, 1); eps = (x_t - a x0) / s    if clip_x0
    x_{t-1} = c_x0 x0 + c_xt x_t + c_eps eps + sigma noise

with a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t). DDPM ancestral sampling and DDIM(eta)
differ only in (c_x0, c_xt, c_eps, sigma), made by `ddpm_coefficients` and `ddim_coefficients`
(formulas in their docstrings). Every coefficient, and the guidance weight w, is a scalar or a
[batch] array (t may differ per row); they travel to the kernel as one float32 [batch * 8]
array, so changing them between steps never recompiles.

Layout: each row of x_t is flattened and viewed as [rows, 128] lanes (padded, with a copy,
when its size is not a multiple of 128); the grid is (batch, row blocks). GPU-style backends
read the coefficients from the whole array in memory, TPU-style ones get them in SMEM through
scalar prefetch. Forward only: sampling needs no gradient.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import backends

PARAMETERIZATIONS = ("eps", "x0", "v")
_LANES = 128
_STRIDE = 8  # coefficient slots per row: a, s, c_x0, c_xt, c_eps, sigma, w, (unused)
# Rows of 128 lanes per block: few large blocks in the interpreter (its cost is per grid
# step), 32 KiB float32 tiles on GPU, 256 KiB on TPU.
_DEFAULT_BLOCK_ROWS = {"interpret": 1024, "triton": 64, "tpu": 512, "tpu_interpret": 512}


class SamplerCoefficients(NamedTuple):
    """Per-step scalars of one sampling step; each field a scalar or a [batch] array."""

    sqrt_alpha_bar: jax.Array  # a = sqrt(alpha_bar_t)
    sqrt_one_minus_alpha_bar: jax.Array  # s = sqrt(1 - alpha_bar_t)
    coef_x0: jax.Array  # weight of the predicted x0 in x_{t-1}
    coef_xt: jax.Array  # weight of x_t
    coef_eps: jax.Array  # weight of the predicted eps
    sigma: jax.Array  # standard deviation of the added noise


def linear_alpha_bars(num_timesteps: int = 1000, beta_start: float = 1e-4,
                      beta_end: float = 0.02) -> jax.Array:
    """alpha_bar_t = prod_{i<=t} (1 - beta_i) for Ho et al.'s linear betas, [num_timesteps]."""
    betas = jnp.linspace(beta_start, beta_end, num_timesteps, dtype=jnp.float32)
    return jnp.cumprod(1.0 - betas)


def _alpha_bar(alpha_bars, t):
    """alpha_bar at integer t (scalar or [batch]); 1 for t < 0 (the clean data)."""
    t = jnp.asarray(t, jnp.int32)
    return jnp.where(t >= 0, alpha_bars[jnp.maximum(t, 0)], 1.0).astype(jnp.float32)


def ddpm_coefficients(alpha_bars: jax.Array, t) -> SamplerCoefficients:
    """Ancestral DDPM step t -> t-1 (Ho et al. 2020, eqs. 6-7), t 0-based, scalar or [batch].

    With alpha_t = alpha_bar_t / alpha_bar_{t-1}, beta_t = 1 - alpha_t and alpha_bar_{-1} = 1:
    x_{t-1} = c_x0 x0 + c_xt x_t + sigma z, the posterior q(x_{t-1} | x_t, x0) with
      c_x0    = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)
      c_xt    = sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
      sigma^2 = beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
    and c_eps = 0. At t = 0 this is x_{-1} = x0 with no noise.
    """
    ab = _alpha_bar(alpha_bars, t)
    ab_prev = _alpha_bar(alpha_bars, jnp.asarray(t) - 1)
    alpha = ab / ab_prev
    beta = 1.0 - alpha
    return SamplerCoefficients(
        sqrt_alpha_bar=jnp.sqrt(ab),
        sqrt_one_minus_alpha_bar=jnp.sqrt(1.0 - ab),
        coef_x0=jnp.sqrt(ab_prev) * beta / (1.0 - ab),
        coef_xt=jnp.sqrt(alpha) * (1.0 - ab_prev) / (1.0 - ab),
        coef_eps=jnp.zeros_like(ab),
        sigma=jnp.sqrt((1.0 - ab_prev) / (1.0 - ab) * beta),
    )


def ddim_coefficients(alpha_bars: jax.Array, t, t_prev, eta: float = 0.0
                      ) -> SamplerCoefficients:
    """DDIM step t -> t_prev (Song et al. 2021, eqs. 12 and 16); t_prev = -1 ends at x0.

    x_{t_prev} = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev - sigma^2) eps + sigma z,
      sigma = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t /
              alpha_bar_prev),
    so c_x0 = sqrt(alpha_bar_prev), c_xt = 0, c_eps = sqrt(1 - alpha_bar_prev - sigma^2).
    eta = 0 is deterministic DDIM; eta = 1 with t_prev = t - 1 is exactly the DDPM step.
    """
    ab = _alpha_bar(alpha_bars, t)
    ab_prev = _alpha_bar(alpha_bars, t_prev)
    sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
    return SamplerCoefficients(
        sqrt_alpha_bar=jnp.sqrt(ab),
        sqrt_one_minus_alpha_bar=jnp.sqrt(1.0 - ab),
        coef_x0=jnp.sqrt(ab_prev),
        coef_xt=jnp.zeros_like(ab),
        coef_eps=jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma**2, 0.0)),
        sigma=sigma,
    )


def _step_math(coef, xt, out, uncond, noise, *, parameterization: str, clip_x0: bool):
    """x_{t-1} in float32 from loaded blocks; coef(k) reads coefficient slot k."""
    f32 = jnp.float32
    xt, out = xt.astype(f32), out.astype(f32)
    if uncond is not None:
        uncond = uncond.astype(f32)
        out = uncond + coef(6) * (out - uncond)
    a, s = coef(0), coef(1)
    if parameterization == "eps":
        eps = out
        x0 = (xt - s * eps) / a
    elif parameterization == "x0":
        x0 = out
        eps = (xt - a * x0) / s
    else:  # "v"
        x0 = a * xt - s * out
        eps = s * xt + a * out
    if clip_x0:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (xt - a * x0) / s
    x_prev = coef(2) * x0 + coef(3) * xt + coef(4) * eps
    if noise is not None:
        x_prev = x_prev + coef(5) * noise.astype(f32)
    return x_prev


def _kernel(coef_ref, *refs, guided: bool, has_noise: bool, **math):
    xt_ref, out_ref, *rest = refs
    uncond_ref = rest.pop(0) if guided else None
    noise_ref = rest.pop(0) if has_noise else None
    (o_ref,) = rest
    base = pl.program_id(0) * _STRIDE

    def coef(k):
        return coef_ref[base + k]

    o_ref[...] = _step_math(coef, xt_ref[...], out_ref[...],
                            None if uncond_ref is None else uncond_ref[...],
                            None if noise_ref is None else noise_ref[...],
                            **math).astype(o_ref.dtype)


def _block_rows(backend: str, rows: int, block_rows: int | None) -> int:
    block = block_rows or _DEFAULT_BLOCK_ROWS[backend]
    if backend == "triton":  # power-of-two tiles
        return min(block, 1 << max(0, (rows - 1).bit_length()))
    if backends.is_tpu_style(backend):
        if block >= rows:
            return rows
        if block % 8:
            raise ValueError(f"sampler_step: TPU block_rows must be a multiple of 8, got "
                             f"{block}.")
        return block
    return min(block, rows)


def _pack(coeffs: SamplerCoefficients, guidance_scale, batch: int) -> jax.Array:
    cols = [*coeffs, 1.0 if guidance_scale is None else guidance_scale, 0.0]
    packed = []
    for name, c in zip((*SamplerCoefficients._fields, "guidance_scale", "unused"), cols,
                       strict=True):
        c = jnp.asarray(c, jnp.float32)
        if c.shape not in ((), (batch,)):
            raise ValueError(f"sampler_step: {name} must be a scalar or [batch={batch}], got "
                             f"shape {c.shape}.")
        packed.append(jnp.broadcast_to(c, (batch,)))
    return jnp.stack(packed, axis=1).reshape(batch * _STRIDE)


def sampler_step(
    x_t: jax.Array,
    model_output: jax.Array,
    noise: jax.Array | None,
    coeffs: SamplerCoefficients,
    *,
    parameterization: str,
    clip_x0: bool = False,
    guidance_scale: float | jax.Array | None = None,
    uncond_output: jax.Array | None = None,
    block_rows: int | None = None,
    backend: str | None = None,
) -> jax.Array:
    """x_{t-1} from x_t and the network's output in one fused pass (forward only).

    Args:
      x_t: [batch, ...] (e.g. [batch, height, width, channels]), float32 or bfloat16.
      model_output: the network's (conditional) prediction, x_t's shape: eps, x0 or v.
      noise: standard normal noise of x_t's shape, or None for no noise term (DDIM eta=0,
        the last step).
      coeffs: from `ddpm_coefficients` / `ddim_coefficients`; each field a scalar or [batch].
      parameterization: "eps", "x0" or "v" (v = sqrt(alpha_bar) eps - sqrt(1-alpha_bar) x0).
      clip_x0: clip the predicted x0 to [-1, 1] and recompute eps from it.
      guidance_scale: w of classifier-free guidance, scalar or [batch]; needs uncond_output.
      uncond_output: the unconditional prediction; out = uncond + w (cond - uncond).
      block_rows: rows of 128 elements per program; default per backend.
      backend: None (by platform), "interpret", "triton", "tpu" or "tpu_interpret".

    Returns:
      x_{t-1}, x_t's shape and dtype (arithmetic in float32).
    """
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"sampler_step: parameterization must be one of {PARAMETERIZATIONS}, "
                         f"got {parameterization!r}.")
    if (guidance_scale is None) != (uncond_output is None):
        raise ValueError("sampler_step: classifier-free guidance needs both guidance_scale "
                         "and uncond_output (or neither).")
    if x_t.ndim < 1:
        raise ValueError("sampler_step: x_t must be [batch, ...].")
    for name, arr in (("model_output", model_output), ("noise", noise),
                      ("uncond_output", uncond_output)):
        if arr is not None and arr.shape != x_t.shape:
            raise ValueError(f"sampler_step: {name} has shape {arr.shape}, x_t has "
                             f"{x_t.shape}; they must match.")
    backend = backends.resolve_backend(backend)
    batch = x_t.shape[0]
    coef = _pack(coeffs, guidance_scale, batch)
    inputs = [a for a in (x_t, model_output, uncond_output, noise) if a is not None]

    size = x_t.size // batch if batch else 0
    padded = -(-size // _LANES) * _LANES
    rows = padded // _LANES

    def as_rows(a):
        a = a.reshape(batch, size)
        if padded != size:
            a = jnp.pad(a, [(0, 0), (0, padded - size)])
        return a.reshape(batch, rows, _LANES)

    inputs = [as_rows(a) for a in inputs]
    br = _block_rows(backend, rows, block_rows)
    grid = (batch, pl.cdiv(rows, br))
    block = (None, br, _LANES)
    kernel = functools.partial(_kernel, guided=uncond_output is not None,
                               has_noise=noise is not None, parameterization=parameterization,
                               clip_x0=clip_x0)
    out_shape = jax.ShapeDtypeStruct((batch, rows, _LANES), x_t.dtype)
    if backends.is_tpu_style(backend):
        backends.check_tpu_tiling("x_t", block, out_shape.shape)
        spec = pl.BlockSpec(block, lambda b, i, coef_ref: (b, i, 0))
        out = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid,
                                                   in_specs=[spec] * len(inputs),
                                                   out_specs=spec),
            interpret=backends.interpret_arg(backend),
            compiler_params=backends.compiler_params(
                backend, dimension_semantics=("parallel", "parallel")),
            name="sampler_step_tpu",
        )(coef, *inputs)
    else:
        spec = pl.BlockSpec(block, lambda b, i: (b, i, 0))
        out = pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=grid,
            in_specs=[pl.BlockSpec()] + [spec] * len(inputs),
            out_specs=spec,
            interpret=backends.interpret_arg(backend),
            compiler_params=backends.compiler_params(backend, num_warps=4, num_stages=1),
            name="sampler_step",
        )(coef, *inputs)
    return out.reshape(batch, padded)[:, :size].reshape(x_t.shape)
