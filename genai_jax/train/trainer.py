"""The one generic trainer: data, compilation with shardings, loop, checkpoints, metrics.

It knows nothing about any model: a family (`genai_jax.models.Family`) supplies pure `init`,
`train_step`, `eval_step` and `sample` functions over a state pytree, and the trainer does the
rest. Rerunning `train` with the same workdir resumes from the latest checkpoint, and the
resumed run is step for step the run that was never interrupted (batches are a function of
(seed, step); dropout keys are `fold_in(rng, step)`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from genai_jax import config as config_lib
from genai_jax import data as data_lib
from genai_jax import models, parallel
from genai_jax.config_checks import federated_enabled, privacy_enabled
from genai_jax.errors import UserError
from genai_jax.privacy import accounting
from genai_jax.train import provenance
from genai_jax.train.checkpoint import Checkpointer, abstract_with_shardings
from genai_jax.train.lock import WorkdirLock
from genai_jax.train.metrics import MetricWriter


class TrainingDiverged(UserError):
    pass


@dataclasses.dataclass
class Run:
    """A prepared run: everything `train` needs, also handy in notebooks and benchmarks."""

    config: Any
    workdir: pathlib.Path
    mesh: jax.sharding.Mesh
    rules: dict  # logical axis name -> mesh axes (`parallel.rules_from_config`)
    pipeline: data_lib.Pipeline
    family: models.Family
    state_shardings: Any
    batch_sharding: NamedSharding
    checkpointer: Checkpointer
    state: Any = None
    start_step: int = 0
    lock: WorkdirLock | None = None  # held by process 0 of a training run until `train` ends
    privacy: accounting.Plan | None = None  # a DP-SGD run's mechanism and accountant

    @property
    def steps_per_call(self) -> int:
        return self.config.train.steps_per_call

    @property
    def stacked_batch_sharding(self) -> NamedSharding:
        """Sharding of `[steps_per_call, batch, ...]`: the batch axis as `batch_sharding`."""
        return NamedSharding(self.mesh, PartitionSpec(None, *self.batch_sharding.spec))

    def global_batches(self, step: int) -> dict:
        """The batches of the `steps_per_call` steps from `step`, stacked: `[k, batch, ...]`
        (read at once; the training loop reads ahead with `batch_stream`)."""
        k = self.steps_per_call
        stacked = self.pipeline.train.steps(step, k, jax.process_index(),
                                            jax.process_count()).batch(k)[0]
        return parallel.global_batch(stacked, self.stacked_batch_sharding)

    def batch_stream(self, step: int, stop: int | None = None):
        """This process's stacked batches of the calls from `step` to `stop` (default
        `train.steps`), read ahead by the Grain pipeline (`data.workers`, `data.prefetch`): what
        `global_batches` gives call by call, without waiting for it."""
        return self.pipeline.train.iterator(
            step, self.config.train.steps if stop is None else stop,
            steps_per_call=self.steps_per_call,
            process_index=jax.process_index(), process_count=jax.process_count(),
            workers=self.config.data.workers, prefetch=self.config.data.prefetch)

    def on_mesh(self, fn):
        """`fn` traced with the run's activation shardings (`parallel.constrain` in model code)."""

        def traced(*args):
            with parallel.activations(self.mesh, self.rules):
                return fn(*args)

        return traced

    def jit_train_step(self):
        """`(state, stacked batches) -> (state, metrics [k])`: `steps_per_call` optimizer steps
        in one compiled `lax.scan`, which saves the per-call dispatch and lets XLA schedule
        across steps (README, "Where the CPU time goes": 0.61x -> 0.74x of the PyTorch peer for
        lm_char on 2 CPU cores at 10 steps per call)."""
        replicated = NamedSharding(self.mesh, PartitionSpec())
        steps = self.on_mesh(lambda state, batches: jax.lax.scan(self.family.train_step, state,
                                                                 batches))
        return jax.jit(steps, donate_argnums=0,
                       in_shardings=(self.state_shardings, self.stacked_batch_sharding),
                       out_shardings=(self.state_shardings, replicated))

    def jit_evaluate(self):
        """`(state, stacked eval batches [n, batch, ...]) -> metrics [n]`: every evaluation
        batch in one compiled `lax.scan`.

        One execution, not one per batch: XLA:CPU runs each device's share of a computation on
        a shared thread pool, and a cross-device all-reduce blocks its thread until every
        device has arrived. Independent executions dispatched back to back (one per eval
        batch, none waiting for another) occupy those threads in several rendezvous at once
        and deadlock (README, "Many devices"). Steps that depend on each other's outputs, like
        the training loop's, are ordered by their data and do not.
        """
        def scan(state, batches):
            return jax.lax.scan(lambda c, b: (c, self.family.eval_step(state, b)), None,
                                batches)[1]

        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(self.on_mesh(scan), out_shardings=replicated,
                       in_shardings=(self.state_shardings, self.stacked_batch_sharding))

    def stacked_eval_batches(self) -> dict:
        """The evaluation batches (`pipeline.eval`) stacked `[n, batch, ...]` on the mesh."""
        rows = [jax.tree.map(parallel.process_rows, b) for b in self.pipeline.eval]
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *rows)
        return parallel.global_batch(stacked, self.stacked_batch_sharding)

    def evaluate(self, evaluate_fn=None, step: int | None = None) -> dict[str, float]:
        """Mean metrics over the evaluation batches, then the family's sample-based metrics
        (which also write samples for `step`, default the run's current step)."""
        evaluate_fn = evaluate_fn or self.jit_evaluate()
        outs = jax.device_get(evaluate_fn(self.state, self.stacked_eval_batches()))
        metrics = self.family.summarize_eval({k: float(np.mean(v)) for k, v in outs.items()})
        if self.family.sample_eval is not None:
            step = self.start_step if step is None else step
            rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed + 2), step)
            metrics.update(self.family.sample_eval(self.state, rng,
                                                   str(self.workdir / "samples"), step))
        return metrics


