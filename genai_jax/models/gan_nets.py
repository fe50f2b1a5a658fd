"""The GAN's networks and the spectral normalisation of its discriminator.

Images `[batch, H, W, C]` in [-1, 1]. The discriminator is DCGAN's: a 3x3 convolution, then one
4x4 stride-2 convolution per level, each doubling the channels, LeakyReLU(0.2) after each; the
number of levels halves the side while it stays even and its half is >= 4 (8 -> 4 for the
digits, 28 -> 14 -> 7 for MNIST, 32 -> 16 -> 8 -> 4 for CIFAR-10). Its flattened features
`phi(x)` go to a linear head `psi`; class-conditional, it is a projection discriminator (Miyato &
Koyama 2018): `logit = psi(phi(x)) + <embed(y), phi(x)>`. The generator mirrors it: z (with a
learned label embedding concatenated when conditional) -> dense -> `[side, side, channels]` ->
one 2x upsampling per level, halving the channels -> 3x3 convolution -> tanh, with pixel norm
(per example, so the step stays a pure function of the batch; no BatchNorm statistics) and ReLU
in between.

The strided and transposed convolutions are written as space-to-depth + 2x2 convolution (D) and
2x2 convolution + depth-to-space (G, "sub-pixel" convolution): the same functions as a 4x4
stride-2 convolution (padded (0, 2) instead of (1, 1)) and its transpose, whose gradients, and
R1's gradient of a gradient, XLA:CPU runs 3-20x slower (measured on 2 CPU cores at 28x28).
2-D points (`shape == (dim,)`) use MLPs of the same roles instead, with a linear output.

Spectral normalisation divides each discriminator weight by its largest singular value,
estimated as `||W u||` with a unit vector `u` kept in the state as `SpectralVector`s (not
trained): `power_iteration` advances every `u` by one step, once per training step.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import einops
import jax
import jax.numpy as jnp
from flax import nnx

from genai_jax.nn.layers import IMAGE, Dense, lookup, matmul, param
from genai_jax.parallel import constrain, gathered


@dataclasses.dataclass(frozen=True)
class NetConfig:
    shape: tuple[int, ...]  # one example: (H, W, C) or (dim,)
    z_dim: int = 64
    g_channels: int = 32  # generator width at full resolution, doubled per level
    d_channels: int = 32  # discriminator width at full resolution, doubled per level
    hidden: int = 128  # MLP width (points)
    mlp_layers: int = 3  # hidden layers of each MLP (points)
    num_classes: int = 0  # > 0: class-conditional
    label_dim: int = 32  # the generator's label embedding
    g_norm: str = "pixelnorm"  # or "none"
    spectral_norm: bool = False

    @property
    def points(self) -> bool:
        return len(self.shape) == 1


def num_levels(shape: tuple[int, ...]) -> int:
    """How many times the image side halves: while it stays even and its half is >= 4."""
    h, w = shape[:2]
    levels = 0
    while h % 2 == 0 and w % 2 == 0 and min(h, w) // 2 >= 4:
        h, w, levels = h // 2, w // 2, levels + 1
    return levels


# --- spectral normalisation ---------------------------------------------------------------------


class SpectralVector(nnx.Variable):
    """The power-iteration vector `u` of a spectrally normalised weight: state, not a parameter."""


def _unit(v: jax.Array) -> jax.Array:
    return v * jax.lax.rsqrt(jnp.sum(v * v) + 1e-12)


def spectral_sigma(kernel: jax.Array, u: jax.Array) -> jax.Array:
    """The largest singular value of `kernel` seen as a matrix `[-1, out]`, estimated as `||W u||`
    for the unit vector `u [out]`; its gradient is Miyato et al.'s `v u^T` (u held constant)."""
    w = kernel.reshape(-1, kernel.shape[-1])
    return jnp.sqrt(jnp.sum(jnp.square(w @ jax.lax.stop_gradient(u))) + 1e-12)


def power_step(kernel: jax.Array, u: jax.Array) -> jax.Array:
    """One power iteration on `W^T W`: `u <- unit(W^T unit(W u))`."""
    w = kernel.reshape(-1, kernel.shape[-1])
    return _unit(w.T @ _unit(w @ u))


class Weight(nnx.Module):
    """A weight (kernel or embedding table), divided by its spectral norm when `u` is kept."""

    def __init__(self, shape, axes, init, *, spectral_norm: bool, rngs: nnx.Rngs):
        self.axes = tuple(axes)
        self.kernel = param(rngs, init, shape, axes, jnp.float32)
        self.u = (SpectralVector(_unit(jax.random.normal(rngs.params(), (shape[-1],))),
                                 out_sharding=(axes[-1],), eager_sharding=False)
                  if spectral_norm else None)

    def __call__(self) -> jax.Array:
        kernel = gathered(self.kernel[...], self.axes)
        return kernel if self.u is None else kernel / spectral_sigma(kernel, self.u[...])


