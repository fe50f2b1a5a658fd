"""Fused GroupNorm + time-embedding modulation + SiLU, the pre-conv op of a diffusion ResBlock.

    out = silu(groupnorm(x) * (1 + scale) + shift)

One Pallas kernel reads x once and writes out once (XLA's unfused version makes several passes
for the statistics, the normalisation, the modulation and the activation). Statistics are
float32 and two-pass (mean, then the mean of squared deviations) over the whole group slab,
which is in the kernel at once. The backward pass is a second Pallas kernel under a custom VJP:
it recomputes the normalised activations from x and the saved per-(row, group) mean and
1/std, and produces dx plus two per-(row, channel) sums from which the parameter gradients
follow in a few [batch, channels] XLA ops (see `_gn_bwd`).

Grid (see pallas_kernels.backends for the backends):
- GPU-style ("interpret", "triton"): one program per (batch row, group), each reading the
  [height * width, channels / groups] slab of its group (strided: channels / groups contiguous
  elements per pixel). Triton needs both height * width and channels / groups to be powers of
  two, and the whole slab lives in registers: fine for UNet activations up to about
  64 x 64 x (4 channels per group), i.e. slabs of <= 16K elements; much larger slabs spill.
- TPU-style ("tpu", "tpu_interpret"): one program per batch row reading the full
  [height * width, channels] slab (full trailing dims satisfy the (8, 128) tiling for any
  shape). Per-group sums are a matmul of the per-channel sums with a [channels, channels]
  same-group 0/1 matrix built in the kernel. VMEM holds the double-buffered input and output
  slabs: 32 x 32 x 256 float32 is 1 MiB each, comfortable; 64 x 64 x 512 float32 (8 MiB each)
  would exceed the default scoped VMEM limit.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _autodiff, backends


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call (hashable: the custom VJP's nondiff argument)."""

    backend: str
    groups: int
    eps: float
    pixels: int  # height * width
    channels: int

    @property
    def group_size(self) -> int:
        return self.channels // self.groups

    @property
    def count(self) -> float:
        """Elements per (row, group): the statistics' denominator."""
        return float(self.pixels * self.group_size)


def _sigmoid(z):
    # exp(-z) may overflow to inf for very negative z: 1 / inf = 0, still correct.
    return 1.0 / (1.0 + jnp.exp(-z))


def _forward_math(x, gamma, beta, scale, shift, group_sum, cfg: _Config):
    """out, mean, rstd for one slab x [pixels, ch]; params and stats [1, ch], float32.

    group_sum maps per-channel sums [1, ch] to their group's total, broadcast per channel.
    """
    x = x.astype(jnp.float32)
    mean = group_sum(jnp.sum(x, axis=0, keepdims=True)) / cfg.count
    centered = x - mean
    var = group_sum(jnp.sum(centered * centered, axis=0, keepdims=True)) / cfg.count
    rstd = 1.0 / jnp.sqrt(var + cfg.eps)
    a = gamma * (1.0 + scale)  # z = xhat * a + b
    b = beta * (1.0 + scale) + shift
    z = centered * (rstd * a) + b
    return z * _sigmoid(z), mean, rstd


def _backward_math(x, dout, gamma, beta, scale, shift, mean, rstd, group_sum, cfg: _Config):
    """dx [pixels, ch] and per-channel sums s1 = sum dz, s2 = sum dz * xhat, both [1, ch].

    With z = xhat * a + b (a = gamma (1 + scale)): dz = dout * silu'(z), and the GroupNorm
    backward dx = rstd * (dz a - mean_g(dz a) - xhat mean_g(dz a xhat)), whose group means
    are group sums of a * s1 and a * s2.
    """
    x = x.astype(jnp.float32)
    dout = dout.astype(jnp.float32)
    xhat = (x - mean) * rstd
    a = gamma * (1.0 + scale)
    z = xhat * a + (beta * (1.0 + scale) + shift)
    sig = _sigmoid(z)
    dz = dout * (sig * (1.0 + z * (1.0 - sig)))
    s1 = jnp.sum(dz, axis=0, keepdims=True)
    s2 = jnp.sum(dz * xhat, axis=0, keepdims=True)
    k1 = group_sum(a * s1) / cfg.count
    k2 = group_sum(a * s2) / cfg.count
    dx = rstd * (dz * a - k1 - xhat * k2)
    return dx, s1, s2


