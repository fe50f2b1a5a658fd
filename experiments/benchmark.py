"""Measure an experiment's training and sampling speed; the last line printed is one JSON object.

    python -m experiments.benchmark --config=experiments/configs/lm_char.py \\
        --config.data.path=../shared/data/tinyshakespeare.txt
    python -m experiments.benchmark --config=experiments/configs/diffusion_digits.py

Figures: training throughput (tokens/s for the LM, examples/s for image families) and step time
(median of `--rounds` timed rounds of `--steps` steps, in calls of `train.steps_per_call`, after
the first compiled call), first-step compile time, model FLOPs (LM: 6N + 12·L·T·D per token,
N = parameters without the position table; image families: XLA's cost analysis of the compiled
step, per example), MFU against the device's peak, sampling speed (LM: decode tokens/s with the
KV cache; images: seconds for `sample.num_samples` images), and peak memory where the platform
reports it.

The peak is *measured* (`peak_source`): the best time of a square matrix product in the model's
compute dtype (4096 on GPU/TPU, 1024 on CPU), so MFU reads as "fraction of what this device's
matmul unit really does", on any platform, with no spec sheet to trust.

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
from genai_jax.train import prepare

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 50, "timed training steps per round")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "timed rounds (alternated with the peer)")
_DECODE = flags.DEFINE_integer("decode_tokens", 0, "tokens to decode (0 = block_size - 1)")
_PEER = flags.DEFINE_string("peer", None, "path of torch_gpt_ref.py to alternate with")
flags.mark_flags_as_required(["config"])


def measured_peak_flops(dtype) -> tuple[float, str]:
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

        is_lm = models.modality(cfg.model.family) == "text"
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
    peak, peak_source = measured_peak_flops(jnp.dtype(cfg.model.get("dtype", "float32")))
    if is_lm:
        flops = model_flops_per_token(state.params, cfg)
    else:  # XLA's count for the whole compiled call: k steps of batch_size examples
        flops = step_fn.cost_analysis()["flops"] / (k * tokens_per_step)
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
        "step_ms": 1000 * tokens_per_step / per_s,
        "first_step_compile_s": compile_s,
        f"model_flops_per_{unit[:-1]}": flops,
        "mfu": flops * per_s / (peak * jax.device_count()), "peak_flops": peak,
        "peak_source": peak_source,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if is_lm:
        result.update(decode_tokens_per_s=len(prompts) * new_tokens / sample_s,
                      decode_batch=len(prompts))
    else:
        result.update(sample_s=sample_s, sample_count=cfg.sample.num_samples)
    if peer:
        result.update(peer_tokens_per_s=statistics.median(peer), peer_tokens_per_s_rounds=peer,
                      speedup_vs_peer=statistics.median(np.array(ours) / np.array(peer)))
    if jax.process_index() == 0:
        print(json.dumps(result))


def _temp_bytes(compiled) -> int | None:
    analysis = compiled.memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


def run():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