def power_iteration(model: nnx.Module) -> None:
    """Advance every `SpectralVector` of `model` by one power step (in place: call on a module
    merged inside a pure function and read back `nnx.state(model, SpectralVector)`)."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, Weight) and node.u is not None:
            node.u[...] = power_step(node.kernel[...], node.u[...])


def space_to_depth(x: jax.Array) -> jax.Array:
    """`[b, 2h, 2w, c] -> [b, h, w, 4c]`: each 2x2 block of pixels becomes one pixel."""
    return einops.rearrange(x, "b (h p) (w q) c -> b h w (p q c)", p=2, q=2)


def depth_to_space(x: jax.Array) -> jax.Array:
    """`[b, h, w, 4c] -> [b, 2h, 2w, c]`, the inverse of `space_to_depth`."""
    return einops.rearrange(x, "b h w (p q c) -> b (h p) (w q) c", p=2, q=2)


def conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Stride-1 "SAME" convolution, `[b, h, w, c_in] * [k, k, c_in, c_out] -> [b, h, w, c_out]`,
    as one matmul over the k*k shifted copies of x (im2col). XLA:CPU computes the kernel gradient
    of `lax.conv_general_dilated` slowly, and inside the trainer's `lax.scan` about 200x slower
    than this (1.66 s vs 7.6 ms for a 2x2 128->64 conv on 64 8x8 images, 2 CPU cores)."""
    k, b, h, w = kernel.shape[0], *x.shape[:3]
    lo, hi = (k - 1) // 2, k // 2  # XLA's "SAME" padding
    padded = jnp.pad(x, ((0, 0), (lo, hi), (lo, hi), (0, 0)))
    patches = jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(k) for j in range(k)],
                              axis=-1)
    y = matmul(patches.reshape(b * h * w, -1), kernel.reshape(-1, kernel.shape[-1]))
    return y.reshape(b, h, w, -1)


