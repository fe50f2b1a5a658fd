"""`python -m pallas_kernels.benchmark --op=groupnorm|sampler`: fused kernel vs jit(reference).

groupnorm times the forward and forward+backward of group_norm_modulate_silu; sampler times
one DDIM(eta=1) v-parameterized step with x0 clipping and classifier-free guidance (every
feature on, the most the fused kernel can save). "xla" is jax.jit of the pure-jnp reference,
i.e. whatever XLA fuses on its own. Both ops are memory-bound, so besides milliseconds the
report gives the effective bandwidth: bytes the op must read and write (inputs, outputs;
for the backward also the cotangent and gradients) over the time. Interpret mode on CPU
measures the Pallas interpreter, not a kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import reference
from pallas_kernels.group_norm import group_norm_modulate_silu
from pallas_kernels.sampler import ddim_coefficients, linear_alpha_bars, sampler_step

CPU_DEFAULTS = dict(batch=2, height=8, width=8, channels=64, groups=32, dtype="float32")
ACCEL_DEFAULTS = dict(batch=16, height=32, width=32, channels=256, groups=32,
                      dtype="bfloat16")


def _figures(fn, args, nbytes, time_ms, temp_bytes) -> dict:
    ms = time_ms(fn, args)
    # 4 significant digits: a tiny shape on a slow CPU must not round its rate to 0
    return {"ms": round(ms, 4), "gbytes_per_s": float(f"{nbytes / ms / 1e6:.4g}"),
            "temp_bytes": temp_bytes(fn, args)}


def run_groupnorm(args, backend: str, time_ms, temp_bytes) -> dict:
    b, h, w, c = args.batch, args.height, args.width, args.channels
    dtype = jnp.dtype(args.dtype)
    ks = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(ks[0], (b, h, w, c), dtype)
    gamma, beta = jnp.ones((c,), jnp.float32), jnp.zeros((c,), jnp.float32)
    scale = 0.1 * jax.random.normal(ks[1], (b, c), jnp.float32)
    shift = 0.1 * jax.random.normal(ks[2], (b, c), jnp.float32)
    inputs = (x, gamma, beta, scale, shift)
    impls = {
        f"pallas_{backend}": lambda *a: group_norm_modulate_silu(*a, groups=args.groups,
                                                                 backend=backend),
        "xla": lambda *a: reference.group_norm_modulate_silu(*a, groups=args.groups),
    }
    act = x.size * dtype.itemsize
    results = {}
    for name, impl in impls.items():
        fwd = jax.jit(impl)
        fwd_bwd = jax.jit(jax.grad(lambda *a, impl=impl: jnp.sum(
            impl(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3, 4)))
        results[name] = {
            "fwd": _figures(fwd, inputs, 2 * act, time_ms, temp_bytes),
            # x, dout read; dx written (the forward's own traffic not counted)
            "fwd_bwd": _figures(fwd_bwd, inputs, 3 * act, time_ms, temp_bytes),
        }
        r = results[name]
        print(f"{name:>18}: fwd {r['fwd']['ms']:9.3f} ms {r['fwd']['gbytes_per_s']:8.2f} GB/s "
              f"| fwd+bwd {r['fwd_bwd']['ms']:9.3f} ms | temp {r['fwd_bwd']['temp_bytes']} B")
    return {"shape": [b, h, w, c], "groups": args.groups, "results": results}


def run_sampler(args, backend: str, time_ms, temp_bytes) -> dict:
    b, h, w, c = args.batch, args.height, args.width, args.channels
    dtype = jnp.dtype(args.dtype)
    ks = jax.random.split(jax.random.key(1), 4)
    x_t, cond, uncond, noise = (jax.random.normal(k, (b, h, w, c), dtype) for k in ks)
    coeffs = ddim_coefficients(linear_alpha_bars(), jnp.full((b,), 500), jnp.full((b,), 480),
                               1.0)
    kwargs = dict(parameterization="v", clip_x0=True, guidance_scale=3.0)
    impls = {
        f"pallas_{backend}": lambda x, m, u, n, cf: sampler_step(
            x, m, n, cf, uncond_output=u, backend=backend, **kwargs),
        "xla": lambda x, m, u, n, cf: reference.sampler_step(x, m, n, cf, uncond_output=u,
                                                             **kwargs),
    }
    inputs = (x_t, cond, uncond, noise, coeffs)
    nbytes = 5 * x_t.size * dtype.itemsize  # four reads, one write
    results = {}
    for name, impl in impls.items():
        results[name] = _figures(jax.jit(impl), inputs, nbytes, time_ms, temp_bytes)
        r = results[name]
        print(f"{name:>18}: step {r['ms']:9.3f} ms {r['gbytes_per_s']:8.2f} GB/s | "
              f"temp {r['temp_bytes']} B")
    return {"shape": [b, h, w, c], "step": "ddim eta=1, v, clip_x0, guidance 3.0",
            "results": results}
