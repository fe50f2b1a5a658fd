"""Measure an experiment's training and sampling speed; the last line printed is one JSON object.

    python -m experiments.benchmark --config=experiments/configs/lm_char.py \\
        --config.data.path=../shared/data/tinyshakespeare.txt
    python -m experiments.benchmark --config=experiments/configs/diffusion_digits.py

Figures: training throughput (tokens/s for the LM, examples/s for image families) over
`--rounds` timed rounds of `--steps` steps (in calls of `train.steps_per_call`, after the first
compiled call): the median, and the spread (each round, min, max, (max - min) / median) since
one shared machine's rounds differ; step time; first-step compile time; model FLOPs (LM:
6N + 12·L·T·D per token, N = parameters without the position table; image families: XLA's
count of one optimizer step compiled on its own, per example: the trainer's `lax.scan` over
`steps_per_call` steps, and gradient accumulation's over micro-batches, would each be counted
once by XLA, whatever their trip count); sampling speed (LM: decode tokens/s with the KV cache;
images: seconds for `sample.num_samples` images); peak memory where the platform reports it.

`mfu` is model FLOPs per second against the device's peak (`peak_flops`, `peak_source`): the
published dense figure for the GPU and TPU kinds of `genai_jax.evaluation.flops`, or on a CPU
the peak derived from `lscpu` (cores x FMA units x lanes x 2 x clock, assumptions named in
`peak_source`). XLA's simulated CPU devices share one host, so on CPU the peak counts once per
process, not per device (`peak_note`). `mfu_vs_timed_matmul` is the same FLOPs against the best
time of a square matrix product in the model's compute dtype (4096 on GPU/TPU, 1024 on CPU):
the fraction of what this device's matmul unit does in practice.

`--peer=../shared/bench/torch_gpt_ref.py` also runs that PyTorch script between our rounds
(alternating, so both see the same machine state) and reports its tokens/s and our ratio.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments.common import (
    config_from_flag,
    parse_flags,
    start_distributed,
    user_errors_as_one_line,
)
from genai_jax import models, parallel
from genai_jax.evaluation import flops as flops_lib
from genai_jax.train import prepare, provenance

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 50, "timed training steps per round")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "timed rounds (alternated with the peer)")
_DECODE = flags.DEFINE_integer("decode_tokens", 0, "tokens to decode (0 = block_size - 1)")
_PEER = flags.DEFINE_string("peer", None, "path of torch_gpt_ref.py to alternate with")
flags.mark_flags_as_required(["config"])


def measured_peak_flops(dtype) -> tuple[float, str]:
    """The best of five timed `n x n` matmuls on one device, as FLOP/s."""
    n = 1024 if jax.default_backend() == "cpu" else 4096
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = min(_timed(lambda: matmul(a, a).block_until_ready()) for _ in range(5))
    return 2 * n**3 / best, f"measured: best of 5 {n}x{n} {jnp.dtype(dtype).name} matmuls"


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_flops_per_token(params, cfg) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 per matmul weight + attention scores."""
    counts = {"/".join(map(str, path)): x.size for path, x in
              jax.tree_util.tree_leaves_with_path(params)}
    n = sum(counts.values())
    n -= sum(v for k, v in counts.items() if "pos_embed" in k)  # lookups, not matmuls
    attention = 12 * cfg.model.num_layers * cfg.model.block_size * cfg.model.embed_dim
    return 6 * n + attention


def train_flops_per_example(run) -> float:
    """XLA's FLOP count of one optimizer step of an image family, per example.

    The step is compiled on its own, outside the trainer's `lax.scan` over `steps_per_call`
    steps, and with `grad_accum_steps=1` (one batch, no scan over micro-batches): XLA's cost
    analysis counts a loop body once, so either loop would divide the figure by its trip
    count. Compiled only, never run, so the unaccumulated batch costs no memory.
    """
    cfg = run.config.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.train.grad_accum_steps = 1
    family = models.build(cfg, run.pipeline.info)
    rows = run.pipeline.train.batch(0, jax.process_index(), jax.process_count())
    batch = parallel.global_batch(rows, run.batch_sharding)
    step = jax.jit(run.on_mesh(family.train_step),
                   in_shardings=(run.state_shardings, run.batch_sharding))
    compiled = step.lower(run.state, batch).compile()
    return flops_lib.compiled_flops(compiled) / cfg.train.batch_size


def spread(values: list[float]) -> dict[str, float]:
    """Median, min, max and (max - min) / median of per-round figures."""
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values),
            "relative_spread": (max(values) - min(values)) / median}


def device_peak(dtype: str) -> tuple[float | None, str, str]:
    """(peak FLOP/s of all devices together, its source, how devices were counted); the
    peak is None for an accelerator kind without a published figure here."""
    device = jax.devices()[0]
    found = flops_lib.peak_flops(jax.default_backend(), device.device_kind, dtype)
    if found is None:
        return None, f"no published peak for {device.device_kind!r} (see mfu_vs_timed_matmul)", ""
    peak, source = found
    if jax.default_backend() == "cpu":
        note = (f"CPU: this process's {jax.local_device_count()} device(s) share one host's peak "
                f"(simulated devices add no hardware): counted once per process, x "
                f"{jax.process_count()}")
        return peak * jax.process_count(), source, note
    return peak * jax.device_count(), source, f"per device x {jax.device_count()} devices"


