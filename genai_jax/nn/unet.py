"""The diffusion denoisers: a UNet for images and a small MLP for 2-D points.

UNet (Ho et al. 2020, with Dhariwal & Nichol 2021's refinements): ResBlocks with GroupNorm
whose second norm is modulated by the time (+ class) embedding, AdaGN
`h = silu(groupnorm(h) * (1 + scale) + shift)`; self-attention at the low resolutions; a skip
connection from every down-path block to the up path; the last conv of every residual branch
and of the output starts at zero, so every block starts as the identity and the untrained
network outputs exactly 0.

Resolutions come from the image side: halve while height and width are even and the result is
at least 4 (8 -> 4; 28 -> 14 -> 7; 32 -> 16 -> 8 -> 4), and at most `len(channel_mult)` levels.

Class conditioning: a label embedding with `num_classes + 1` rows is added to the time
embedding; row `num_classes` is the learned "no label" class that classifier-free guidance
trains (label dropout) and samples with.

`kernels="pallas"` runs each ResBlock's GroupNorm -> modulation -> SiLU as the fused
`pallas_kernels.group_norm_modulate_silu` (the first, unmodulated norm with scale = shift = 0);
"xla" computes the same math with jnp ops.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from genai_jax.nn.attention import dot_product_attention
from genai_jax.nn.layers import VECTOR, Conv, Dense, Embed, GroupNorm, LayerNorm, rematerialized
from genai_jax.parallel import constrain


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    shape: tuple[int, ...]  # one example: (height, width, channels), or (dim,) for points
    num_classes: int = 0  # 0: unconditional (no label embedding)
    channels: int = 64  # width of the first level
    channel_mult: tuple[int, ...] = (1, 2, 2)  # width of level i = channels * channel_mult[i]
    num_res_blocks: int = 2  # per level on the way down (one more on the way up)
    attention_max_side: int = 8  # self-attention at levels whose side is <= this (0: none)
    num_heads: int = 4
    groups: int = 8  # GroupNorm groups (must divide every level's width)
    kernels: str = "xla"  # "xla" | "pallas": the fused GroupNorm-modulate-SiLU
    attention: str = "xla"  # genai_jax.nn.dot_product_attention implementation
    mlp_width: int = 256  # points only: the MLP denoiser's width and depth
    mlp_depth: int = 3
    remat: str = "none"  # none | full | dots (layers.REMAT_POLICIES), per ResBlock + attention
    dtype: str = "float32"


def resolutions(height: int, width: int, max_levels: int) -> list[tuple[int, int]]:
    """The (height, width) of each level: halve while both are even and stay >= 4."""
    sides = [(height, width)]
    while (len(sides) < max_levels and all(s % 2 == 0 and s >= 8 for s in sides[-1])):
        sides.append((sides[-1][0] // 2, sides[-1][1] // 2))
    return sides


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding `[n, dim]` of (integer or real) timesteps `t [n]` (Transformer
    positions with frequencies from 1 to 1 / max_period)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return constrain(jnp.pad(emb, [(0, 0), (0, dim % 2)]), VECTOR)


class TimeEmbedding(nnx.Module):
    """t (and label) -> the conditioning vector `[n, emb_dim]`: sinusoid -> MLP (+ label row)."""

    def __init__(self, base: int, emb_dim: int, num_classes: int, *, dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        self.base = base
        self.up = Dense([base], [emb_dim], axes=("embed", "mlp"), stddev=base ** -0.5, **kw)
        self.out = Dense([emb_dim], [emb_dim], axes=("mlp", "embed"), stddev=emb_dim ** -0.5,
                         **kw)
        # Label rows at the time embedding's unit scale, so the class is a signal from the first
        # step (at a transformer's 0.02 it is drowned by the time embedding for hundreds).
        self.labels = Embed(num_classes + 1, emb_dim, stddev=1.0, dtype=dtype, rngs=rngs) \
            if num_classes else None

    def __call__(self, t: jax.Array, labels: jax.Array | None) -> jax.Array:
        emb = self.out(jax.nn.silu(self.up(timestep_embedding(t, self.base))))
        if self.labels is not None:
            if labels is None:
                raise ValueError("a class-conditional denoiser needs labels (the null class "
                                 "index num_classes for unconditional outputs)")
            emb = emb + self.labels(labels)
        return emb


def group_norm(norm: GroupNorm, x: jax.Array, scale: jax.Array | None = None,
               shift: jax.Array | None = None) -> jax.Array:
    """`norm`'s GroupNorm of NHWC `x`, then `* (1 + scale) + shift` (`[batch, channels]`).

    Same math as `norm(x)` with two-pass float32 statistics, but the per-group moments are
    reduced from per-channel ones ([n, C]) and everything per pixel is one multiply-add: on
    XLA:CPU the `[n, HW, groups, C/groups]` reduction of `GroupNorm.__call__` made the
    normalisation cost as much as the convolutions (28x28x32, batch 64: 47 -> 8 ms fwd+bwd).
    """
    n, c = x.shape[0], x.shape[-1]
    per_group = c // norm.groups
    x32 = x.astype(jnp.float32)

    def group_mean(v):  # [n, H, W, C] -> its per-(row, group) mean, broadcast to [n, 1, 1, C]
        m = jnp.mean(v, axis=(1, 2)).reshape(n, norm.groups, per_group).mean(-1)
        return jnp.repeat(m, per_group, axis=1)[:, None, None, :]

    centered = x32 - group_mean(x32)
    rstd = jax.lax.rsqrt(group_mean(jnp.square(centered)) + norm.eps)
    gain, bias = norm.scale[...].astype(jnp.float32), norm.bias[...].astype(jnp.float32)
    if scale is not None:  # fold the modulation into one per-(row, channel) gain and bias
        gain = gain * (1.0 + scale)[:, None, None, :]
        bias = (bias * (1.0 + scale) + shift)[:, None, None, :]
    return (centered * (rstd * gain) + bias).astype(norm.dtype)


def norm_modulate_silu(norm: GroupNorm, x: jax.Array, scale: jax.Array | None,
                       shift: jax.Array | None, kernels: str) -> jax.Array:
    """silu(norm(x) * (1 + scale) + shift) for NHWC `x`, scale/shift `[batch, channels]`
    (None: no modulation); `kernels="pallas"` runs it as one fused Pallas kernel."""
    if kernels == "pallas":
        import pallas_kernels

        if scale is None:
            scale = shift = jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32)
        return pallas_kernels.group_norm_modulate_silu(
            x, norm.scale[...], norm.bias[...], scale, shift, groups=norm.groups, eps=norm.eps)
    return jax.nn.silu(group_norm(norm, x, scale, shift))


class ResBlock(nnx.Module):
    """x + conv(AdaGN(conv(silu(groupnorm(x))), emb)), with a 1x1 conv on the skip when the
    width changes. `[n, H, W, in] -> [n, H, W, out]`."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, *, groups: int, kernels: str,
                 dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        self.kernels = kernels
        self.norm1 = GroupNorm(in_ch, min(groups, in_ch), **kw)
        self.conv1 = Conv(in_ch, out_ch, 3, **kw)
        self.emb = Dense([emb_dim], [2, out_ch], axes=("embed", None, "conv_out"),
                         stddev=emb_dim ** -0.5, **kw)
        self.norm2 = GroupNorm(out_ch, min(groups, out_ch), **kw)
        self.conv2 = Conv(out_ch, out_ch, 3, init=nnx.initializers.zeros, **kw)
        # A 1x1 convolution as a matmul: XLA:CPU's 1x1 conv weight gradient is 3x slower.
        self.skip = (Dense([in_ch], [out_ch], axes=("conv_in", "conv_out"),
                           stddev=in_ch ** -0.5, **kw) if in_ch != out_ch else None)

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        h = self.conv1(norm_modulate_silu(self.norm1, x, None, None, self.kernels))
        scale, shift = jnp.moveaxis(self.emb(jax.nn.silu(emb)), 1, 0)  # [n, out] each
        h = self.conv2(norm_modulate_silu(self.norm2, h, scale, shift, self.kernels))
        return (x if self.skip is None else self.skip(x)) + h


