"""Forward-mode differentiation on the default (XLA) path: `jax.jvp` and Hessian-vector products
of every family's loss against finite differences, `jax.jacfwd` of the CPU-tuned layers, and
the Pallas kernels' one-line refusal.

Tolerances. The models compute in float32 (no config allows float64), so the finite differences
are float32 too: a central difference with step h errs by O(h^2) (truncation) plus
O(eps_f32 |f| / h) (rounding). Measured on these models, h = 1e-2 for the loss and h = 3e-3 for
its gradient keep both below 6e-4 relative (the Hessian-vector product's error taken in the
2-norm), so a tolerance of 5e-3 leaves about 10x margin while a missing or wrong tangent term
is off by order one. Forward mode is also checked against reverse mode, jvp = <grad, v>, which
differ only by float32 rounding (measured <= 5e-7 relative; tolerance 1e-5).

The GAN's ReLU and leaky ReLU make its loss piecewise linear: a central difference that crosses
a kink is no derivative (measured 7-30% off at every h), so its finite-difference checks swap in
a smoothed ReLU, softplus(8x)/8; the convolutions, matmuls and losses are the model's own, and
with the real activations forward mode is still checked against reverse mode.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from genai_jax import data, models
from genai_jax.models.gan import GANState
from genai_jax.nn.layers import conv2d, matmul
from tests.conftest import overridden

RTOL_FD, RTOL_REVERSE = 5e-3, 1e-5
SMALL = {  # the experiment configs on small shapes, for fast compiles
    "lm": {"model.num_layers": 2, "model.embed_dim": 32, "model.num_heads": 2,
           "model.block_size": 16},
    "vae": {"eval.iw_samples": 2, "eval.iw_chunk": 2},
    "gan": {},
    "diffusion": {"model.channels": 16, "model.num_res_blocks": 1},
}
CONFIGS = {"lm": "lm_char", "vae": "vae_digits", "gan": "gan_digits",
           "diffusion": "diffusion_digits"}


@pytest.fixture(scope="module", autouse=True)
def fast_init_compiles():
    """The partitionable threefry compiles parameter initialisers 3-5x slower on XLA:CPU; these
    tests do not shard and depend on no particular random values (as in tests/test_vae.py)."""
    previous = jax.config.jax_threefry_partitionable
    jax.config.update("jax_threefry_partitionable", False)
    yield
    jax.config.update("jax_threefry_partitionable", previous)


def family_loss(family: str, text_file):
    """(params, loss): a freshly initialised family's evaluation loss as a function of all its
    parameters (both networks of a GAN), on a fixed batch of 4."""
    overrides = {**SMALL[family], "train.batch_size": 4, "eval.batch_size": 4}
    if family == "lm":
        overrides["data.path"] = str(text_file)
    config = overridden(importlib.import_module(f"experiments.configs.{CONFIGS[family]}")
                        .get_config(), overrides)
    info = data.build(config, models.modality(config.model.family), None).info
    built = models.build(config, info)
    state = jax.jit(built.init)(jax.random.PRNGKey(0))
    if family == "lm":
        tokens = np.arange(5 * 17).reshape(5, 17) % 20
        batch = {"inputs": tokens[:4, :16], "targets": tokens[:4, 1:]}
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        # an evaluation batch: `index` is each example's place in the held-out split
        batch = {"x": np.round(digits.images[:4] * (255 / 16)).astype(np.uint8)[..., None],
                 "label": digits.target[:4].astype(np.int32),
                 "index": np.arange(4, dtype=np.int32)}
    if isinstance(state, GANState):
        return ((state.g_params, state.d_params),
                lambda p: built.eval_step(state.replace(g_params=p[0], d_params=p[1]),
                                          batch)["loss"])
    return state.params, lambda p: built.eval_step(state.replace(params=p, ema=None),
                                                   batch)["loss"]


def direction(params):
    """A random direction, each leaf scaled like the parameter it moves (1e-2 for zeros)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape, x.dtype) * (jnp.std(x) + 1e-2)
                                     for k, x in zip(keys, leaves, strict=True)])


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def smooth_relu(monkeypatch):
    """ReLU and leaky ReLU as softplus(8x)/8 (and its leaky mix): twice differentiable."""
    soft = lambda x: jax.nn.softplus(8.0 * x) / 8.0
    monkeypatch.setattr(jax.nn, "relu", soft)
    monkeypatch.setattr(jax.nn, "leaky_relu",
                        lambda x, negative_slope=0.01: negative_slope * x
                        + (1.0 - negative_slope) * soft(x))


def forward_and_reverse(loss, params, v):
    """jvp along v, <grad, v>, and the Hessian-vector product (forward over reverse)."""
    jvp = jax.jit(lambda p, v: jax.jvp(loss, (p,), (v,))[1])(params, v)
    grad = jax.jit(jax.grad(loss))(params)
    hvp = jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])(params, v)
    return float(jvp), float(np.dot(flat(grad), flat(v))), flat(hvp)


