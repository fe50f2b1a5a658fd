"""Measure an experiment's training and sampling speed; the last line printed is one JSON object.

    python -m experiments.benchmark --config=experiments/configs/lm_char.py \\
        --config.data.path=../shared/data/tinyshakespeare.txt
    python -m experiments.benchmark --config=experiments/configs/diffusion_digits.py

Figures: training throughput (tokens/s for the LM, examples/s for image families) over
`--rounds` timed rounds of `--steps` steps (in calls of `train.steps_per_call`, after the first
compiled call): the median, and the spread (each round, min, max, (max - min) / median) since
one shared machine's rounds differ; step time; first-step compile time; model FLOPs (LM:
`flops.lm_training_flops_per_token`, 6N + 12·L·T·D per token for N matmul weights (no lookup
tables), 4 instead of 6 per frozen weight of a LoRA run's base; image families: XLA's
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
`--peer=../shared/bench/hf_train_ref.py` (Hugging Face transformers + peft) does the same for a
fine-tuning config: it trains the Hugging Face checkpoint this run's base was imported from
(`hf_import.json`, followed down the `init_from` chain), `--mode lora` when
`model.lora.rank > 0` (q/k/v/o adapters) and `--mode full` otherwise, at our context and batch:

    python -m experiments.benchmark --config=experiments/configs/finetune_lora.py \\
        --config.init_from=runs/bench_llama --config.data.path=../shared/data/tinyshakespeare.txt \\
        --config.train.batch_size=8 --peer=../shared/bench/hf_train_ref.py --steps=20 --rounds=5

(`make bench-finetune` builds that base and runs LoRA and full.) The JSON also has the trained
and frozen parameter counts and the optimizer state's bytes per device.
"""

from __future__ import annotations

import json
import pathlib
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
from genai_jax.errors import UserError
from genai_jax.evaluation import flops as flops_lib
from genai_jax.interop import huggingface as hf
from genai_jax.models.lm import lora_targets
from genai_jax.models.transformer import ATTENTION_PROJECTIONS
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


def _sizes(tree) -> dict[str, int]:
    """Leaf sizes of a parameter state by top-level name ("embed", "blocks", ...)."""
    out: dict[str, int] = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        name = getattr(path[0], "key", getattr(path[0], "name", str(path[0])))
        out[name] = out.get(name, 0) + x.size
    return out


def model_flops_per_token(state, cfg) -> float:
    """Training FLOPs per token of the LM state `state` (`flops.lm_training_flops_per_token`):
    6 per trained matmul weight, 4 per frozen one (a LoRA base), plus attention. Lookups are no
    matmuls: the position table, and the token table when the head is a separate matrix."""
    lookups = {"pos_embed"} | ({"embed"} if not cfg.model.tie_embeddings else set())
    count = lambda tree: sum(v for k, v in _sizes(tree).items() if k not in lookups)
    trained, frozen = count(state.params), count(state.frozen or {})
    m = cfg.model
    head_dim = m.head_dim or m.embed_dim // m.num_heads
    return flops_lib.lm_training_flops_per_token(
        trained + frozen, frozen_params=frozen, num_layers=m.num_layers, context=m.block_size,
        attention_dim=m.num_heads * head_dim)


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


# The two PyTorch peers, told apart by file name: a nanoGPT-style GPT of the config's shape, and
# Hugging Face transformers (+ peft) fine-tuning the checkpoint the run's base was imported from.
GPT_PEER, HF_PEER = "torch_gpt_ref.py", "hf_train_ref.py"


def imported_from(workdir: str) -> pathlib.Path | None:
    """The Hugging Face directory the weights of `workdir` came from: its own import record, or
    that of the run its `init_from` names, followed down the chain; None when there is none."""
    seen, path = set(), pathlib.Path(workdir)
    while path not in seen:
        seen.add(path)
        record = path / hf.IMPORT_FILE
        if record.is_file():
            return pathlib.Path(json.loads(record.read_text())["hf_dir"])
        saved = path / "config.json"
        source = json.loads(saved.read_text()).get("init_from") if saved.is_file() else ""
        if not source:
            return None
        path = pathlib.Path(source)
    return None