class AttentionBlock(nnx.Module):
    """x + self-attention over the H*W positions of groupnorm(x). `[n, H, W, C]`."""

    def __init__(self, ch: int, num_heads: int, *, groups: int, implementation: str, dtype,
                 rngs: nnx.Rngs):
        if ch % num_heads:
            raise ValueError(f"attention: num_heads={num_heads} must divide width {ch}")
        kw = dict(dtype=dtype, rngs=rngs)
        self.implementation = implementation
        self.norm = GroupNorm(ch, min(groups, ch), **kw)
        head_dim = ch // num_heads
        self.qkv = Dense([ch], [3, num_heads, head_dim], axes=("embed", None, "heads", "kv"),
                         stddev=ch ** -0.5, **kw)
        self.out = Dense([num_heads, head_dim], [ch], axes=("heads", "kv", "embed"), stddev=0.0,
                         **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, height, width, ch = x.shape
        # [n, seq, 3, heads, head_dim]
        qkv = self.qkv(group_norm(self.norm, x).reshape(n, height * width, ch))
        q, k, v = (qkv[:, :, i] for i in range(3))
        h = dot_product_attention(q, k, v, implementation=self.implementation)
        return x + self.out(h).reshape(x.shape)


class UNet(nnx.Module):
    """`(x_t [n, H, W, C], t int [n], labels int [n] | None) -> [n, H, W, C]` (eps or v)."""

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        height, width, in_ch = cfg.shape
        dtype = jnp.dtype(cfg.dtype)
        self.cfg = cfg
        sides = resolutions(height, width, len(cfg.channel_mult))
        widths = [cfg.channels * m for m in cfg.channel_mult[:len(sides)]]
        emb_dim = 4 * cfg.channels
        kw = dict(dtype=dtype, rngs=rngs)
        block = dict(groups=cfg.groups, kernels=cfg.kernels, **kw)

        def attention(ch, side):
            return (AttentionBlock(ch, cfg.num_heads, groups=cfg.groups,
                                   implementation=cfg.attention, **kw)
                    if max(side) <= cfg.attention_max_side else None)

        self.time = TimeEmbedding(cfg.channels, emb_dim, cfg.num_classes, **kw)
        self.conv_in = Conv(in_ch, widths[0], 3, **kw)
        # Down path: every block's output (and every downsample's) is a skip for the up path.
        down, skips, ch = [], [widths[0]], widths[0]
        for level, (side, w) in enumerate(zip(sides, widths, strict=True)):
            for _ in range(cfg.num_res_blocks):
                down.append(nnx.List([ResBlock(ch, w, emb_dim, **block), attention(w, side)]))
                ch = w
                skips.append(ch)
            if level < len(sides) - 1:
                down.append(Conv(ch, ch, 3, stride=2, **kw))
                skips.append(ch)
        self.down = nnx.List(down)
        self.mid = nnx.List([ResBlock(ch, ch, emb_dim, **block), attention(ch, sides[-1])])
        self.mid_out = ResBlock(ch, ch, emb_dim, **block)
        up = []
        for level in reversed(range(len(sides))):
            for _ in range(cfg.num_res_blocks + 1):
                w = widths[level]
                up.append(nnx.List([ResBlock(ch + skips.pop(), w, emb_dim, **block),
                                    attention(w, sides[level])]))
                ch = w
            if level > 0:
                # 2x upsampling: a conv at the low resolution (4x cheaper than after), then
                # nearest-neighbour repetition.
                up.append(Conv(ch, ch, 3, **kw))
        self.up = nnx.List(up)
        self.norm_out = GroupNorm(ch, min(cfg.groups, ch), **kw)
        self.conv_out = Conv(ch, in_ch, 3, init=nnx.initializers.zeros, **kw)

    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        emb = self.time(t, labels)
        kernels = self.cfg.kernels

        def block(layer, h, emb):
            res, attn = layer
            h = res(h, emb)
            return h if attn is None else attn(h)

        remat_block = rematerialized(block, self.cfg.remat)
        res_attn = lambda layer, h: remat_block(layer, h, emb)

        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Conv) else res_attn(layer, h)
            hs.append(h)
        h = self.mid_out(res_attn(self.mid, h), emb)
        for layer in self.up:
            if isinstance(layer, Conv):
                h = layer(h)
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
            else:
                h = res_attn(layer, jnp.concatenate([h, hs.pop()], axis=-1))
        h = norm_modulate_silu(self.norm_out, h, None, None, kernels)
        return self.conv_out(h).astype(x.dtype)