def prepare(config, workdir: str | pathlib.Path, *, read_only: bool = False) -> Run:
    """Check everything, build data and model, restore or initialise the state.

    Every check that can fail on a researcher's mistake runs here, before compilation and before
    anything in `workdir` is written. `read_only` (sampling, evaluation) keeps the config and
    tokenizer saved by training as they are, creates no checkpoint directory, and does not ask
    the training batch to divide over the devices.
    """
    workdir = pathlib.Path(workdir)
    base = _init_from_config(config)
    if base is not None:
        config = config_lib.inherit(config, base, config.init_from)
    config_lib.validate(config)
    saved_config = workdir / "config.json"
    if saved_config.exists():
        diff = config_lib.incompatibilities(config_lib.load(saved_config), config)
        if diff:
            raise UserError(f"workdir {workdir} holds a run of another model/data config "
                            f"({'; '.join(diff[:3])}): use a new --workdir")
    mesh = parallel.make_mesh(config.mesh)
    rules = parallel.rules_from_config(config.mesh)
    batch_sharding = parallel.batch_sharding(mesh, rules)
    dp = parallel.data_parallel_size(mesh, rules)
    micro = config.train.batch_size // config.train.grad_accum_steps
    # (Poisson-sampled DP-SGD batches are padded to a size that divides, and so are a
    # federated round's client slots: see `multiple`.)
    poisson = privacy_enabled(config) and config.train.privacy.sampling == "poisson"
    federated = federated_enabled(config)
    if micro % dp and not read_only and not poisson and not federated:
        raise parallel.MeshError(
            f"train.batch_size={config.train.batch_size} (micro-batches of {micro}) does not "
            f"divide over the {dp} data-parallel devices (mesh data x fsdp)")
    eval_batch = config.eval.batch_size or config.train.batch_size
    if eval_batch % dp:
        raise parallel.MeshError(f"the evaluation batch of {eval_batch} (eval.batch_size, or "
                                 f"train.batch_size) does not divide over the {dp} "
                                 "data-parallel devices")
    parallel.check_process_rows(batch_sharding, eval_batch)
    # A DP-SGD batch of variable size is padded to a multiple of what it must divide into; a
    # federated round's clients are split over the data-parallel devices and the processes.
    chunk = config.train.privacy.per_example_chunk or 1
    multiple = (math.lcm(dp, jax.process_count()) if federated else
                config.train.grad_accum_steps * math.lcm(dp, chunk, jax.process_count()))
    pipeline = _build_data_in_turn(config, workdir, multiple)
    privacy = None
    if privacy_enabled(config):
        privacy = accounting.plan(config.train, pipeline.info["privacy_units"],
                                  config.train.federated.clients_per_round if federated else 0)
        pipeline.info["noise_multiplier"] = privacy.noise_multiplier
    family = models.build(config, pipeline.info)
    # The first write to the workdir (the checkpointer tidies up its directory) is the lock
    # holder's: a second training process is refused here, before it changes anything.
    lock = WorkdirLock(workdir)
    if jax.process_index() == 0 and not read_only:
        lock.acquire()
    try:
        run = _restore_or_init(config, workdir, mesh, rules, batch_sharding, pipeline, family,
                               read_only)
    except BaseException:
        lock.release()
        raise
    run.lock, run.privacy = lock, privacy
    if privacy is not None and jax.process_index() == 0 and not read_only:
        # The padded batch of Poisson sampling (federated: the round's client slots).
        cap = pipeline.info["federated"]["slots"] if federated else pipeline.train.batch_size
        (workdir / PRIVACY_FILE).write_text(json.dumps(
            {**dataclasses.asdict(privacy), "epsilon_after_all_steps": privacy.epsilon(),
             "sampling_rate": privacy.sampling_rate,
             "matches_accountant": privacy.matches_accountant, "batch_cap": cap,
             "cap_overflow_probability": data_lib.private.overflow_probability(
                 privacy.units, privacy.expected_batch, privacy.steps, cap)
             if privacy.sampling == "poisson" else None}, indent=2) + "\n")
    return run


