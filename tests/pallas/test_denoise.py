"""The denoising kernels against their pure-jnp references (interpret and tpu_interpret).

group_norm_modulate_silu: forward and the custom-VJP gradients of all five inputs.
sampler_step: every parameterization, clipping, guidance, DDPM / DDIM(eta) coefficients, and
whole 20-step trajectories; the coefficient helpers against values derived by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pallas_testing import BF16_U, assert_close_f32

from pallas_kernels import (
    SamplerCoefficients,
    ddim_coefficients,
    ddpm_coefficients,
    group_norm_modulate_silu,
    linear_alpha_bars,
    reference,
    sampler_step,
)

GN_NAMES = ("out", "dx", "dgamma", "dbeta", "dscale", "dshift")


def _gn_inputs(seed, batch, height, width, channels, dtype=jnp.float32):
    """x (offset and scaled, so the statistics matter), gamma, beta, scale, shift, dout."""
    ks = jax.random.split(jax.random.key(seed), 6)
    x = 3.0 * jax.random.normal(ks[0], (batch, height, width, channels)) + 1.5
    gamma = 1.0 + 0.2 * jax.random.normal(ks[1], (channels,))
    beta = 0.2 * jax.random.normal(ks[2], (channels,))
    scale = 0.5 * jax.random.normal(ks[3], (batch, channels))
    shift = 0.5 * jax.random.normal(ks[4], (batch, channels))
    dout = jax.random.normal(ks[5], x.shape)
    return [a.astype(dtype) for a in (x, gamma, beta, scale, shift, dout)]


def _gn_value_and_grads(fn, args, dout):
    def run(args, dout):  # one jit: far fewer compilations than op-by-op eager dispatch
        out, vjp = jax.vjp(fn, *args)
        return (out, *vjp(dout.astype(out.dtype)))

    return jax.jit(run)(args, dout)


def _gn_kernel_and_reference(inputs, groups, backend):
    *args, dout = inputs
    got = _gn_value_and_grads(
        lambda *a: group_norm_modulate_silu(*a, groups=groups, backend=backend), args, dout)
    f32 = [a.astype(jnp.float32) for a in inputs]
    want = _gn_value_and_grads(
        lambda *a: reference.group_norm_modulate_silu(*a, groups=groups), f32[:-1], f32[-1])
    return got, want


@pytest.mark.parametrize("backend,batch,height,width,channels,groups", [
    ("interpret", 2, 8, 8, 32, 8),
    ("interpret", 1, 4, 4, 64, 32),  # 2 channels per group
    ("interpret", 2, 4, 8, 16, 1),  # one group: LayerNorm over (H, W, C); non-square
    ("tpu_interpret", 2, 8, 8, 64, 32),
    ("tpu_interpret", 1, 4, 6, 24, 8),  # no power of two anywhere but groups
])
def test_group_norm_float32(backend, batch, height, width, channels, groups):
    inputs = _gn_inputs(0, batch, height, width, channels)
    got, want = _gn_kernel_and_reference(inputs, groups, backend)
    # float32 sums in a different order; the helper scales by max(1, max |want|).
    assert_close_f32(got, want, names=GN_NAMES, tol=1e-5)


@pytest.mark.parametrize("backend", ["interpret", "tpu_interpret"])
def test_group_norm_bfloat16(backend):
    """All inputs bf16; the reference runs on float32 copies of the same values.

    Kernel and reference then do the same float32 arithmetic (up to summation order, 1e-5 of
    the largest value is ample) and differ by the kernel's one rounding of each output to
    bf16, at most u |want| with u = 2^-8. The parameter gradients (sums over pixels, and
    over the batch for gamma / beta) are float32 sums rounded once at the end: same bound.
    """
    inputs = _gn_inputs(1, 2, 8, 8, 32, dtype=jnp.bfloat16)
    got, want = _gn_kernel_and_reference(inputs, 8, backend)
    for name, g, w in zip(GN_NAMES, got, want, strict=True):
        assert g.dtype == jnp.bfloat16, name
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        bound = BF16_U * np.abs(w) + 1e-5 * np.abs(w).max()
        assert np.all(np.abs(g - w) <= bound), (name, np.abs(g - w).max())


def test_group_norm_under_jit_and_grad():
    """A scalar loss through jit: the custom VJP composes with the rest of a model."""
    x, gamma, beta, scale, shift, _ = _gn_inputs(2, 1, 4, 4, 16)

    def loss(fn, *args):
        return jnp.sum(jnp.sin(fn(*args)))

    def kernel(*a):
        return group_norm_modulate_silu(*a, groups=4)

    def ref(*a):
        return reference.group_norm_modulate_silu(*a, groups=4)

    got = jax.jit(jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2, 3, 4)))(
        x, gamma, beta, scale, shift)
    want = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2, 3, 4))(
        x, gamma, beta, scale, shift)
    assert_close_f32(got, want, names=GN_NAMES[1:])


def test_group_norm_rejects_bad_arguments():
    x, gamma, beta, scale, shift, _ = _gn_inputs(3, 1, 2, 2, 12)
    with pytest.raises(ValueError, match="divisor of channels"):
        group_norm_modulate_silu(x, gamma, beta, scale, shift, groups=5)
    with pytest.raises(ValueError, match="scale must have shape"):
        group_norm_modulate_silu(x, gamma, beta, scale[0], shift, groups=4)
    with pytest.raises(ValueError, match="batch, height, width, channels"):
        group_norm_modulate_silu(x[0], gamma, beta, scale, shift, groups=4)


# --- sampler_step ---

ALPHA_BARS = linear_alpha_bars(1000)


def _sampler_inputs(seed, shape, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    return [(1.5 * jax.random.normal(k, shape)).astype(dtype) for k in ks]


def _kernel_and_reference_step(x_t, out, noise, coeffs, backend, **kwargs):
    """Both steps under one jit (one compilation instead of many eager ones)."""
    def run(x_t, out, noise, coeffs):
        return (sampler_step(x_t, out, noise, coeffs, backend=backend, **kwargs),
                reference.sampler_step(x_t, out, noise, coeffs, **kwargs))

    return jax.jit(run)(x_t, out, noise, coeffs)


SCHEDULES = {
    # per-row t: a nearly clean row, a middle one, the noisiest
    "ddpm": lambda: ddpm_coefficients(ALPHA_BARS, jnp.array([0, 400, 999])),
    "ddim_eta0": lambda: ddim_coefficients(ALPHA_BARS, jnp.array([50, 500, 999]),
                                           jnp.array([-1, 450, 949]), 0.0),
    "ddim_eta1": lambda: ddim_coefficients(ALPHA_BARS, 700, 650, 1.0),  # scalar t
}


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_sampler_step_matches_reference(parameterization, schedule):
    x_t, out, noise, uncond = _sampler_inputs(4, (3, 6, 5, 3))  # 90 elements: padded to 128
    coeffs = SCHEDULES[schedule]()
    for clip_x0 in (False, True):
        for guidance in (None, jnp.array([1.0, 3.0, 7.5])):
            kwargs = dict(parameterization=parameterization, clip_x0=clip_x0,
                          guidance_scale=guidance,
                          uncond_output=None if guidance is None else uncond)
            got, want = _kernel_and_reference_step(x_t, out, noise, coeffs, "interpret",
                                                   **kwargs)
            # eps -> x0 divides by sqrt(alpha_bar) (~0.006 at t=999): scale by |want|.
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max(),
                                       err_msg=f"clip_x0={clip_x0} guidance={guidance}")


@pytest.mark.parametrize("parameterization,clip_x0,guided", [
    ("eps", True, True), ("x0", False, False), ("v", True, False)])
def test_sampler_step_tpu_interpret(parameterization, clip_x0, guided):
    x_t, out, noise, uncond = _sampler_inputs(5, (2, 16, 16, 4))  # 8 rows of 128 lanes
    coeffs = ddim_coefficients(ALPHA_BARS, jnp.array([300, 900]), jnp.array([250, 850]), 0.5)
    kwargs = dict(parameterization=parameterization, clip_x0=clip_x0,
                  guidance_scale=2.0 if guided else None,
                  uncond_output=uncond if guided else None)
    got, want = _kernel_and_reference_step(x_t, out, noise, coeffs, "tpu_interpret", **kwargs)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())


def test_sampler_step_partial_blocks_and_no_noise():
    # 3 * 20 * 20 = 1200 elements -> 10 rows of 128 (padded), blocks of 4 rows: the last
    # block is partial; noise=None drops the noise term.
    x_t, out, _, _ = _sampler_inputs(6, (2, 20, 20, 3))
    coeffs = ddim_coefficients(ALPHA_BARS, 500, 480, 0.0)
    got = sampler_step(x_t, out, None, coeffs, parameterization="eps", block_rows=4,
                       backend="interpret")
    want = reference.sampler_step(x_t, out, None, coeffs, parameterization="eps")
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)


def test_sampler_step_bfloat16():
    """bf16 in and out, float32 inside: one rounding of the result, <= u |want|, u = 2^-8."""
    x_t, out, noise, _ = _sampler_inputs(7, (2, 8, 8, 3), jnp.bfloat16)
    coeffs = ddpm_coefficients(ALPHA_BARS, jnp.array([10, 600]))
    got = sampler_step(x_t, out, noise, coeffs, parameterization="v", backend="interpret")
    f32 = [a.astype(jnp.float32) for a in (x_t, out, noise)]
    want = np.asarray(reference.sampler_step(*f32, coeffs, parameterization="v"))
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - want)
    assert np.all(err <= BF16_U * np.abs(want) + 1e-5 * np.abs(want).max()), err.max()


def test_sampler_step_rejects_bad_arguments():
    x_t, out, noise, uncond = _sampler_inputs(8, (2, 4))
    coeffs = ddpm_coefficients(ALPHA_BARS, 5)
    with pytest.raises(ValueError, match="parameterization"):
        sampler_step(x_t, out, noise, coeffs, parameterization="score")
    with pytest.raises(ValueError, match="both guidance_scale"):
        sampler_step(x_t, out, noise, coeffs, parameterization="eps", uncond_output=uncond)
    with pytest.raises(ValueError, match="must match"):
        sampler_step(x_t, out[:1], noise, coeffs, parameterization="eps")
    with pytest.raises(ValueError, match="scalar or \\[batch=2\\]"):
        sampler_step(x_t, out, noise, ddpm_coefficients(ALPHA_BARS, jnp.array([1, 2, 3])),
                     parameterization="eps")


def _fake_model(x, t, num_timesteps):
    """A fixed, smooth 'network': some function of x_t and the (per-row) timestep."""
    tt = (jnp.asarray(t, jnp.float32) / num_timesteps).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.8 * jnp.tanh(x) * (1.0 - 0.5 * tt) + 0.1 * jnp.sin(3.0 * x + tt)


def _trajectory(step_fn, alpha_bars, timesteps, coeff_fn, shape, **kwargs):
    """Runs len(timesteps) steps from pure noise with fixed per-step noise; returns x."""
    num_timesteps = alpha_bars.shape[0]
    key = jax.random.key(9)
    x = jax.random.normal(key, shape)
    for i, (t, t_prev) in enumerate(timesteps):
        noise = jax.random.normal(jax.random.fold_in(key, i), shape)
        cond = _fake_model(x, t, num_timesteps)
        uncond = 0.5 * cond + 0.1 if "guidance_scale" in kwargs else None
        x = step_fn(x, cond, noise, coeff_fn(alpha_bars, t, t_prev),
                    uncond_output=uncond, **kwargs)
    return x


@pytest.mark.parametrize("name", ["ddpm_eps", "ddim_eta0_x0_clip", "ddim_eta1_v_guided"])
def test_whole_trajectory_matches_reference(name):
    """20 steps from noise: the kernel's trajectory follows the reference's."""
    batch = 2
    if name == "ddpm_eps":  # a 20-step DDPM schedule, every step ancestral
        alpha_bars = linear_alpha_bars(20, 1e-3, 0.3)
        timesteps = [(t, t - 1) for t in range(19, -1, -1)]
        kwargs = dict(parameterization="eps")

        def coeff_fn(ab, t, t_prev):
            return ddpm_coefficients(ab, t)
    else:  # 20 DDIM steps over 1000; the second row lags the first by 25 timesteps
        alpha_bars = ALPHA_BARS
        ts = list(range(999, -1, -50))
        timesteps = [(jnp.array([t, max(t - 25, 0)]), jnp.array([t - 50, max(t - 75, -1)]))
                     for t in ts]
        eta = 0.0 if "eta0" in name else 1.0

        def coeff_fn(ab, t, t_prev):
            return ddim_coefficients(ab, t, t_prev, eta)

        if "x0" in name:
            kwargs = dict(parameterization="x0", clip_x0=True)
        else:
            kwargs = dict(parameterization="v", guidance_scale=3.0)
    assert len(timesteps) == 20
    kernel_step = jax.jit(lambda *a, **k: sampler_step(*a, backend="interpret", **k),
                          static_argnames=("parameterization", "clip_x0"))
    got = _trajectory(kernel_step, alpha_bars, timesteps, coeff_fn, (batch, 8, 8, 3), **kwargs)
    want = _trajectory(reference.sampler_step, alpha_bars, timesteps, coeff_fn,
                       (batch, 8, 8, 3), **kwargs)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    if "clip" in name:  # the last step returns the clipped x0 itself
        assert np.abs(np.asarray(got)).max() <= 1.0


def test_ddim_eta1_one_step_is_ddpm():
    """Song et al.: DDIM with eta = 1 and t_prev = t - 1 is the DDPM ancestral step, also
    with x0 clipping (because DDIM recomputes eps from the clipped x0)."""
    t = jnp.array([1, 17, 500, 999])
    ddpm, ddim = ddpm_coefficients(ALPHA_BARS, t), ddim_coefficients(ALPHA_BARS, t, t - 1, 1.0)
    np.testing.assert_allclose(ddpm.sigma, ddim.sigma, rtol=1e-4)
    x_t, out, noise, _ = _sampler_inputs(10, (4, 8, 16))
    for clip_x0 in (False, True):
        a = sampler_step(x_t, out, noise, ddpm, parameterization="eps", clip_x0=clip_x0)
        b = sampler_step(x_t, out, noise, ddim, parameterization="eps", clip_x0=clip_x0)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_coefficients_by_hand():
    """betas 0.1, 0.2, 0.3, 0.4: alpha_bar = 0.9, 0.72, 0.504, 0.3024."""
    ab = linear_alpha_bars(4, 0.1, 0.4)
    np.testing.assert_allclose(ab, [0.9, 0.72, 0.504, 0.3024], rtol=1e-6)
    c = ddpm_coefficients(ab, jnp.arange(4))
    # posterior variance (1 - ab_{t-1}) / (1 - ab_t) beta_t, and 0 at t = 0
    var = [0.0, 0.1 / 0.28 * 0.2, 0.28 / 0.496 * 0.3, 0.496 / 0.6976 * 0.4]
    np.testing.assert_allclose(np.asarray(c.sigma) ** 2, var, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(var[1], 1 / 14)
    # t = 1: c_x0 = sqrt(0.9) 0.2 / 0.28, c_xt = sqrt(0.8) 0.1 / 0.28; t = 0: x_{-1} = x0
    np.testing.assert_allclose(c.coef_x0, [1.0, 0.9**0.5 * 0.2 / 0.28, 0.72**0.5 * 0.3 / 0.496,
                                           0.504**0.5 * 0.4 / 0.6976], rtol=1e-5)
    np.testing.assert_allclose(c.coef_xt[:2], [0.0, 0.8**0.5 * 0.1 / 0.28], rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(c.sqrt_alpha_bar[3] ** 2, 0.3024, rtol=1e-6)
    # DDIM 3 -> 1: eta = 0 gives sigma 0, c_eps = sqrt(1 - 0.72); eta = 1 gives
    # sigma^2 = 0.28 / 0.6976 * (1 - 0.3024 / 0.72) = 0.1624 / 0.6976.
    d0, d1 = ddim_coefficients(ab, 3, 1, 0.0), ddim_coefficients(ab, 3, 1, 1.0)
    np.testing.assert_allclose([d0.sigma, d0.coef_x0, d0.coef_eps, d0.coef_xt],
                               [0.0, 0.72**0.5, 0.28**0.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(d1.sigma**2, 0.1624 / 0.6976, rtol=1e-5)
    np.testing.assert_allclose(d1.coef_eps**2, 0.28 - 0.1624 / 0.6976, rtol=1e-4)
    # Ho et al.'s schedule (1e-4 .. 0.02 over 1000 steps): alpha_bar_0 = 0.9999, and
    # ln alpha_bar_999 = -sum(b + b^2/2 + b^3/3) = -(10.05 + 0.0670 + 0.00067), i.e. 4.036e-5.
    np.testing.assert_allclose(ALPHA_BARS[0], 0.9999, rtol=1e-7)
    np.testing.assert_allclose(ALPHA_BARS[999], np.exp(-10.11767), rtol=2e-3)


def test_coefficients_struct_is_a_pytree_and_jits():
    c = jax.jit(lambda t: ddim_coefficients(ALPHA_BARS, t, t - 100, 0.3))(jnp.array([900, 100]))
    assert isinstance(c, SamplerCoefficients)
    assert all(field.shape == (2,) for field in c)