# --- GPU-style: one program per (row, group), the slab holds exactly one group. ---

def _whole_slab_sum(v):
    """[1, ch] -> its total, broadcast to [1, ch] (the slab is one group)."""
    return jnp.broadcast_to(jnp.sum(v, axis=1, keepdims=True), v.shape)


def _gpu_fwd_kernel(x_ref, g_ref, b_ref, sc_ref, sh_ref, o_ref, mean_ref, rstd_ref, *, cfg):
    out, mean, rstd = _forward_math(x_ref[...], g_ref[...], b_ref[...], sc_ref[...],
                                    sh_ref[...], _whole_slab_sum, cfg)
    o_ref[...] = out.astype(o_ref.dtype)
    mean_ref[...] = mean
    rstd_ref[...] = rstd


def _gpu_bwd_kernel(x_ref, do_ref, g_ref, b_ref, sc_ref, sh_ref, mean_ref, rstd_ref,
                    dx_ref, s1_ref, s2_ref, *, cfg):
    dx, s1, s2 = _backward_math(x_ref[...], do_ref[...], g_ref[...], b_ref[...], sc_ref[...],
                                sh_ref[...], mean_ref[...], rstd_ref[...], _whole_slab_sum,
                                cfg)
    dx_ref[...] = dx.astype(dx_ref.dtype)
    s1_ref[...] = s1
    s2_ref[...] = s2


def _gpu_specs(cfg: _Config):
    cg = cfg.group_size
    slab = pl.BlockSpec((None, cfg.pixels, cg), lambda b, g: (b, 0, g))
    param = pl.BlockSpec((1, cg), lambda b, g: (0, g))  # gamma, beta: [1, C]
    row = pl.BlockSpec((None, 1, cg), lambda b, g: (b, 0, g))  # [B, 1, C]
    return slab, param, row


def _check_triton(cfg: _Config) -> None:
    def pow2(n):
        return n & (n - 1) == 0

    if not (pow2(cfg.pixels) and pow2(cfg.group_size)):
        raise ValueError(
            f"group_norm_modulate_silu: the triton backend needs height*width ({cfg.pixels}) "
            f"and channels/groups ({cfg.group_size}) to be powers of two (Triton tiles); use "
            "backend='interpret' or the XLA reference for this shape.")


# --- TPU-style: one program per row, the slab holds every group. ---

def _same_group_sum(cfg: _Config):
    """[1, C] -> per-channel group totals, as a matmul with a same-group 0/1 [C, C] matrix."""
    c = cfg.channels
    # Group ids through float floor: vector integer division is not a given on Mosaic.
    inv = 1.0 / cfg.group_size
    row = jnp.floor((lax.broadcasted_iota(jnp.int32, (c, c), 0).astype(jnp.float32) + 0.5) * inv)
    col = jnp.floor((lax.broadcasted_iota(jnp.int32, (c, c), 1).astype(jnp.float32) + 0.5) * inv)
    same = (row == col).astype(jnp.float32)

    def group_sum(v):
        # 8 identical rows keep the matmul sublane-aligned; HIGHEST keeps float32 sums exact.
        rows = jnp.broadcast_to(v, (8, c))
        total = lax.dot_general(rows, same, (((1,), (0,)), ((), ())),
                                precision=lax.Precision.HIGHEST,
                                preferred_element_type=jnp.float32)
        return total[0:1]

    return group_sum