def peer_command(path: str, cfg) -> list[str]:
    """The command line of the peer at `path` for the run config `cfg` (its inherited model
    keys); a peer that cannot train this run's model is refused with one line."""
    name, m = pathlib.Path(path).name, cfg.model
    if not pathlib.Path(path).is_file():
        raise UserError(f"--peer {path} does not exist")
    common = [sys.executable, path, "--steps", str(_STEPS.value),
              "--batch", str(cfg.train.batch_size)]
    if name == GPT_PEER:
        return common + ["--block", str(m.block_size), "--layers", str(m.num_layers),
                         "--heads", str(m.num_heads), "--dim", str(m.embed_dim)]
    if name == HF_PEER:
        hf_dir = imported_from(cfg.init_from) if cfg.get("init_from") else None
        if hf_dir is None or not hf_dir.is_dir():
            raise UserError(f"--peer {path} trains the Hugging Face checkpoint the run starts "
                            "from: pass --config.init_from=W, W imported with "
                            "experiments.import_checkpoint (or fine-tuned from such a run)"
                            + (f"; {hf_dir} is gone" if hf_dir is not None else ""))
        if m.lora.rank and lora_targets(m.lora.targets, m.mlp) != ATTENTION_PROJECTIONS:
            raise UserError(f"--peer {path} puts LoRA adapters on q, k, v and o only: run with "
                            f"model.lora.targets='attention' (not {m.lora.targets!r})")
        if m.lora.rank and m.lora.modules_to_save:
            raise UserError(f"--peer {path} trains the adapters alone: run without "
                            f"model.lora.modules_to_save (not {m.lora.modules_to_save!r})")
        return common + ["--mode", "lora" if m.lora.rank else "full", "--hf_dir", str(hf_dir),
                         "--ctx", str(m.block_size), "--rank", str(m.lora.rank or 8)]
    raise UserError(f"--peer {path}: unknown peer; the benchmark runs {GPT_PEER} (the GPT "
                    f"configs) and {HF_PEER} (fine-tuning configs)")


def run_peer(command: list[str]) -> dict:
    """The peer's JSON line (its last line of output)."""
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the peer {' '.join(command)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@user_errors_as_one_line
def main(argv):
    del argv
    start_distributed()
    cfg = config_from_flag(_CONFIG)
    logging.set_verbosity(logging.WARNING)
    if _PEER.value:
        peer_command(_PEER.value, cfg)  # refused here, before anything compiles
    with tempfile.TemporaryDirectory() as workdir:
        run = prepare(cfg, workdir)
        cfg = run.config  # with the model keys inherited from `init_from`
        k = run.steps_per_call
        calls = max(1, _STEPS.value // k)
        batch = run.global_batches(0)
        t0 = time.perf_counter()
        step_fn = run.jit_train_step().lower(run.state, batch).compile()
        compile_s = time.perf_counter() - t0
        state_bytes = parallel.bytes_per_device(run.state)
        opt_bytes = parallel.bytes_per_device(run.state.opt_state)
        trainable = sum(x.size for x in jax.tree.leaves(run.state.params))
        frozen = sum(x.size for x in jax.tree.leaves(run.state.frozen or {}))
        is_lm = models.modality(cfg.model.family) == "text"
        flops = (model_flops_per_token(run.state, cfg) if is_lm
                 else train_flops_per_example(run))
        state, metrics = step_fn(run.state, batch)
        jax.block_until_ready(metrics)
        tokens_per_step = cfg.train.batch_size * run.family.tokens_per_example
        ours, peer, peer_out, waits = [], [], {}, []
        command = peer_command(_PEER.value, cfg) if _PEER.value else None
        # The timed steps read their batches as training does: through the Grain pipeline
        # (data.workers, data.prefetch), started here, its wait timed apart.
        stream = run.batch_stream(k, k + _ROUNDS.value * calls * k)
        for _ in range(_ROUNDS.value):
            wait, t0 = 0.0, time.perf_counter()
            for _ in range(calls):
                t_wait = time.perf_counter()
                rows = next(stream)
                wait += time.perf_counter() - t_wait
                b = parallel.global_batch(rows, run.stacked_batch_sharding)
                state, metrics = step_fn(state, b)
            jax.block_until_ready((state, metrics))
            ours.append(calls * k * tokens_per_step / (time.perf_counter() - t0))
            waits.append(1000 * wait / (calls * k))
            if command:
                peer_out = run_peer(command)
                peer.append(peer_out["train_tokens_per_s"])
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
    if peak is not None and measured_total > peak:
        # e.g. a virtual machine whose /proc/cpuinfo gives the base clock, not the boost clock
        peak_note += (f"; the timed matmul ({measured_total / 1e9:.0f} GFLOP/s) beat this peak, "
                      "so the peak is too low and mfu reads high: see mfu_vs_timed_matmul")
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
        # what the optimizer trains (with LoRA: the adapters; the base is frozen) and the
        # optimizer's state (AdamW moments) each device holds
        "trainable_params": trainable, "frozen_params": frozen,
        "opt_state_bytes_per_device": max(opt_bytes.values(), default=0),
        f"train_{unit}_per_s": per_s, f"train_{unit}_per_s_rounds": ours,
        # milliseconds per step the loop waited for the input pipeline (median over rounds)
        "data_wait_ms": statistics.median(waits),
        f"train_{unit}_per_s_spread": spread(ours),
        "step_ms": 1000 * tokens_per_step / per_s,
        "first_step_compile_s": compile_s,
        f"model_flops_per_{unit[:-1]}": flops, "model_flops_per_s": achieved,
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
                      speedup_vs_peer=statistics.median(np.array(ours) / np.array(peer)),
                      # the same model's FLOPs per token at the peer's rate
                      peer_model_flops_per_s=flops * statistics.median(peer),
                      peer_command=" ".join(command[1:]),
                      peer_versions={k: peer_out[k] for k in ("torch", "transformers", "threads")
                                     if k in peer_out},
                      peer_trainable_params=peer_out.get("trainable_params"))
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