def check_against_finite_differences(loss, params, v, jvp, hvp):
    value_and_grad = jax.jit(jax.value_and_grad(loss))
    at = lambda h: value_and_grad(jax.tree.map(lambda p, d: p + h * d, params, v))
    (up, _), (down, _) = at(1e-2), at(-1e-2)
    fd_jvp = (float(up) - float(down)) / 2e-2
    (_, g_up), (_, g_down) = at(3e-3), at(-3e-3)
    fd_hvp = (flat(g_up) - flat(g_down)) / 6e-3
    assert abs(jvp - fd_jvp) <= RTOL_FD * abs(fd_jvp), (jvp, fd_jvp)
    assert np.linalg.norm(hvp - fd_hvp) <= RTOL_FD * np.linalg.norm(fd_hvp)


@pytest.mark.parametrize("family", ["lm", "vae", "diffusion"])
def test_jvp_and_hessian_vector_product_equal_finite_differences(family, text_file):
    params, loss = family_loss(family, text_file)
    v = direction(params)
    jvp, reverse, hvp = forward_and_reverse(loss, params, v)
    assert abs(jvp - reverse) <= RTOL_REVERSE * abs(reverse), (jvp, reverse)
    check_against_finite_differences(loss, params, v, jvp, hvp)


def test_gan_forward_mode(text_file, monkeypatch):
    params, loss = family_loss("gan", text_file)
    v = direction(params)
    jvp, reverse, _ = forward_and_reverse(loss, params, v)  # the real, kinked activations
    assert abs(jvp - reverse) <= RTOL_REVERSE * abs(reverse), (jvp, reverse)
    smooth_relu(monkeypatch)
    jvp, reverse, hvp = forward_and_reverse(loss, params, v)
    check_against_finite_differences(loss, params, v, jvp, hvp)


def test_jacfwd_of_matmul_equals_plain_autodiff():
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x, w = jax.random.normal(kx, (3, 4)), jax.random.normal(kw, (4, 2))
    ours = jax.jacfwd(lambda x, w: jnp.tanh(matmul(x, w)), argnums=(0, 1))(x, w)
    plain = jax.jacrev(lambda x, w: jnp.tanh(x @ w), argnums=(0, 1))(x, w)
    for a, b in zip(ours, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Per-example tangents (vmap of jvp) batch too.
    per_row = jax.vmap(lambda r: jax.jvp(lambda w: matmul(r[None], w), (w,), (w,))[1])(x)
    np.testing.assert_allclose(per_row[:, 0], x @ w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stride", [1, 2])
def test_jacfwd_of_conv2d_equals_plain_autodiff(stride):
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x, w = jax.random.normal(kx, (2, 5, 5, 2)), jax.random.normal(kw, (3, 3, 2, 3))
    reference = lambda x, w: jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = jax.jacfwd(lambda x, w: jnp.sin(conv2d(x, w, stride)), argnums=(0, 1))(x, w)
    plain = jax.jacrev(lambda x, w: jnp.sin(reference(x, w)), argnums=(0, 1))(x, w)
    for a, b in zip(ours, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _flash(q):
    return jnp.sum(pallas_kernels.flash_attention(q, q, q, causal=True) ** 2)


def _group_norm(x):
    ones, zeros = jnp.ones(x.shape[-1]), jnp.zeros((x.shape[0], x.shape[-1]))
    return jnp.sum(pallas_kernels.group_norm_modulate_silu(x, ones, ones * 0, zeros, zeros,
                                                           groups=2) ** 2)


@pytest.mark.parametrize("name,kernel,shape", [
    ("flash_attention", _flash, (1, 16, 2, 8)),
    ("group_norm_modulate_silu", _group_norm, (2, 4, 4, 4))])
def test_pallas_kernels_refuse_forward_mode_with_one_line(name, kernel, shape):
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    assert jax.grad(kernel)(x).shape == shape  # first-order reverse mode works
    for derivative in (lambda: jax.jvp(kernel, (x,), (x,)),
                       lambda: jax.jacfwd(kernel)(x),
                       lambda: jax.jvp(jax.grad(kernel), (x,), (x,)),  # Hessian-vector product
                       lambda: jax.grad(lambda x: jnp.sum(jax.grad(kernel)(x) ** 2))(x)):
        with pytest.raises(TypeError) as error:
            derivative()
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"pallas_kernels.{name} has no "
                                                           "forward-mode or second-order")
    # Under jit the tangent is computed only when lowering, where JAX raises its own line.
    with pytest.raises(TypeError, match="forward-mode autodiff"):
        jax.jit(lambda x: jax.jvp(kernel, (x,), (x,)))(x)