class Conv(nnx.Module):
    """Stride-1 convolution (NHWC, kernel `[k, k, c_in, c_out]`), spectral-normalisable;
    `downsample=True` applies it after `space_to_depth` (then `c_in` counts the 4x channels)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, *, downsample: bool = False,
                 spectral_norm: bool = False, rngs: nnx.Rngs):
        self.downsample = downsample
        self.weight = Weight((kernel_size, kernel_size, c_in, c_out),
                             (None, None, "conv_in", "conv_out"), nnx.initializers.lecun_normal(),
                             spectral_norm=spectral_norm, rngs=rngs)
        self.bias = param(rngs, nnx.initializers.zeros, (c_out,), ("conv_out",), jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample:
            x = space_to_depth(x)
        return constrain(conv(x, self.weight()) + self.bias[...], IMAGE)


class DDense(nnx.Module):
    """The discriminator's dense layer `[in, out]`, spectral-normalisable."""

    def __init__(self, d_in: int, d_out: int, axes, *, spectral_norm: bool, rngs: nnx.Rngs):
        self.weight = Weight((d_in, d_out), axes, nnx.initializers.lecun_normal(),
                             spectral_norm=spectral_norm, rngs=rngs)
        self.bias = param(rngs, nnx.initializers.zeros, (d_out,), axes[1:], jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return matmul(x, self.weight()) + self.bias[...]


# --- discriminator ------------------------------------------------------------------------------


class Discriminator(nnx.Module):
    """`(x [batch, *shape] in model range, labels int32 [batch]) -> logits [batch]`."""

    def __init__(self, cfg: NetConfig, *, rngs: nnx.Rngs):
        sn = dict(spectral_norm=cfg.spectral_norm, rngs=rngs)
        if cfg.points:
            widths = [cfg.shape[0]] + [cfg.hidden] * cfg.mlp_layers
            self.layers = nnx.List([DDense(a, b, ("embed", "mlp"), **sn)
                                    for a, b in itertools.pairwise(widths)])
            features = cfg.hidden
        else:
            h, w, c = cfg.shape
            levels = num_levels(cfg.shape)
            widths = [cfg.d_channels * 2 ** i for i in range(levels + 1)]
            self.layers = nnx.List([Conv(c, widths[0], 3, **sn)] + [
                Conv(4 * a, b, 2, downsample=True, **sn) for a, b in itertools.pairwise(widths)])
            features = (h >> levels) * (w >> levels) * widths[-1]
        self.head = DDense(features, 1, ("embed", None), **sn)  # psi
        # Projection: <embed(y), phi(x)>, one feature vector per class.
        self.embed = (Weight((cfg.num_classes, features), ("vocab", "embed"),
                             nnx.initializers.normal(1.0 / math.sqrt(features)), **sn)
                      if cfg.num_classes else None)

    def features(self, x: jax.Array) -> jax.Array:
        """`phi(x)`: `[batch, features]`."""
        h = x
        for layer in self.layers:
            h = jax.nn.leaky_relu(layer(h), 0.2)
        return constrain(h.reshape(h.shape[0], -1), ("batch", None))

    def __call__(self, x: jax.Array, labels: jax.Array) -> jax.Array:
        phi = self.features(x)
        logits = self.head(phi)[:, 0]
        if self.embed is not None:
            logits = logits + jnp.sum(lookup(self.embed(), labels) * phi, axis=-1)
        return logits


# --- generator ----------------------------------------------------------------------------------


def make_generator(cfg: NetConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """`(z [batch, z_dim], labels int32 [batch]) -> x [batch, *shape]`: convolutional (tanh
    range) for images, an MLP (linear output) for points."""
    return MLPGenerator(cfg, rngs=rngs) if cfg.points else ConvGenerator(cfg, rngs=rngs)


class LabelledLatent(nnx.Module):
    """z with a learned embedding of its label concatenated (class-conditional), or z alone."""

    def __init__(self, cfg: NetConfig, *, rngs: nnx.Rngs):
        self.table = (param(rngs, nnx.initializers.normal(1.0), (cfg.num_classes, cfg.label_dim),
                            ("vocab", "embed"), jnp.float32) if cfg.num_classes else None)
        self.dim = cfg.z_dim + (cfg.label_dim if cfg.num_classes else 0)

    def __call__(self, z: jax.Array, labels: jax.Array) -> jax.Array:
        if self.table is None:
            return z
        return jnp.concatenate([z, lookup(self.table[...], labels)], axis=-1)


class ConvGenerator(nnx.Module):
    def __init__(self, cfg: NetConfig, *, rngs: nnx.Rngs):
        h, w, c = cfg.shape
        levels = num_levels(cfg.shape)
        widths = [cfg.g_channels * 2 ** i for i in range(levels, -1, -1)]  # coarse -> fine
        self.latent = LabelledLatent(cfg, rngs=rngs)
        self.project = Dense([self.latent.dim], [h >> levels, w >> levels, widths[0]],
                             axes=("embed", None, None, "conv_out"),
                             stddev=1.0 / math.sqrt(self.latent.dim), rngs=rngs)
        # Each upsampling: a 2x2 conv to 4x the channels, then depth_to_space.
        self.ups = nnx.List([Conv(a, 4 * b, 2, rngs=rngs) for a, b in itertools.pairwise(widths)])
        self.out = Conv(widths[-1], c, 3, rngs=rngs)
        self.pixel_norm = cfg.g_norm == "pixelnorm"

    def __call__(self, z: jax.Array, labels: jax.Array) -> jax.Array:
        h = constrain(self.project(self.latent(z, labels)), IMAGE)  # [batch, side, side, width]
        h = self._activate(h)
        for up in self.ups:
            h = self._activate(depth_to_space(up(h)))  # twice the side, half the width
        return jnp.tanh(self.out(h))

    def _activate(self, h: jax.Array) -> jax.Array:
        return jax.nn.relu(pixel_norm(h) if self.pixel_norm else h)


class MLPGenerator(nnx.Module):
    def __init__(self, cfg: NetConfig, *, rngs: nnx.Rngs):
        self.latent = LabelledLatent(cfg, rngs=rngs)
        widths = [self.latent.dim] + [cfg.hidden] * cfg.mlp_layers
        self.layers = nnx.List([Dense([a], [b], axes=("embed", "mlp"), stddev=1 / math.sqrt(a),
                                      rngs=rngs) for a, b in itertools.pairwise(widths)])
        self.out = Dense([cfg.hidden], [cfg.shape[0]], axes=("mlp", "embed"),
                         stddev=1 / math.sqrt(cfg.hidden), rngs=rngs)

    def __call__(self, z: jax.Array, labels: jax.Array) -> jax.Array:
        h = self.latent(z, labels)
        for layer in self.layers:
            h = jax.nn.relu(layer(h))
        return self.out(h)


def pixel_norm(h: jax.Array) -> jax.Array:
    """Each pixel's feature vector scaled to unit RMS (Karras et al. 2018): a per-example
    normalisation (no batch statistics to carry) and, on XLA:CPU, cheaper than GroupNorm."""
    return h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + 1e-8)