def run_peer(path: str, cfg) -> float:
    m = cfg.model
    out = subprocess.run([sys.executable, path, "--steps", str(_STEPS.value),
                          "--block", str(m.block_size), "--layers", str(m.num_layers),
                          "--heads", str(m.num_heads), "--dim", str(m.embed_dim),
                          "--batch", str(cfg.train.batch_size)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["train_tokens_per_s"]


@user_errors_as_one_line
def main(argv):
    del argv
    start_distributed()
    cfg = config_from_flag(_CONFIG)
    logging.set_verbosity(logging.WARNING)
    with tempfile.TemporaryDirectory() as workdir:
        run = prepare(cfg, workdir)
        k = run.steps_per_call
        calls = max(1, _STEPS.value // k)
        batch = run.global_batches(0)
        t0 = time.perf_counter()
        step_fn = run.jit_train_step().lower(run.state, batch).compile()
        compile_s = time.perf_counter() - t0
        state_bytes = parallel.bytes_per_device(run.state)
        is_lm = models.modality(cfg.model.family) == "text"
        flops = (model_flops_per_token(run.state.params, cfg) if is_lm
                 else train_flops_per_example(run))
        state, metrics = step_fn(run.state, batch)
        jax.block_until_ready(metrics)
        tokens_per_step = cfg.train.batch_size * run.family.tokens_per_example
        ours, peer, step = [], [], k
        for _ in range(_ROUNDS.value):
            batches = [run.global_batches(step + i * k) for i in range(calls)]
            t0 = time.perf_counter()
            for b in batches:
                state, metrics = step_fn(state, b)
            jax.block_until_ready((state, metrics))
            ours.append(calls * k * tokens_per_step / (time.perf_counter() - t0))
            step += calls * k
            if _PEER.value:
                peer.append(run_peer(_PEER.value, cfg))
        run.state = state

        if is_lm:
            new_tokens = _DECODE.value or cfg.model.block_size - 1
            prompts = [""] * cfg.sample.num_samples
            sample = lambda: run.family.sample(state, jax.random.PRNGKey(0), prompts=prompts,
                                               max_new_tokens=new_tokens, temperature=1.0)
        else:
            sample = lambda: run.family.sample(state, jax.random.PRNGKey(0))
        sample()  # compile
        sample_s = _timed(sample)

    per_s = statistics.median(ours)
    unit = run.family.throughput_unit
    dtype = jnp.dtype(cfg.model.get("dtype", "float32")).name
    measured, measured_source = measured_peak_flops(dtype)
    # the timed matmul runs on one device; simulated CPU devices share its host
    measured_total = measured * (jax.process_count() if jax.default_backend() == "cpu"
                                 else jax.device_count())
    peak, peak_source, peak_note = device_peak(dtype)
    achieved = flops * per_s
    stats = jax.devices()[0].memory_stats() or {}
    result = {
        "config": config_flags.get_config_filename(flags.FLAGS["config"]),
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "jax": jax.__version__, "num_devices": jax.device_count(),
        "mesh": dict(run.mesh.shape),
        # the training state (parameters, optimizer state, EMA) each device holds, from the
        # arrays' shards; and the compiled step's scratch memory per device, from XLA
        "state_bytes_per_device": max(state_bytes.values()),
        "step_temp_bytes_per_device": _temp_bytes(step_fn),
        f"train_{unit}_per_s": per_s, f"train_{unit}_per_s_rounds": ours,
        f"train_{unit}_per_s_spread": spread(ours),
        "step_ms": 1000 * tokens_per_step / per_s,
        "first_step_compile_s": compile_s,
        f"model_flops_per_{unit[:-1]}": flops,
        "mfu": None if peak is None else achieved / peak, "peak_flops": peak,
        "peak_source": peak_source, "peak_note": peak_note,
        "mfu_vs_timed_matmul": achieved / measured_total, "timed_matmul_flops": measured,
        "timed_matmul_source": measured_source,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        # where the figures came from: commit, versions, XLA_FLAGS, devices, CPU model
        "provenance": provenance.describe(),
    }
    if is_lm:
        result.update(decode_tokens_per_s=len(prompts) * new_tokens / sample_s,
                      decode_batch=len(prompts))
    else:
        result.update(sample_s=sample_s, sample_count=cfg.sample.num_samples)
    if peer:
        result.update(peer_tokens_per_s=statistics.median(peer), peer_tokens_per_s_rounds=peer,
                      peer_tokens_per_s_spread=spread(peer),
                      speedup_vs_peer=statistics.median(np.array(ours) / np.array(peer)))
    if jax.process_index() == 0:
        rounds = spread(ours)
        print(f"train {unit}/s over {len(ours)} rounds: median {rounds['median']:.4g}, min "
              f"{rounds['min']:.4g}, max {rounds['max']:.4g} (spread "
              f"{100 * rounds['relative_spread']:.1f}% of the median)")
        print(json.dumps(result))


def _temp_bytes(compiled) -> int | None:
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
