"""Small Flax NNX layers whose every parameter carries logical axis names.

The names (`embed`, `mlp`, `heads`, `kv`, `vocab`, ...) are mapped to mesh axes by the one
rules table in `genai_jax.parallel.sharding`; the layers themselves know nothing of meshes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.custom_derivatives import SymbolicZero

from genai_jax.parallel import constrain, gathered

# Activation rematerialisation (`model.remat`): what the backward pass keeps from the forward
# pass instead of recomputing it.
REMAT_POLICIES = {
    "none": None,  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's inputs
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def rematerialized(fn, policy: str):
    """`fn(modules, *arrays)` with its activations recomputed in the backward pass as the named
    policy says (`"none"`: `fn` itself)."""
    return fn if REMAT_POLICIES[policy] is None else nnx.remat(fn, policy=REMAT_POLICIES[policy])


# Activations of image models under a mesh, `[batch, height, width, channels]` and
# `[batch, features]`: split over the batch only (FSDP all-gathers the weights instead).
IMAGE, VECTOR = ("batch", None, None, None), ("batch", None)

Initializer = nnx.initializers.Initializer


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype: jnp.dtype) -> nnx.Param:
    """A parameter annotated with logical axis names (one per dimension)."""
    assert len(axes) == len(shape), (shape, axes)
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(axes),
                     eager_sharding=False)


def _tangent_transposing(grads, y: jax.Array, tangents) -> jax.Array:
    """The tangent `dy` of an op `y = f(*args)` that is linear in each argument, written as the
    transpose of `grads` (`dy -> (d arg, ...)`, the op's hand-written backward pass).

    An op defined by its forward-mode derivative (`jax.custom_jvp`) supports `jax.jvp`,
    `jax.jacfwd` and Hessian-vector products, and reverse mode obtains its gradient by
    transposing the tangent map. Writing that map as the transpose of `grads` makes the
    transpose `grads` itself, so reverse mode runs exactly the backward pass chosen for
    XLA:CPU (the compiled training steps are the same HLO as with a `custom_vjp`). Zero
    (`SymbolicZero`) tangents are skipped, e.g. the data input of a first layer.
    """
    aval = jax.ShapeDtypeStruct(y.shape, y.dtype)
    terms = [jax.linear_transpose(lambda dy, i=i: grads(dy)[i], aval)(t)[0]
             for i, t in enumerate(tangents) if not isinstance(t, SymbolicZero)]
    return functools.reduce(jnp.add, terms)


@jax.custom_jvp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w` for `x [m, k]`, `w [k, n]`, with a backward pass that XLA's CPU backend runs well.

    Autodiff computes `dW = X^T dY`, for which XLA:CPU transposes dY and fuses the whole
    elementwise backward chain into that strided copy (the largest cost of a small GPT step on
    CPU). Computing `dW^T = dY^T X` and transposing the small result instead is the same math;
    a stand-alone study of the lm_char GPT on 2 CPU cores measured 67 -> 49 ms per step.
    Forward mode works too (see `_tangent_transposing`).
    """
    return x @ w


def _matmul_grads(x, w, dy):
    """(dx, dw) of `x @ w` for the output gradient dy, dw computed as `(dY^T X)^T`."""
    dw_t = jax.lax.dot_general(dy, x, (((0,), (0,)), ((), ())))  # [n, k]
    return (dy @ w.T).astype(x.dtype), dw_t.T.astype(w.dtype)


@functools.partial(matmul.defjvp, symbolic_zeros=True)
def _matmul_jvp(primals, tangents):
    x, w = primals
    y = x @ w
    return y, _tangent_transposing(functools.partial(_matmul_grads, x, w), y, tangents)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, written out: `jax.nn.gelu(approximate=False)` lowers through erfc with
    two exp branches, about 3x slower on XLA:CPU for the same values."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


class LoRAParam(nnx.Param):
    """A low-rank adapter's parameter (`Dense(..., lora=...)`): what a LoRA run trains, the
    other `nnx.Param`s staying frozen (select with `nnx.state(model, LoRAParam)`)."""


@dataclasses.dataclass(frozen=True)
class LoRA:
    """A low-rank adapter on a Dense layer (Hu et al., 2021): `y = x W + (alpha / rank) *
    dropout(x) A B`, A `[in, rank]` drawn like PEFT's (uniform, +-1/sqrt(in)), B `[rank, out]`
    zero, so training starts from the base model exactly."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class Dense(nnx.Module):
    """`y = x @ kernel (+ bias)`, contracting the last `len(in_shape)` axes of x.

    The kernel is `[*in_shape, *out_shape]`, so attention projections keep their head axes
    (`[embed, heads, head_dim]`) and can be split over `tensor` without reshapes. With `lora`,
    a low-rank adapter `lora_a [prod(in), rank]`, `lora_b [rank, prod(out)]` (`LoRAParam`s,
    always float32) adds its product.
    """

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], *,
                 axes: Sequence[str | None], use_bias: bool = True, stddev: float = 0.02,
                 lora: LoRA | None = None, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        self.n_in, self.axes = len(in_shape), tuple(axes)
        self.dtype = dtype
        self.kernel = param(rngs, nnx.initializers.normal(stddev), in_shape + out_shape, axes,
                            param_dtype)
        self.bias = (param(rngs, nnx.initializers.zeros, out_shape, axes[self.n_in:], param_dtype)
                     if use_bias else None)
        self.lora = lora
        if lora is not None:
            n_in, n_out = math.prod(in_shape), math.prod(out_shape)
            # Sharded like the kernel's first in-axis / last out-axis when there is one of each.
            a_axes = (axes[0] if self.n_in == 1 else None, None)
            b_axes = (None, axes[-1] if len(out_shape) == 1 else None)
            init_a = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
            self.lora_a = LoRAParam(init_a(rngs.params(), (n_in, lora.rank), jnp.float32),
                                    out_sharding=a_axes, eager_sharding=False)
            self.lora_b = LoRAParam(jnp.zeros((lora.rank, n_out), jnp.float32),
                                    out_sharding=b_axes, eager_sharding=False)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """`rng`: the adapter's dropout key (None: no dropout)."""
        kernel = gathered(self.kernel[...], self.axes).astype(self.dtype)
        batch_shape, out_shape = x.shape[:x.ndim - self.n_in], kernel.shape[self.n_in:]
        x2 = x.astype(self.dtype).reshape(-1, math.prod(kernel.shape[:self.n_in]))
        y = matmul(x2, kernel.reshape(x2.shape[1], -1))
        if self.lora is not None:
            h = x2
            if rng is not None and self.lora.dropout > 0:
                keep = jax.random.bernoulli(rng, 1.0 - self.lora.dropout, h.shape)
                h = jnp.where(keep, h / (1.0 - self.lora.dropout), 0).astype(h.dtype)
            a = self.lora_a[...].astype(self.dtype)
            b = (self.lora_b[...] * self.lora.scale).astype(self.dtype)
            y = y + matmul(matmul(h, a), b)
        y = y.reshape(*batch_shape, *out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y

    def merged_kernel(self) -> jax.Array:
        """The kernel with the adapter's product folded in (in the kernel's dtype)."""
        kernel = self.kernel[...]
        if self.lora is None:
            return kernel
        delta = (self.lora_a[...] @ self.lora_b[...]) * self.lora.scale
        return (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)


def lookup(table: jax.Array, ids: jax.Array, axes=("vocab", "embed")) -> jax.Array:
    """`table[ids]` for an embedding table with logical `axes`, read `gathered` like every
    weight (FSDP splits the batch instead, and a lookup cannot keep both splits)."""
    return jnp.take(gathered(table, axes), ids, axis=0)


class Embed(nnx.Module):
    """Token embedding `[vocab, embed]`; `attend` reuses it as the output projection (tying)."""

    def __init__(self, vocab: int, dim: int, *, stddev: float = 0.02, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = param(rngs, nnx.initializers.normal(stddev), (vocab, dim),
                               ("vocab", "embed"), param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return lookup(self.embedding[...], tokens).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return x @ gathered(self.embedding[...], ("vocab", "embed")).astype(self.dtype).T


class LayerNorm(nnx.Module):
    """LayerNorm (or RMSNorm with `rms=True`), statistics in float32."""

    def __init__(self, dim: int, *, rms: bool = False, use_bias: bool = True, eps: float = 1e-5,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.rms, self.eps, self.dtype = rms, eps, dtype
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)
        self.bias = (param(rngs, nnx.initializers.zeros, (dim,), ("embed",), param_dtype)
                     if use_bias and not rms else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.rms:
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
        else:
            mean = jnp.mean(x32, -1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y.astype(self.dtype)


def _fold(rng: jax.Array | None, i: int) -> jax.Array | None:
    return None if rng is None else jax.random.fold_in(rng, i)


class MLP(nnx.Module):
    """Transformer feed-forward block: GELU (`x W1 -> gelu -> W2`; `kind="gelu_tanh"`: GPT-2's
    tanh approximation) or SwiGLU. `lora` adapts the projections named in `lora_targets`
    ("up", "gate", "down")."""

    def __init__(self, dim: int, hidden: int, *, kind: str = "gelu", use_bias: bool = True,
                 out_stddev: float = 0.02, lora: LoRA | None = None,
                 lora_targets: Sequence[str] = (), dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        adapt = lambda name: lora if name in lora_targets else None
        self.kind = kind
        self.up = Dense([dim], [hidden], axes=("embed", "mlp"), lora=adapt("up"), **kw)
        self.gate = (Dense([dim], [hidden], axes=("embed", "mlp"), lora=adapt("gate"), **kw)
                     if kind == "swiglu" else None)
        self.down = Dense([hidden], [dim], axes=("mlp", "embed"), stddev=out_stddev,
                          lora=adapt("down"), **kw)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """`rng`: the adapters' dropout key (None: none)."""
        if self.kind == "swiglu":
            h = jax.nn.silu(self.gate(x, _fold(rng, 0))) * self.up(x, _fold(rng, 1))
        elif self.kind == "gelu_tanh":
            h = jax.nn.gelu(self.up(x, _fold(rng, 1)), approximate=True)
        else:
            h = gelu(self.up(x, _fold(rng, 1)))
        # Tensor parallelism: the hidden layer stays split over `mlp` between the two matmuls.
        h = constrain(h, ("batch",) + (None,) * (h.ndim - 2) + ("mlp",))
        return self.down(h, _fold(rng, 2))


@functools.lru_cache(maxsize=64)
def rope_frequencies(head_dim: int, theta: float = 10_000.0, scaling: str = "none", *,
                     factor: float = 1.0, low_freq_factor: float = 1.0,
                     high_freq_factor: float = 4.0, original_context: int = 8192
                     ) -> tuple[float, ...]:
    """The `head_dim / 2` rotary angular frequencies `theta ** (-2i / head_dim)`, optionally
    scaled for a longer context: `"linear"` divides them all by `factor` (position
    interpolation); `"llama3"` divides only the low frequencies (wavelengths above
    `original_context / low_freq_factor`), keeps the high ones (below
    `original_context / high_freq_factor`) and blends the band between, as Llama 3.1 does."""
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling == "linear":
        inv = inv / factor
    elif scaling == "llama3":
        wavelength = 2 * np.pi / inv
        smooth = (original_context / wavelength - low_freq_factor) / (
            high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where(wavelength > original_context / low_freq_factor, inv / factor,
                       np.where(wavelength < original_context / high_freq_factor, inv, blended))
    elif scaling != "none":
        raise ValueError(f"rope scaling {scaling!r} is not one of 'none', 'linear', 'llama3'")
    # float32 first, as the published implementations compute them: the angles then agree.
    return tuple(float(f) for f in inv.astype(np.float32))


@functools.lru_cache(maxsize=64)
def _rotary_table(frequencies: tuple[float, ...], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(sin, cos) `[length, half]` of the float32 angles `position * frequency` for positions
    0..length-1, evaluated in float64 and rounded to float32 (within 2e-6 of the device's
    float32 sin/cos: tests/test_model.py)."""
    angles = np.arange(length, dtype=np.float32)[:, None] * np.asarray(frequencies, np.float32)
    return np.sin(angles.astype(np.float64)).astype(np.float32), np.cos(
        angles.astype(np.float64)).astype(np.float32)


def rotary(x: jax.Array, positions: jax.Array | None,
           frequencies: tuple[float, ...] | None = None) -> jax.Array:
    """Rotary position embedding (rotate-half convention: dimension `i` pairs with
    `i + head_dim / 2`, the layout of Hugging Face Llama checkpoints).

    Args:
      x: `[batch, seq, heads, head_dim]`, head_dim even.
      positions: `[batch, seq]` integer positions, or None for `0..seq-1` in every row.
      frequencies: `head_dim / 2` angular frequencies (`rope_frequencies`); default base 10^4.
    """
    frequencies = tuple(frequencies or rope_frequencies(x.shape[-1]))
    if positions is None:
        # A constant table: computed on the device, sin and cos are fused into their
        # consumers and XLA:CPU evaluates them again for every head and both halves of x,
        # forward and backward (~4% of a width-512 Llama's training step on 2 cores).
        sin, cos = (jnp.asarray(t)[None, :, None, :]
                    for t in _rotary_table(frequencies, x.shape[1]))
    else:
        angles = positions[..., None].astype(jnp.float32) * jnp.asarray(frequencies, jnp.float32)
        sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


_DIMS = ("NHWC", "HWIO", "NHWC")


def _same_padding(size: int, k: int, stride: int) -> tuple[int, tuple[int, int]]:
    """Output size and (low, high) padding of a "SAME" convolution along one axis (XLA's)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return out, (total // 2, total - total // 2)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def conv2d(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """"SAME" convolution of NHWC `x` with an HWIO kernel `w`, with a backward pass that XLA:CPU
    runs well inside `lax.scan` (the trainer's `train.steps_per_call` loop).

    Inside a while loop XLA:CPU runs autodiff's kernel-gradient convolution 15-100x slower
    than outside (1.1 s instead of 16 ms for a 14x14, 32 -> 64, stride-2 conv at batch 128 on
    2 cores); written as an ordinary convolution of the transposed input with the transposed
    output gradient it takes ~7 ms in both places. Same values as autodiff (tests/test_model.py);
    forward mode works too (see `_tangent_transposing`), at a price: its kernel tangent is the
    transpose of that convolution, which XLA:CPU runs like autodiff's kernel gradient (`jax.jvp`
    in the kernel of the conv above, 2 cores: 12 ms against 7 ms for `lax.conv`, and 156 ms
    against 7 ms for four of them in a `lax.scan`).
    """
    return jax.lax.conv_general_dilated(x, w, (stride,) * 2, "SAME", dimension_numbers=_DIMS)


def _conv2d_grads(x, w, stride, dy):
    """(dx, dw) of `conv2d(x, w, stride)` for the output gradient dy, both as plain convolutions."""
    k = w.shape[0]
    (oh, ph), (ow, pw) = (_same_padding(x.shape[i], k, stride) for i in (1, 2))
    # dx: dy dilated by the stride, correlated with the flipped kernel (in/out swapped).
    flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    pad = [(k - 1 - p[0], n - 1 + p[0] - (o - 1) * stride)
           for p, n, o in ((ph, x.shape[1], oh), (pw, x.shape[2], ow))]
    dx = jax.lax.conv_general_dilated(dy, flipped, (1, 1), pad, lhs_dilation=(stride,) * 2,
                                      dimension_numbers=_DIMS)
    # dW[i, j, c, o] = sum_{n,h,w} x[n, h*s + i, w*s + j, c] dy[n, h, w, o]: a convolution with
    # channels as the batch and the batch as the features, dy dilated by the stride.
    dw = jax.lax.conv_general_dilated(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1),
                                      (ph, pw), rhs_dilation=(stride,) * 2,
                                      dimension_numbers=_DIMS)
    return dx.astype(x.dtype), dw[:, :k, :k, :].transpose(1, 2, 0, 3).astype(w.dtype)


@functools.partial(conv2d.defjvp, symbolic_zeros=True)
def _conv2d_jvp(stride, primals, tangents):
    x, w = primals
    y = conv2d(x, w, stride)
    return y, _tangent_transposing(functools.partial(_conv2d_grads, x, w, stride), y, tangents)


class Conv(nnx.Module):
    """2-D convolution on NHWC images, kernel `[kh, kw, in, out]` named
    `(None, None, "conv_in", "conv_out")`; `transpose=True` is the transposed convolution
    (fractionally strided, `stride` times larger output with "SAME" padding)."""

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, *,
                 stride: int = 1, padding: str = "SAME", transpose: bool = False,
                 use_bias: bool = True, init: Initializer | None = None, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.stride, self.padding, self.transpose, self.dtype = stride, padding, transpose, dtype
        init = init or nnx.initializers.lecun_normal()
        self.axes = (None, None, "conv_in", "conv_out")
        self.kernel = param(rngs, init, (kernel_size, kernel_size, in_features, out_features),
                            self.axes, param_dtype)
        self.bias = (param(rngs, nnx.initializers.zeros, (out_features,), ("conv_out",),
                           param_dtype) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = gathered(self.kernel[...], self.axes).astype(self.dtype)
        if self.transpose:
            y = jax.lax.conv_transpose(x, kernel, (self.stride,) * 2, self.padding,
                                       dimension_numbers=_DIMS)
        elif self.padding == "SAME":
            y = conv2d(x, kernel, self.stride)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (self.stride,) * 2, self.padding,
                                             dimension_numbers=_DIMS)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return constrain(y, IMAGE)


class GroupNorm(nnx.Module):
    """GroupNorm over the last (channel) axis of NHWC activations, statistics in float32
    (`groups=1` normalises over H, W and C together). Parameters named `("conv_out",)`."""

    def __init__(self, channels: int, groups: int = 32, *, eps: float = 1e-5,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if channels % groups:
            raise ValueError(f"GroupNorm: groups={groups} must divide channels={channels}")
        self.groups, self.eps, self.dtype = groups, eps, dtype
        self.scale = param(rngs, nnx.initializers.ones, (channels,), ("conv_out",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (channels,), ("conv_out",), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        *lead, c = x.shape
        g = x.astype(jnp.float32).reshape(lead[0], -1, self.groups, c // self.groups)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)