class MLPDenoiser(nnx.Module):
    """The denoiser of 2-D points: `(x_t [n, dim], t [n], labels [n] | None) -> [n, dim]`.

    Residual blocks `h + W2 silu(W1 AdaLN(h, emb))` with AdaLN = layernorm(h) * (1 + scale) +
    shift, the fully connected counterpart of the UNet's AdaGN.
    """

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        (dim,), width = cfg.shape, cfg.mlp_width
        kw = dict(dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.time = TimeEmbedding(width, width, cfg.num_classes, **kw)
        self.inp = Dense([dim], [width], axes=(None, "embed"), stddev=1.0, **kw)
        self.blocks = nnx.List([nnx.List([
            LayerNorm(width, use_bias=False, **kw),
            Dense([width], [2, width], axes=("embed", None, "mlp"), stddev=width ** -0.5, **kw),
            Dense([width], [width], axes=("embed", "mlp"), stddev=width ** -0.5, **kw),
            Dense([width], [width], axes=("mlp", "embed"), stddev=0.0, **kw),
        ]) for _ in range(cfg.mlp_depth)])
        self.norm_out = LayerNorm(width, **kw)
        self.out = Dense([width], [dim], axes=("embed", None), stddev=0.0, **kw)

    def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        emb = jax.nn.silu(self.time(t, labels))
        h = self.inp(x)
        for norm, modulation, w1, w2 in self.blocks:
            scale, shift = jnp.moveaxis(modulation(emb), 1, 0)
            h = h + w2(jax.nn.silu(w1(norm(h) * (1.0 + scale) + shift)))
        return self.out(jax.nn.silu(self.norm_out(h))).astype(x.dtype)


def make_denoiser(cfg: UNetConfig, rngs: nnx.Rngs) -> UNet | MLPDenoiser:
    """A UNet for `[H, W, C]` images, the MLP for `[dim]` points."""
    return UNet(cfg, rngs=rngs) if len(cfg.shape) == 3 else MLPDenoiser(cfg, rngs=rngs)