def _tpu_fwd_kernel(x_ref, g_ref, b_ref, sc_ref, sh_ref, o_ref, mean_ref, rstd_ref, *, cfg):
    out, mean, rstd = _forward_math(x_ref[...], g_ref[...], b_ref[...], sc_ref[...],
                                    sh_ref[...], _same_group_sum(cfg), cfg)
    o_ref[...] = out.astype(o_ref.dtype)
    mean_ref[...] = mean
    rstd_ref[...] = rstd


def _tpu_bwd_kernel(x_ref, do_ref, g_ref, b_ref, sc_ref, sh_ref, mean_ref, rstd_ref,
                    dx_ref, s1_ref, s2_ref, *, cfg):
    dx, s1, s2 = _backward_math(x_ref[...], do_ref[...], g_ref[...], b_ref[...], sc_ref[...],
                                sh_ref[...], mean_ref[...], rstd_ref[...],
                                _same_group_sum(cfg), cfg)
    dx_ref[...] = dx.astype(dx_ref.dtype)
    s1_ref[...] = s1
    s2_ref[...] = s2


def _tpu_specs(cfg: _Config, batch: int):
    p, c = cfg.pixels, cfg.channels
    for name, block, shape in (("x", (None, p, c), (batch, p, c)), ("gamma", (1, c), (1, c)),
                               ("scale", (None, 1, c), (batch, 1, c))):
        backends.check_tpu_tiling(name, block, shape)
    slab = pl.BlockSpec((None, p, c), lambda b: (b, 0, 0))
    param = pl.BlockSpec((1, c), lambda b: (0, 0))
    row = pl.BlockSpec((None, 1, c), lambda b: (b, 0, 0))
    return slab, param, row


def _call(cfg: _Config, kernel_name: str, gpu_kernel, tpu_kernel, ins, n_slab_in: int,
          out_shape):
    """Runs the forward or backward kernel: ins = n_slab_in slabs, 2 params, then rows."""
    batch = ins[0].shape[0]
    if backends.is_tpu_style(cfg.backend):
        slab, param, row = _tpu_specs(cfg, batch)
        kernel, grid, name = tpu_kernel, (batch,), kernel_name + "_tpu"
        params = backends.compiler_params(cfg.backend, dimension_semantics=("parallel",))
    else:
        if cfg.backend == "triton":
            _check_triton(cfg)
        slab, param, row = _gpu_specs(cfg)
        kernel, grid, name = gpu_kernel, (batch, cfg.groups), kernel_name
        params = backends.compiler_params(cfg.backend, num_warps=4, num_stages=1)
    in_specs = [slab] * n_slab_in + [param, param] + [row] * (len(ins) - n_slab_in - 2)
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        out_shape=out_shape,
        grid=grid,
        in_specs=in_specs,
        out_specs=[slab, row, row],
        interpret=backends.interpret_arg(cfg.backend),
        compiler_params=params,
        name=name,
    )(*ins)


def _params(gamma, beta, scale, shift):
    """float32 gamma, beta [1, C] and scale, shift [B, 1, C] as the kernels read them."""
    f32 = jnp.float32
    return (gamma.astype(f32)[None, :], beta.astype(f32)[None, :],
            scale.astype(f32)[:, None, :], shift.astype(f32)[:, None, :])


def _forward(cfg: _Config, x, gamma, beta, scale, shift):
    batch = x.shape[0]
    stat = jax.ShapeDtypeStruct((batch, 1, cfg.channels), jnp.float32)
    return _call(cfg, "group_norm_modulate_silu_fwd", _gpu_fwd_kernel, _tpu_fwd_kernel,
                 [x, *_params(gamma, beta, scale, shift)], 1,
                 [jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat])


_REFUSAL = _autodiff.refusal(
    "pallas_kernels.group_norm_modulate_silu",
    "the XLA GroupNorm (genai_jax: model.kernels='xla'; or "
    "pallas_kernels.reference.group_norm_modulate_silu)")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gn(cfg, x, gamma, beta, scale, shift):
    return _forward(cfg, x, gamma, beta, scale, shift)[0]


