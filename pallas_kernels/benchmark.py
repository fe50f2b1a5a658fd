"""Times flash_attention against jax.nn.dot_product_attention (XLA, and cuDNN on GPU).

    python -m pallas_kernels.benchmark                      # small CPU-sized defaults
    python -m pallas_kernels.benchmark --batch 4 --seq 4096 --heads 16 --head_dim 128 \
        --dtype bfloat16 --causal                           # a GPU/TPU-sized run
    python -m pallas_kernels.benchmark --op=groupnorm       # the denoising kernels vs
    python -m pallas_kernels.benchmark --op=sampler         # jax.jit of their references

--op=groupnorm / --op=sampler take --batch --height --width --channels --groups --dtype
(defaults: 2x8x8x64 float32 on CPU, a UNet-sized 16x32x32x256 bfloat16 on GPU/TPU); see
pallas_kernels._denoise_benchmark for what they time.

Prints one line per implementation, then one JSON object (the last line) with forward and
forward+backward milliseconds, TFLOP/s and memory figures. FLOPs count the useful matmul work
of exact attention: 4 * batch * heads * q_len * kv_len * head_dim for the forward (halved when
causal) and 2.5x that for the backward. Memory: the compiled program's temporary buffer size
(XLA's memory analysis, available on every platform), and the device's peak bytes in use
where the device reports memory statistics (GPU, TPU). Interpret mode on CPU measures the
Pallas interpreter, not a kernel: its timings say nothing about GPU/TPU performance.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from pallas_kernels import _denoise_benchmark, flash_attention
from pallas_kernels.backends import current_platform, resolve_backend

_CPU_DEFAULTS = dict(batch=1, seq=256, heads=2, head_dim=64, dtype="float32")
_ACCEL_DEFAULTS = dict(batch=4, seq=4096, heads=16, head_dim=128, dtype="bfloat16")


def _time_ms(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _temp_bytes(fn, args) -> int | None:
    try:
        return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend implements memory analysis
        return None


def _implementations(args, backend: str) -> dict:
    def pallas(q, k, v):
        return flash_attention(q, k, v, causal=args.causal, backend=backend)

    impls = {f"pallas_{backend}": pallas}
    names = ["xla"] + (["cudnn"] if current_platform() == "gpu" else [])
    for name in names:
        impls[name] = (lambda q, k, v, name=name: jax.nn.dot_product_attention(
            q, k, v, is_causal=args.causal, implementation=name))
    return impls


def run(args) -> dict:
    if args.op != "attention":
        return _run_denoise(args)
    backend = resolve_backend(args.backend)
    dtype = jnp.dtype(args.dtype)
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    kv_heads = args.kv_heads or args.heads
    q = jax.random.normal(kq, (args.batch, args.seq, args.heads, args.head_dim), dtype)
    k = jax.random.normal(kk, (args.batch, args.seq, kv_heads, args.head_dim), dtype)
    v = jax.random.normal(kv, (args.batch, args.seq, kv_heads, args.head_dim), dtype)
    fwd_flops = 4 * args.batch * args.heads * args.seq**2 * args.head_dim
    fwd_flops *= 0.5 if args.causal else 1.0
    results = {}
    for name, impl in _implementations(args, backend).items():
        fwd = jax.jit(impl)
        fwd_bwd = jax.jit(jax.grad(lambda q, k, v, impl=impl: jnp.sum(
            impl(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))
        try:
            fwd_ms = _time_ms(fwd, (q, k, v), args.iters)
            fwd_bwd_ms = _time_ms(fwd_bwd, (q, k, v), args.iters)
        except Exception as e:  # e.g. cuDNN rejecting a dtype or head_dim
            results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            print(f"{name:>18}: failed ({results[name]['error']})")
            continue
        results[name] = {
            "fwd_ms": round(fwd_ms, 4),
            "fwd_bwd_ms": round(fwd_bwd_ms, 4),
            # 4 significant digits: tiny shapes on a CPU must not round to 0
            "fwd_tflops": float(f"{fwd_flops / fwd_ms / 1e9:.4g}"),
            "fwd_bwd_tflops": float(f"{3.5 * fwd_flops / fwd_bwd_ms / 1e9:.4g}"),
            "fwd_bwd_temp_bytes": _temp_bytes(fwd_bwd, (q, k, v)),
        }
        r = results[name]
        print(f"{name:>18}: fwd {fwd_ms:9.3f} ms {r['fwd_tflops']:8.3f} TFLOP/s | "
              f"fwd+bwd {fwd_bwd_ms:9.3f} ms {r['fwd_bwd_tflops']:8.3f} TFLOP/s | "
              f"temp {r['fwd_bwd_temp_bytes']} B")
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {
        "device": device.device_kind,
        "platform": current_platform(),
        "backend": backend,
        "batch": args.batch, "seq": args.seq, "heads": args.heads, "kv_heads": kv_heads,
        "head_dim": args.head_dim, "dtype": args.dtype, "causal": args.causal,
        "results": results,
        "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    }


def _run_denoise(args) -> dict:
    backend = resolve_backend(args.backend)
    op = {"groupnorm": _denoise_benchmark.run_groupnorm,
          "sampler": _denoise_benchmark.run_sampler}[args.op]
    report = op(args, backend, lambda fn, a: _time_ms(fn, a, args.iters), _temp_bytes)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {"op": args.op, "device": device.device_kind, "platform": current_platform(),
            "backend": backend, "dtype": args.dtype, **report,
            "peak_bytes_in_use": stats.get("peak_bytes_in_use")}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", choices=["attention", "groupnorm", "sampler"],
                        default="attention")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv_heads", type=int, help="default: --heads (multi-head)")
    parser.add_argument("--head_dim", type=int)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--backend", default=None, help="pallas backend; default by platform")
    parser.add_argument("--iters", type=int, default=5)
    for name in ("height", "width", "channels", "groups"):
        parser.add_argument(f"--{name}", type=int, help="--op=groupnorm / sampler only")
    args = parser.parse_args(argv)
    cpu = current_platform() == "cpu"
    if args.op == "attention":
        defaults = _CPU_DEFAULTS if cpu else _ACCEL_DEFAULTS
    else:
        defaults = (_denoise_benchmark.CPU_DEFAULTS if cpu
                    else _denoise_benchmark.ACCEL_DEFAULTS)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None) -> None:
    print(json.dumps(run(parse_args(argv))))


if __name__ == "__main__":
    main()
