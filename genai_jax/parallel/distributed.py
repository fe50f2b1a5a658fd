"""Multi-host start: JAX's distributed runtime, from flags, environment variables or the cluster.

Every process of a multi-host run runs the same command; `initialize` connects it to the others
before JAX first touches a device, after which `jax.devices()` lists the devices of all
processes and one mesh spans them. On the CPU, JAX's collectives across processes go through
gloo (its default), so several processes on one machine simulate several hosts.
"""

from __future__ import annotations

import atexit
import threading

import jax
from jax._src import distributed as jax_distributed  # its client's key-value store

from genai_jax.errors import UserError


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cluster_detect: bool = False) -> bool:
    """Start `jax.distributed` for a run of several processes; returns whether it did.

    Either give all three of `coordinator_address` (`host:port` of process 0), `num_processes`
    and `process_id`, or set `cluster_detect` to let JAX read them from the cluster's launcher
    (SLURM, Open MPI, Kubernetes, Cloud TPU pod slices). With none of them, or one process, it
    does nothing: a single-process run needs no distributed runtime.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    if cluster_detect:
        jax.distributed.initialize(**given)
        return True
    if all(v is None for v in given.values()) or num_processes == 1:
        return False
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise UserError(f"a multi-process run needs --coordinator_address, --num_processes and "
                        f"--process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
                        f"JAX_PROCESS_ID); missing: {', '.join(missing)}")
    if not 0 <= process_id < num_processes:
        raise UserError(f"--process_id={process_id} must be in [0, --num_processes="
                        f"{num_processes})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True


# --- one process's error stops them all ----------------------------------------------------
# A process that fails leaves the others blocked in their next collective until the
# coordination service's heartbeat timeout (minutes). Instead the failing process publishes its
# error line in the service's key-value store, where a thread of every other process looks for
# it: each prints the line and exits at once, and acknowledges first, so that a failing
# process 0 (which hosts the service) stays up until the others have read it.
_ERROR_KEY = "genai_jax/error"
_ACK_WAIT_MS = 10_000


def _client():
    return jax_distributed.global_state.client


def publish_error(message: str) -> bool:
    """Tell every other process of a multi-process run that this one failed with `message`,
    and wait (briefly) until they have read it; returns whether this is a multi-process run
    (nothing to tell for a single process)."""
    client = _client()
    if client is None or jax.process_count() == 1:
        return False
    me = jax.process_index()
    try:
        client.key_value_set(_ERROR_KEY, f"{me}\n{message}")
    except Exception:  # noqa: BLE001 - another process published first; it speaks for the run
        return True
    for other in range(jax.process_count()):
        if other != me:
            try:
                client.blocking_key_value_get(f"{_ERROR_KEY}/read_by/{other}", _ACK_WAIT_MS)
            except Exception:  # noqa: BLE001 - that process is gone or stuck: stop waiting
                pass
    return True


def stop_when_another_process_fails(stop) -> None:
    """Start a thread that calls `stop(line)` when another process publishes an error
    (`publish_error`); `stop` should end this process. Nothing for a single process.

    The thread polls once a second rather than blocking in the client: a thread inside a C++
    call when the interpreter exits aborts the process. It is stopped at exit (before JAX
    shuts its distributed client down: atexit runs handlers in reverse order)."""
    client = _client()
    if client is None or jax.process_count() == 1:
        return
    me, done = jax.process_index(), threading.Event()

    def watch():
        while not done.wait(1.0):
            try:
                value = client.key_value_try_get(_ERROR_KEY)
            except Exception:  # noqa: BLE001 - not there (yet), or the service is gone
                continue
            sender, _, message = value.partition("\n")
            if int(sender) == me:
                return
            try:
                client.key_value_set(f"{_ERROR_KEY}/read_by/{me}", "1")
            except Exception:  # noqa: BLE001
                pass
            stop(f"process {sender} failed: {message}")
            return

    thread = threading.Thread(target=watch, name="genai_jax-error-watch", daemon=True)
    thread.start()

    def end():
        done.set()
        thread.join(timeout=5)

    atexit.register(end)