PRIVACY_FILE = "privacy.json"  # a DP-SGD run's mechanism and the epsilon of all its steps


def _restore_or_init(config, workdir: pathlib.Path, mesh, rules, batch_sharding, pipeline,
                     family, read_only: bool) -> Run:
    """The Run of `prepare`, its state restored from the newest readable checkpoint or fresh."""
    rng = jax.random.PRNGKey(config.seed)
    abstract = jax.eval_shape(family.init, rng)
    shardings = parallel.state_shardings(abstract, mesh, rules)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save, create=not read_only)
    run = Run(config, workdir, mesh, rules, pipeline, family, shardings, batch_sharding,
              checkpointer)
    try:
        restored = checkpointer.restore_latest(abstract_with_shardings(abstract, shardings))
    except BaseException:
        checkpointer.close()
        raise
    start_from = lambda params, source: _start_from(family, params, source, rng, shardings)
    if restored is not None:
        _, run.state, meta = restored
        if meta.get("params_only"):  # an imported checkpoint: the optimizer starts afresh
            run.state = start_from(run.state, workdir)
        run.start_step = int(meta["data_step"])
        if run.start_step % config.train.steps_per_call:
            raise UserError(f"the checkpoint at step {run.start_step} is not a multiple of "
                            f"train.steps_per_call={config.train.steps_per_call}: resume with "
                            "a steps_per_call that divides it")
    elif config.init_from:
        run.state = start_from(_params_of(pathlib.Path(config.init_from), pipeline, mesh, rules),
                               config.init_from)
    else:
        # Created sharded: with FSDP no device ever holds the whole model.
        run.state = jax.jit(family.init, out_shardings=shardings)(rng)
    if jax.process_index() == 0 and not read_only:
        workdir.mkdir(parents=True, exist_ok=True)
        config_lib.save(config, workdir / "config.json")
        pipeline.save(workdir)
        provenance.record(workdir, run.start_step)
    return run


def _start_from(family, params, source, rng, shardings):
    """A fresh training state (optimizer, EMA) around `params` read from `source`."""
    if family.init_from_params is None:
        raise UserError(f"this model family cannot start from the parameters in {source}")
    return jax.jit(family.init_from_params, out_shardings=shardings)(params, rng)


def _init_from_config(config):
    """The saved config of the run `config.init_from` names, or None."""
    if not config.get("init_from"):
        return None
    path = pathlib.Path(config.init_from) / "config.json"
    if not path.is_file():
        raise UserError(f"init_from={config.init_from} is not a genai_jax workdir (no "
                        "config.json): train or import there first")
    return config_lib.load(path)


