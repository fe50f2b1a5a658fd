"""Multi-host start: JAX's distributed runtime, from flags, environment variables or the cluster.

Every process of a multi-host run runs the same command; `initialize` connects it to the others
before JAX first touches a device, after which `jax.devices()` lists the devices of all
processes and one mesh spans them. On the CPU, JAX's collectives across processes go through
gloo (its default), so several processes on one machine simulate several hosts.
"""

from __future__ import annotations

import jax

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
