"""Gaussian diffusion: noise schedules, the forward process, training targets, and the DDPM
(ancestral) and DDIM samplers as one `lax.scan` each.

Conventions. Timesteps are 0-based: index `t` in `[0, T)` is the paper's step `t + 1`, so
`alpha_bars[t] = prod_{i <= t} (1 - betas[i])` and `t = -1` is the clean data (alpha_bar 1).
With `a = sqrt(alpha_bar_t)` and `s = sqrt(1 - alpha_bar_t)`:

    x_t = a x0 + s eps                 (q_sample)
    v   = a eps - s x0                 (the "v" target, Salimans & Ho 2022)
    x0  = a x_t - s v,  eps = s x_t + a v

The network predicts eps or v (`prediction`). One sampler step turns its output into x_{t'}
(t' < t) with `pallas_kernels.sampler_step` (kernels="pallas") or its pure-jnp reference
(kernels="xla"); the per-step coefficients come from `pallas_kernels.ddpm_coefficients` /
`ddim_coefficients`, which are plain jnp and the one place those formulas live.

Samplers (`sample`):
  - "ddim" (Song et al. 2021): `steps` evenly spaced timesteps from T-1 down to 0, then x0;
    `eta` = 0 is deterministic, eta = 1 adds DDPM-like noise.
  - "ddpm" (Ho et al. 2020, ancestral): with `steps` = 0 or >= T every one of the T steps;
    with fewer, the chain is *respaced* (Nichol & Dhariwal 2021, section 4): the ancestral
    posterior of the sub-sequence's own betas `1 - alpha_bar_{t_k} / alpha_bar_{t_{k-1}}`.
Classifier-free guidance (Ho & Salimans 2022): `out = uncond + w (cond - uncond)`, the
conditional and unconditional predictions made in one network call on a doubled batch; w = 1
is the plain conditional model (one call, no unconditional half). `guidance_max_t` limits guidance
to the steps with t < guidance_max_t * T (Kynkäänniemi et al. 2024: guiding the noisiest steps
mostly costs diversity); the others use w = 1.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels import reference

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "v")
SAMPLERS = ("ddim", "ddpm")
LOSS_WEIGHTINGS = ("uniform", "min_snr")
KERNELS = ("xla", "pallas")
COSINE_OFFSET = 0.008  # Nichol & Dhariwal's s: keeps beta_1 from being vanishingly small
MAX_BETA = 0.999  # ... and their clip, which keeps the last steps from being singular

# (x_t [n, ...], t int32 [n], labels int32 [n]) -> network output [n, ...]
Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class Schedule(NamedTuple):
    """A noise schedule, float32 arrays `[T]` indexed by the 0-based timestep."""

    betas: jax.Array
    alpha_bars: jax.Array

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def cosine_alpha_bar(t, num_timesteps: int, s: float = COSINE_OFFSET):
    """f(t) / f(0) with f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), t the paper's step."""
    def f(u):
        return np.cos((u / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    return f(np.asarray(t, np.float64)) / f(0.0)


def make_schedule(kind: str = "cosine", num_timesteps: int = 1000) -> Schedule:
    """The betas and alpha_bars of a "linear" or "cosine" schedule (built in float64).

    linear: Ho et al.'s betas from 1e-4 to 0.02 at T = 1000, both scaled by 1000 / T (so other
      T keep the same total noise, as in Nichol & Dhariwal's code).
    cosine: beta_t = min(1 - f(t) / f(t - 1), 0.999) with f above; alpha_bar = f(t) / f(0)
      wherever the clip does not bind (it binds only at the last step of T = 1000).
    """
    if kind == "linear":
        scale = 1000.0 / num_timesteps
        betas = np.linspace(1e-4 * scale, 0.02 * scale, num_timesteps, dtype=np.float64)
    elif kind == "cosine":
        steps = np.arange(num_timesteps + 1, dtype=np.float64)
        f = cosine_alpha_bar(steps, num_timesteps)
        betas = np.minimum(1.0 - f[1:] / f[:-1], MAX_BETA)
    else:
        raise ValueError(f"unknown noise schedule {kind!r}; one of {SCHEDULES}")
    return Schedule(betas=jnp.asarray(betas, jnp.float32),
                    alpha_bars=jnp.asarray(np.cumprod(1.0 - betas), jnp.float32))


def posterior_variance(schedule: Schedule) -> jax.Array:
    """beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t, `[T]` (0 at t = 0):
    the variance of q(x_{t-1} | x_t, x0), DDPM's sigma_t^2."""
    t = jnp.arange(schedule.num_timesteps)
    return pallas_kernels.ddpm_coefficients(schedule.alpha_bars, t).sigma ** 2


def _per_row(c: jax.Array, like: jax.Array) -> jax.Array:
    """`[n]` -> broadcastable against `like` `[n, ...]`."""
    return c.reshape(c.shape + (1,) * (like.ndim - c.ndim))


def _a_s(schedule: Schedule, t: jax.Array, like: jax.Array):
    ab = schedule.alpha_bars[t]
    return _per_row(jnp.sqrt(ab), like), _per_row(jnp.sqrt(1.0 - ab), like)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; x0, noise `[n, ...]`, t `[n]`."""
    a, s = _a_s(schedule, t, x0)
    return a * x0 + s * noise


def training_target(prediction: str, schedule: Schedule, x0: jax.Array, t: jax.Array,
                    noise: jax.Array) -> jax.Array:
    """What the network regresses on: eps itself, or v = a eps - s x0."""
    if prediction == "eps":
        return noise
    if prediction == "v":
        a, s = _a_s(schedule, t, x0)
        return a * noise - s * x0
    raise ValueError(f"unknown prediction {prediction!r}; one of {PREDICTIONS}")


def loss_weights(weighting: str, prediction: str, schedule: Schedule, t: jax.Array,
                 gamma: float = 5.0) -> jax.Array:
    """Per-row weights `[n]` of the denoising loss at timesteps t.

    "uniform": 1 (Ho et al.'s simple loss). "min_snr" (Hang et al. 2023): the loss in x0 terms
    weighted by min(SNR_t, gamma), which for an eps target is min(SNR, gamma) / SNR and for a
    v target min(SNR, gamma) / (SNR + 1), since |eps err|^2 = SNR |x0 err|^2 and
    |v err|^2 = (SNR + 1) |x0 err|^2.
    """
    if weighting == "uniform":
        return jnp.ones(t.shape, jnp.float32)
    if weighting != "min_snr":
        raise ValueError(f"unknown loss weighting {weighting!r}; one of {LOSS_WEIGHTINGS}")
    ab = schedule.alpha_bars[t]
    snr = ab / (1.0 - ab)
    if prediction == "eps":
        return jnp.minimum(snr, gamma) / snr
    if prediction == "v":
        return jnp.minimum(snr, gamma) / (snr + 1.0)
    raise ValueError(f"unknown prediction {prediction!r}; one of {PREDICTIONS}")


def predict_x0(prediction: str, schedule: Schedule, x_t: jax.Array, t: jax.Array,
               output: jax.Array) -> jax.Array:
    """The clean image implied by the network's output at (x_t, t)."""
    a, s = _a_s(schedule, t, x_t)
    if prediction == "eps":
        return (x_t - s * output) / a
    if prediction == "v":
        return a * x_t - s * output
    raise ValueError(f"unknown prediction {prediction!r}; one of {PREDICTIONS}")


def timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """The sampler's timesteps, descending from T-1 to 0: all T when `steps` is 0 or >= T,
    else `steps` evenly spaced ones (rounded; T-1 always included, so sampling starts from
    the noisiest step the model was trained on)."""
    if steps <= 0 or steps >= num_timesteps:
        return np.arange(num_timesteps - 1, -1, -1)
    return np.unique(np.round(np.linspace(num_timesteps - 1, 0, steps)).astype(np.int64))[::-1]


def step_coefficients(schedule: Schedule, sampler: str, steps: int, eta: float = 0.0):
    """`(t [K], coefficients with fields [K])` of every sampler step, in sampling order; t is a
    numpy int32 array (static: it decides the scans' lengths)."""
    ts = timesteps(schedule.num_timesteps, steps)
    if sampler == "ddim":
        t_prev = np.append(ts[1:], -1)
        return ts.astype(np.int32), pallas_kernels.ddim_coefficients(
            schedule.alpha_bars, jnp.asarray(ts), jnp.asarray(t_prev), eta)
    if sampler == "ddpm":
        # The ancestral step of the (respaced) chain whose k-th step is timestep ts[k]: its
        # alpha_bars are the sub-sequence's, indexed by position (identical when ts is 0..T-1).
        ascending = ts[::-1].copy()
        k = np.arange(len(ts) - 1, -1, -1)
        return ts.astype(np.int32), pallas_kernels.ddpm_coefficients(
            schedule.alpha_bars[ascending], jnp.asarray(k))
    raise ValueError(f"unknown sampler {sampler!r}; one of {SAMPLERS}")


def denoise_step(x_t: jax.Array, output: jax.Array, noise: jax.Array | None, coeffs, *,
                 prediction: str, clip_x0: bool, guidance: float | None = None,
                 uncond_output: jax.Array | None = None, kernels: str = "xla") -> jax.Array:
    """x_{t'} from x_t and the network's (guided) output: the fused Pallas kernel or the same
    math in jnp (`pallas_kernels.reference`)."""
    step = pallas_kernels.sampler_step if kernels == "pallas" else reference.sampler_step
    return step(x_t, output, noise, coeffs, parameterization=prediction, clip_x0=clip_x0,
                guidance_scale=guidance, uncond_output=uncond_output)


def guided_output(denoiser: Denoiser, x_t: jax.Array, t: jax.Array, labels: jax.Array | None,
                  null_label: int, guidance: float):
    """`(cond, uncond or None)`: one network call, on a doubled batch when guiding."""
    n = x_t.shape[0]
    if labels is None:
        return denoiser(x_t, t, jnp.full((n,), null_label, jnp.int32)), None
    if guidance == 1.0:
        return denoiser(x_t, t, labels), None
    both = denoiser(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                    jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    return both[:n], both[n:]


def sample(denoiser: Denoiser, schedule: Schedule, shape: tuple[int, ...], rng: jax.Array, *,
           labels: jax.Array | None = None, null_label: int = 0, sampler: str = "ddim",
           steps: int = 50, eta: float = 0.0, guidance: float = 1.0,
           guidance_max_t: float = 1.0, clip_x0: bool = True,
           prediction: str = "eps", kernels: str = "xla", x_T: jax.Array | None = None,
           trajectory: bool = False):
    """Samples `[n, ...]` (`shape`) by running the sampler from pure noise.

    Args:
      denoiser: `(x_t, t, labels) -> output`; `labels == null_label` is the unconditional model.
      labels: int32 `[n]` classes to generate, or None (unconditional: every row null).
      guidance: CFG weight w (1 = conditional, no extra call; ignored without labels).
      guidance_max_t: guide only the steps with t < guidance_max_t * T (1 = every step).
      x_T: the starting noise (default: drawn from `rng`).
      trajectory: also return the predicted x0 after every step, `[K, n, ...]` (sampling order).

    Returns:
      x0 `[n, ...]` in model range, or `(x0, predicted_x0s)` with `trajectory=True`.
    """
    ts, coeffs = step_coefficients(schedule, sampler, steps, eta)
    start_rng, loop_rng = jax.random.split(rng)
    x = jax.random.normal(start_rng, shape, jnp.float32) if x_T is None else x_T
    n = shape[0]
    # DDIM with eta = 0 adds no noise: no draws at all, so it is exactly deterministic.
    noisy = sampler == "ddpm" or eta > 0

    def body(w, x, inputs):
        k, t, c = inputs
        t_rows = jnp.full((n,), t, jnp.int32)
        cond, uncond = guided_output(denoiser, x, t_rows, labels, null_label, w)
        noise = jax.random.normal(jax.random.fold_in(loop_rng, k), shape) if noisy else None
        x_next = denoise_step(x, cond, noise, c, prediction=prediction, clip_x0=clip_x0,
                              guidance=None if uncond is None else w,
                              uncond_output=uncond, kernels=kernels)
        if not trajectory:
            return x_next, None
        out = cond if uncond is None else uncond + w * (cond - uncond)
        x0 = predict_x0(prediction, schedule, x, t_rows, out)
        return x_next, jnp.clip(x0, -1.0, 1.0) if clip_x0 else x0

    # Steps run in descending t, so the unguided ones (t >= guidance_max_t * T) come first: one
    # scan of single conditional calls for them, one of doubled guided calls for the rest.
    num_unguided = int(np.sum(ts >= guidance_max_t * schedule.num_timesteps))
    inputs = (jnp.arange(len(ts)), ts, coeffs)
    paths = []
    for w, part in ((1.0, slice(0, num_unguided)), (guidance, slice(num_unguided, len(ts)))):
        if part.stop > part.start:
            x, path = jax.lax.scan(functools.partial(body, w), x,
                                   jax.tree.map(lambda a, part=part: a[part], inputs))
            paths.append(path)
    return (x, jnp.concatenate(paths)) if trajectory else x
