"""The VAE's networks: a convolutional (or MLP, for 2-D points) encoder to a diagonal Gaussian
posterior and a decoder to the parameters of the pixel likelihood.

Images `[batch, H, W, C]` in [-1, 1]. Each encoder stage is one convolution (4x4 with stride 2
while the side stays even and its half is >= 4, else 3x3 with stride 1) followed by `blocks`
residual 3x3 blocks; 28 -> 14 -> 7 for MNIST, 8 -> 4 for the digits, 32 -> 16 -> 8 -> 4 for CIFAR-10
with three stages. The decoder mirrors it with sub-pixel convolutions. Class conditioning
concatenates a learned label embedding to the encoder's flattened features and to z.
"""

from __future__ import annotations

import dataclasses
import math

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from genai_jax.nn.layers import VECTOR, Conv, Dense, lookup, param
from genai_jax.parallel import constrain


@dataclasses.dataclass(frozen=True)
class NetConfig:
    shape: tuple[int, ...]  # one example: (H, W, C) or (dim,)
    latent_dim: int
    out_channels: int  # likelihood parameters per pixel (or per coordinate)
    channels: tuple[int, ...] = (32, 64)
    blocks: int = 1
    hidden: int = 256
    mlp_layers: int = 2
    num_classes: int = 0  # > 0: class-conditional
    label_dim: int = 16
    learned_scale: bool = False  # one log-scale per channel, not one per pixel
    dtype: str = "float32"

    @property
    def points(self) -> bool:
        return len(self.shape) == 1


