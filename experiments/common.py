"""What every experiment entry point shares: user errors as one line, the saved config, the
multi-host start and the mesh of a run read back from its workdir."""

from __future__ import annotations

import functools
import os
import pathlib
import sys
import threading
import traceback

import jax
from absl import flags, logging
from ml_collections import config_flags

from experiments.cli import parse_flags  # noqa: F401 (re-exported: every entry point's)
from genai_jax import config as config_lib
from genai_jax import parallel
from genai_jax.errors import UserError


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


# Multi-host runs: every process runs the same command with its own --process_id (or the
# environment variables a launcher sets), or with --cluster_detect under SLURM, Open MPI,
# Kubernetes or on a Cloud TPU pod slice.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
    "host:port of process 0 for a multi-process run (env JAX_COORDINATOR_ADDRESS)")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", _env_int("JAX_NUM_PROCESSES"),
    "number of processes of a multi-process run (env JAX_NUM_PROCESSES)")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", _env_int("JAX_PROCESS_ID"),
    "this process's index in [0, num_processes) (env JAX_PROCESS_ID)")
_CLUSTER_DETECT = flags.DEFINE_bool(
    "cluster_detect", False, "start jax.distributed with JAX's detection of the cluster "
    "(SLURM, Open MPI, Kubernetes, Cloud TPU) instead of the three flags above")


# Launchers that start one process per task: several tasks without a distributed start would be
# independent runs writing one workdir.
_LAUNCHER_TASKS = {"SLURM_NTASKS": "SLURM", "OMPI_COMM_WORLD_SIZE": "Open MPI"}


def start_distributed() -> None:
    """Connect to the other processes of a multi-process run (nothing for one process)."""
    started = parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  cluster_detect=_CLUSTER_DETECT.value)
    if started:
        parallel.stop_when_another_process_fails(_exit_with_error)
    for variable, launcher in _LAUNCHER_TASKS.items():
        if not started and (_env_int(variable) or 1) > 1:
            raise UserError(f"{launcher} started {os.environ[variable]} tasks but this one is not "
                            "connected to the others: pass --cluster_detect (or "
                            "--coordinator_address, --num_processes and --process_id)")


def define_mesh_flag():
    return flags.DEFINE_string(
        "mesh", None, "DATA,FSDP,TENSOR mesh to load the run onto, e.g. 1,1,1 for one device "
        "(default: the run's own mesh when the devices fit it, else every device on fsdp)")


def with_mesh(config, mesh_flag: str | None):
    """`config` (read from a workdir) with the mesh of `--mesh`, or, when the run's own mesh
    does not fit the devices here (a checkpoint of 8 devices sampled on one), every device on
    the fsdp axis (each holds a share of the model, as it may have needed to fit): checkpoints
    restore onto any mesh."""
    if mesh_flag:
        try:
            sizes = [int(v) for v in mesh_flag.split(",")]
        except ValueError:
            sizes = []
        if len(sizes) != len(parallel.AXES):
            raise UserError(f"--mesh={mesh_flag}: give three sizes DATA,FSDP,TENSOR, e.g. 1,1,8")
    else:
        try:
            parallel.mesh_shape(config.mesh, jax.device_count())
            return config
        except parallel.MeshError as e:
            logging.warning("%s: loading the run with every device on the fsdp axis", e)
            sizes = [1, -1, 1]
    with config.unlocked():
        config.mesh.update(dict(zip(parallel.AXES, sizes, strict=True)))
    return config


def user_errors_as_one_line(main):
    """Print a UserError as `error: ...` on stderr and exit 2 (no traceback)."""

    @functools.wraps(main)
    def wrapped(argv):
        logging.get_absl_logger().addFilter(_no_library_tracebacks)
        if not isinstance(sys.stderr, _Stderr):
            sys.stderr = _Stderr(sys.stderr)
        try:
            return main(argv)
        except UserError as e:
            _exit_with_error(str(e), hard=parallel.publish_error(str(e)))
        except Exception as e:  # a bug: its traceback here, its line to the other processes
            if not parallel.publish_error(f"{type(e).__name__}: {e}"):
                raise
            traceback.print_exc()
            _exit_with_error("see the traceback above")

    return wrapped


def _exit_with_error(line: str, hard: bool = True) -> None:
    """`error: line` on stderr, on a line of its own and last, exit status 2. `hard` ends the
    process at once, as every process of a multi-process run that fails must: the others are
    leaving too, so JAX's own exit (a shutdown barrier of all processes) would abort, and a
    process that heard of another's failure has its main thread blocked in a collective."""
    if isinstance(sys.stderr, _Stderr):
        sys.stderr.last_word(f"error: {line}\n")
    else:
        sys.stderr.write(f"error: {line}\n")
    sys.stderr.flush()
    if hard:
        os._exit(2)
    sys.exit(2)


class _Stderr:
    """sys.stderr, knowing whether its last write ended a line, so that the `error: ...` line
    starts one and nothing follows it. TensorStore's threads print tracebacks of their own piece
    by piece after a failed write ("Event loop is closed", upstream noise), which could
    otherwise cut the error line in two or bury it."""

    def __init__(self, stream):
        self._stream, self._lock = stream, threading.Lock()
        self._at_line_start, self._only = True, None

    def write(self, text: str) -> int:
        with self._lock:
            if self._only is not None and threading.get_ident() != self._only:
                return len(text)  # after the error line: other threads' noise is dropped
            if text:
                self._at_line_start = text.endswith("\n")
            return self._stream.write(text)

    def last_word(self, text: str) -> None:
        """Write `text` at the start of a line; from now on only this thread writes."""
        with self._lock:
            self._only = threading.get_ident()
            self._stream.write(text if self._at_line_start else "\n" + text)
            self._at_line_start = True

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _no_library_tracebacks(record) -> bool:
    """Orbax logs a failed background save with its traceback before the checkpointer raises
    it as one CheckpointWriteError line: keep Orbax's message, drop the traceback."""
    if "/orbax/" in record.pathname:
        record.exc_info, record.exc_text = None, None
    return True


def load_workdir_config(workdir: str):
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise UserError(f"--workdir {workdir} has no config.json: train there first "
                        "(python -m experiments.train --config=... --workdir=...)")
    return config_lib.load(path)


def config_from_flag(holder):
    """The value of a `config_flags.DEFINE_config_file` flag (its file loads lazily)."""
    path = config_flags.get_config_filename(flags.FLAGS[holder.name])
    if not pathlib.Path(path.split(":")[0]).exists():
        raise UserError(f"config file {path} does not exist (see experiments/configs/)")
    try:
        config = holder.value
        config.seed  # noqa: B018 - a file that failed to load raises on first use
        return config
    except OSError as e:
        raise UserError(" ".join(str(e).split())) from None