def _params_of(source: pathlib.Path, pipeline, mesh, rules):
    """The parameters a fine-tuning run starts from: those evaluated with in `source`'s newest
    checkpoint (its EMA when it keeps one), placed on this run's mesh."""
    base = config_lib.load(source / "config.json")
    family = models.build(base, pipeline.info)
    abstract = jax.eval_shape(family.init, jax.random.PRNGKey(0))
    shardings = parallel.state_shardings(abstract, mesh, rules)
    checkpointer = Checkpointer(source / "checkpoints", create=False)
    try:
        restored = checkpointer.restore_latest(abstract_with_shardings(abstract, shardings))
    finally:
        checkpointer.close()
    if restored is None:
        raise UserError(f"init_from={source} has no checkpoint to start from")
    _, state, meta = restored
    return state if meta.get("params_only") else family.export_params(state)


def _build_data_in_turn(config, workdir: pathlib.Path, batch_multiple: int
                        ) -> data_lib.Pipeline:
    """The data pipeline, built by process 0 before the others: preparing an embedded data set
    writes a TFDS data dir once, which processes sharing a file system must not race on. (If
    process 0 fails here, the others wait at the barrier until JAX's coordination service
    notices process 0 is gone and stops them; process 0's error line says why.)"""
    barrier = lambda: multihost_utils.sync_global_devices("genai_jax: process 0 built the data")
    if jax.process_index() > 0:
        barrier()
    pipeline = data_lib.build(config, models.modality(config.model.family), workdir,
                              batch_multiple)
    if jax.process_count() > 1 and jax.process_index() == 0:
        barrier()
    return pipeline


@contextlib.contextmanager
def _stop_on_signals():
    """SIGTERM/SIGINT (Ctrl-C) set a flag; the loop then checkpoints and returns cleanly.

    With several processes every one must stop at the same step (each checkpoint and collective
    needs them all), so there JAX's preemption service handles SIGTERM instead: a SIGTERM to
    any process makes all of them agree on the step to stop at
    (`multihost_utils.reached_preemption_sync_point`, asked after every call), and a SIGINT is
    passed on to it as a SIGTERM to this process, so Ctrl-C on any process stops them all at
    one step with a checkpoint too.
    """
    stop = {"signal": None}

    def handler(signum, frame):
        del frame
        stop["signal"] = signal.Signals(signum).name

    def forward_as_sigterm(signum, frame):
        del signum, frame
        os.kill(os.getpid(), signal.SIGTERM)

    if jax.process_count() == 1:
        handlers = {signal.SIGTERM: handler, signal.SIGINT: handler}
    else:
        handlers = {signal.SIGINT: forward_as_sigterm}
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def train(config, workdir: str | pathlib.Path, *, progress: bool = True,
          stop_at_step: int | None = None) -> Run:
    """Train `config` in `workdir` (resuming if it has checkpoints); returns the final Run.

    `stop_at_step` ends this call early (at the first multiple of `train.steps_per_call` at or
    after it), with a checkpoint, as a preemption would: the schedule and data still follow
    `train.steps`, and a later call resumes from there.
    """
    run = prepare(config, workdir)
    try:
        with _file_size_limit_as_error():
            _loop(run, progress, stop_at_step)
    finally:
        run.lock.release()
    return run