def _gn_fwd(cfg, x, gamma, beta, scale, shift):
    out, mean, rstd = _autodiff.reverse_mode_only(_REFUSAL, functools.partial(_forward, cfg),
                                                  x, gamma, beta, scale, shift)
    return out, (x, gamma, beta, scale, shift, mean, rstd)


def _gn_bwd(cfg, residuals, dout):
    x, gamma, beta, scale, shift, mean, rstd = residuals
    batch = x.shape[0]
    stat = jax.ShapeDtypeStruct((batch, 1, cfg.channels), jnp.float32)
    g, b, sc, sh = _params(gamma, beta, scale, shift)
    dx, s1, s2 = _autodiff.reverse_mode_only(
        _REFUSAL,
        lambda *ins: _call(cfg, "group_norm_modulate_silu_bwd", _gpu_bwd_kernel, _tpu_bwd_kernel,
                           list(ins), 2, [jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat]),
        x, dout, g, b, sc, sh, mean, rstd)
    # z = y (1 + scale) + shift with y = xhat gamma + beta, so per (row, channel):
    # dshift = sum dz, dscale = sum dz y = gamma s2 + beta s1, and summed over rows:
    # dbeta = (1 + scale) s1, dgamma = (1 + scale) s2.
    s1, s2 = s1[:, 0], s2[:, 0]  # [B, C]
    g, b, one_plus = g[0], b[0], 1.0 + sc[:, 0]
    return (dx,
            jnp.sum(one_plus * s2, axis=0).astype(gamma.dtype),
            jnp.sum(one_plus * s1, axis=0).astype(beta.dtype),
            (g * s2 + b * s1).astype(scale.dtype),
            s1.astype(shift.dtype))


_gn.defvjp(_gn_fwd, _gn_bwd)


def group_norm_modulate_silu(
    x: jax.Array,
    gamma: jax.Array,
    beta: jax.Array,
    scale: jax.Array,
    shift: jax.Array,
    *,
    groups: int,
    eps: float = 1e-5,
    backend: str | None = None,
) -> jax.Array:
    """silu(groupnorm(x) * (1 + scale) + shift) in one kernel, differentiable in every input.

    Args:
      x: [batch, height, width, channels] (NHWC), float32 or bfloat16.
      gamma, beta: [channels], GroupNorm's affine parameters.
      scale, shift: [batch, channels], the time-embedding modulation.
      groups: number of channel groups; must divide channels (1 = LayerNorm over H, W, C).
      eps: added to the group variance.
      backend: None (by platform), "interpret", "triton", "tpu" or "tpu_interpret".

    Returns:
      [batch, height, width, channels] in x's dtype; statistics and arithmetic are float32.
      Gradients come back in each input's dtype.
    """
    if x.ndim != 4:
        raise ValueError(f"group_norm_modulate_silu: x must be [batch, height, width, "
                         f"channels], got shape {x.shape}.")
    batch, height, width, channels = x.shape
    if groups < 1 or channels % groups:
        raise ValueError(f"group_norm_modulate_silu: groups={groups} must be a positive "
                         f"divisor of channels={channels}.")
    for name, arr, want in (("gamma", gamma, (channels,)), ("beta", beta, (channels,)),
                            ("scale", scale, (batch, channels)),
                            ("shift", shift, (batch, channels))):
        if arr.shape != want:
            raise ValueError(f"group_norm_modulate_silu: {name} must have shape {want}, got "
                             f"{arr.shape}.")
    cfg = _Config(backend=backends.resolve_backend(backend), groups=groups, eps=float(eps),
                  pixels=height * width, channels=channels)
    out = _autodiff.call_custom_vjp(_REFUSAL, _gn, cfg, x.reshape(batch, height * width, channels),
                                    gamma, beta, scale, shift)
    return out.reshape(x.shape)