def strides(shape: tuple[int, ...], num_stages: int) -> list[int]:
    """Stride of each conv stage: 2 while the side stays even and its half is >= 4."""
    side, out = min(shape[:2]), []
    for _ in range(num_stages):
        s = 2 if side % 2 == 0 and side // 2 >= 4 and all(d % 2 == 0 for d in shape[:2]) else 1
        out.append(s)
        side //= s
        shape = (shape[0] // s, shape[1] // s)
    return out


def _dense(n_in: int, n_out: int, axes, cfg: NetConfig, rngs: nnx.Rngs, scale: float = 1.0):
    # LeCun-normal: the layers' 0.02 default is a transformer's, too small for a SiLU stack.
    return Dense([n_in], [n_out], axes=axes, stddev=scale / math.sqrt(n_in),
                 dtype=jnp.dtype(cfg.dtype), rngs=rngs)


class ResBlock(nnx.Module):
    """`x + conv3x3(silu(conv3x3(silu(x))))`, the second conv zero-initialised (identity start)."""

    def __init__(self, channels: int, cfg: NetConfig, rngs: nnx.Rngs):
        kw = dict(dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.conv1 = Conv(channels, channels, 3, **kw)
        self.conv2 = Conv(channels, channels, 3, init=nnx.initializers.zeros, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.conv2(jax.nn.silu(self.conv1(jax.nn.silu(x))))


class ConvEncoder(nnx.Module):
    """`[batch, H, W, C]` (+ label embedding `[batch, label_dim]`) -> features `[batch, hidden]`."""

    def __init__(self, cfg: NetConfig, rngs: nnx.Rngs):
        h, w, c = cfg.shape
        kw = dict(dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.downs, self.blocks = nnx.List(), nnx.List()
        for ch, s in zip(cfg.channels, strides(cfg.shape, len(cfg.channels)), strict=True):
            self.downs.append(Conv(c, ch, 4 if s == 2 else 3, stride=s, **kw))
            self.blocks.append(nnx.List([ResBlock(ch, cfg, rngs) for _ in range(cfg.blocks)]))
            c, h, w = ch, h // s, w // s
        flat = h * w * c + (cfg.label_dim if cfg.num_classes else 0)
        self.hidden = _dense(flat, cfg.hidden, ("embed", "mlp"), cfg, rngs)

    def __call__(self, x: jax.Array, label_emb: jax.Array | None) -> jax.Array:
        for down, blocks in zip(self.downs, self.blocks, strict=True):
            x = jax.nn.silu(down(x))
            for block in blocks:
                x = block(x)
        x = x.reshape(x.shape[0], -1)
        if label_emb is not None:
            x = jnp.concatenate([x, label_emb.astype(x.dtype)], axis=-1)
        return jax.nn.silu(self.hidden(constrain(x, VECTOR)))


def depth_to_space(x: jax.Array, s: int) -> jax.Array:
    """`[batch, h, w, s*s*c] -> [batch, h*s, w*s, c]` (pixel shuffle)."""
    return einops.rearrange(x, "b h w (i j c) -> b (h i) (w j) c", i=s, j=s)


class ConvDecoder(nnx.Module):
    """z `[batch, latent]` (+ label embedding) -> likelihood parameters `[batch, H, W, out]`.

    Upsampling is a sub-pixel convolution (Shi et al. 2016: a 3x3 conv to `4 * width`
    channels at the low resolution, then a pixel shuffle), the same function class as a
    stride-2 transposed conv: XLA:CPU takes ~2 s for the kernel gradient of a 14 -> 28
    transposed conv at batch 128, ~0.05 s for this. The last stage maps straight to the
    likelihood parameters, so no convolution runs at full resolution.
    """

    def __init__(self, cfg: NetConfig, rngs: nnx.Rngs):
        h, w, _ = cfg.shape
        kw = dict(dtype=jnp.dtype(cfg.dtype), rngs=rngs)
        self.strides = tuple(strides(cfg.shape, len(cfg.channels))[::-1])  # lowest res. first
        for s in self.strides:
            h, w = h // s, w // s
        self.low = (h, w, cfg.channels[-1])
        z_in = cfg.latent_dim + (cfg.label_dim if cfg.num_classes else 0)
        self.hidden = _dense(z_in, cfg.hidden, (None, "mlp"), cfg, rngs)
        self.project = _dense(cfg.hidden, h * w * cfg.channels[-1], ("mlp", "embed"), cfg, rngs)
        # Stage i (from the lowest resolution): blocks at width channels[i], then a conv to the
        # next stage's width (the likelihood parameters after the last), upsampled by its stride.
        self.blocks, self.ups = nnx.List(), nnx.List()
        widths = cfg.channels[::-1]
        for ch, out, s in zip(widths, (*widths[1:], cfg.out_channels), self.strides,
                              strict=True):
            self.blocks.append(nnx.List([ResBlock(ch, cfg, rngs) for _ in range(cfg.blocks)]))
            self.ups.append(Conv(ch, out * s * s, 3, **kw))

    def __call__(self, z: jax.Array, label_emb: jax.Array | None) -> jax.Array:
        if label_emb is not None:
            z = jnp.concatenate([z, label_emb.astype(z.dtype)], axis=-1)
        h = jax.nn.silu(self.hidden(constrain(z, VECTOR)))
        x = self.project(h).reshape(z.shape[0], *self.low)
        for blocks, up, s in zip(self.blocks, self.ups, self.strides, strict=True):
            for block in blocks:
                x = block(x)
            x = depth_to_space(up(jax.nn.silu(x)), s)
        return x.astype(jnp.float32)


class MLP(nnx.Module):
    """`mlp_layers` SiLU layers of width `hidden`, then a linear map to `n_out`."""

    def __init__(self, n_in: int, n_out: int, cfg: NetConfig, rngs: nnx.Rngs):
        widths = [n_in] + [cfg.hidden] * cfg.mlp_layers
        self.layers = nnx.List([_dense(a, b, ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed"),
                                       cfg, rngs) for i, (a, b) in
                                enumerate(zip(widths[:-1], widths[1:], strict=True))])
        self.out = _dense(widths[-1], n_out, (None, None), cfg, rngs)

    def __call__(self, x: jax.Array, label_emb: jax.Array | None) -> jax.Array:
        if label_emb is not None:
            x = constrain(jnp.concatenate([x, label_emb.astype(x.dtype)], axis=-1), VECTOR)
        for layer in self.layers:
            x = jax.nn.silu(layer(x))
        return self.out(x).astype(jnp.float32)


class VAENets(nnx.Module):
    """Encoder q(z|x, y) and decoder p(x|z, y) networks.

    `encode(x [batch, *shape], labels) -> (mean, log_std)`, each `[batch, latent]`;
    `decode(z [batch, latent], labels) -> [batch, *shape[:-1], out_channels]` float32 (the raw
    likelihood parameters: logits, or means and log-scales); `log_scale` is the learned
    per-channel log-scale `[shape[-1]]` when `learned_scale`, else None.
    """

    def __init__(self, cfg: NetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        cond = cfg.label_dim if cfg.num_classes else 0
        self.label_embed = (param(rngs, nnx.initializers.normal(1.0),
                                  (cfg.num_classes, cfg.label_dim), ("vocab", "embed"),
                                  jnp.float32) if cfg.num_classes else None)
        if cfg.points:
            self.encoder = MLP(cfg.shape[0] + cond, 2 * cfg.latent_dim, cfg, rngs)
            self.head = None
            self.decoder = MLP(cfg.latent_dim + cond, cfg.out_channels, cfg, rngs)
        else:
            self.encoder = ConvEncoder(cfg, rngs)
            # A small head keeps the initial posterior near N(0, I): a small first KL.
            self.head = _dense(cfg.hidden, 2 * cfg.latent_dim, ("mlp", None), cfg, rngs,
                               scale=0.1)
            self.decoder = ConvDecoder(cfg, rngs)
        self.log_scale = (param(rngs, nnx.initializers.zeros, (cfg.shape[-1],), (None,),
                                jnp.float32) if cfg.learned_scale else None)

    def _embed(self, labels: jax.Array | None) -> jax.Array | None:
        if self.label_embed is None:
            return None
        return lookup(self.label_embed[...], labels)

    def encode(self, x: jax.Array, labels: jax.Array | None = None):
        h = self.encoder(x, self._embed(labels))
        if self.head is not None:
            h = self.head(h)
        mean, log_std = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, log_std

    def decode(self, z: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        return self.decoder(z, self._embed(labels))