def _loop(run: Run, progress: bool, stop_at_step: int | None) -> None:
    cfg = run.config
    steps, log_every = cfg.train.steps, cfg.train.log_every
    writer = MetricWriter(run.workdir)
    is_main = jax.process_index() == 0
    # Examples of a step: a batch, or a federated round's (its padding slots not counted).
    examples = run.pipeline.info.get("examples_per_step", cfg.train.batch_size)
    tokens_per_step = examples * run.family.tokens_per_example
    throughput = f"train/{run.family.throughput_unit}_per_s"

    step = run.start_step
    if step >= steps:
        logging.info("workdir %s is already trained to step %d", run.workdir, step)
        writer.close()
        return
    t0 = time.perf_counter()
    k = run.steps_per_call
    train_step = run.jit_train_step().lower(run.state, run.global_batches(step)).compile()
    compile_s = time.perf_counter() - t0
    logging.info("compiled the train step in %.1f s", compile_s)
    evaluate_fn = run.jit_evaluate()
    bar = tqdm(total=steps, initial=step, disable=not (progress and is_main),
               dynamic_ncols=True, unit="step")
    pending: list[tuple[int, dict]] = []
    # The throughput window: training steps only (evaluation and checkpoint saves excluded).
    window_start, window_step = time.perf_counter(), step
    good_step = run.checkpointer.latest_step()
    with _stop_on_signals() as stop, contextlib.ExitStack() as cleanup:
        cleanup.callback(writer.close)
        cleanup.callback(bar.close)
        cleanup.callback(run.checkpointer.wait)  # a save in flight always completes
        stream = run.batch_stream(step)
        cleanup.callback(data_lib.loader.close, stream)
        data_wait = 0.0  # seconds this process waited for the pipeline, this log window
        while step < steps:
            t_wait = time.perf_counter()
            rows = next(stream)
            data_wait += time.perf_counter() - t_wait
            batches = parallel.global_batch(rows, run.stacked_batch_sharding)
            run.state, metrics = train_step(run.state, batches)
            step += k
            pending.append((step, metrics))
            if stop_at_step is not None and step >= stop_at_step:
                stop["signal"] = f"stop_at_step={step}"
            if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(
                    step // k):
                stop["signal"] = "SIGTERM or SIGINT (preemption, agreed by all processes)"
            stopping = stop["signal"]  # read once: a signal may land at any line below
            do_eval = step % cfg.eval.every == 0 or step == steps
            do_ckpt = step % cfg.checkpoint.every == 0 or step == steps or stopping
            do_log = step % log_every == 0 or do_eval or do_ckpt
            if do_log:
                # Fetching waits for every step dispatched so far: the window ends here.
                fetched = [(end - k + 1 + i, {name: m[name][i] for name in m})
                           for end, m in jax.device_get(pending) for i in range(k)]
                pending = []
                run.checkpointer.check()  # a failed save stops the run before anything else
                _check_finite(fetched, good_step, run.workdir)
                record = {f"train/{name}": float(np.mean([m[name] for _, m in fetched]))
                          for name in fetched[-1][1]}
                record[throughput] = (tokens_per_step * (step - window_step)
                                      / (time.perf_counter() - window_start))
                record["train/data_wait_ms"] = 1000 * data_wait / (step - window_step)
                data_wait = 0.0
                if window_step == run.start_step:
                    record["train/compile_s"] = compile_s
                if run.privacy is not None:
                    record["privacy/epsilon"] = run.privacy.epsilon(step)
                if do_eval:
                    t_eval = time.perf_counter()
                    record.update({f"eval/{name}": v
                                   for name, v in run.evaluate(evaluate_fn, step).items()})
                    record["eval/time_s"] = time.perf_counter() - t_eval
                writer.write(step, record)
                bar.set_postfix(loss=f"{record['train/loss']:.4f}",
                                per_s=f"{record[throughput]:.0f}", refresh=False)
            bar.update(k)
            if do_ckpt:
                # The pipeline's whole position: batches are a function of (seed, step).
                run.checkpointer.save(step, run.state, {"data_step": step})
                good_step = step
            if do_log:
                window_start, window_step = time.perf_counter(), step
            if stopping:
                logging.warning("%s: saved a checkpoint at step %d; rerun the same command to "
                                "resume", stopping, step)
                break
    run.start_step = step


@contextlib.contextmanager
def _file_size_limit_as_error():
    """A file-size limit (RLIMIT_FSIZE) makes a write fail with EFBIG, which the checkpointer
    reports as one line, instead of killing the process with SIGXFSZ."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGXFSZ, previous)


def _check_finite(fetched: list[tuple[int, dict]], good_step: int | None, workdir) -> None:
    for step, metrics in fetched:
        # A finite loss with non-finite gradients still leaves NaN parameters behind: every
        # metric (gradient norms included) must be finite.
        bad = sorted((k for k, v in metrics.items() if not np.all(np.isfinite(v))),
                     key=lambda k: (k != "loss", k))
        if bad:
            kept = ("no checkpoint was written yet" if good_step is None else
                    f"the last good checkpoint (step {good_step}) in {workdir} is intact")
            raise TrainingDiverged(
                f"the training {bad[0]} is {float(metrics[bad[0]])} at step {step}; stopped, and "
                f"{kept}: lower train.learning_rate or set train.grad_clip, then rerun")
