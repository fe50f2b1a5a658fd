"""Where a run's figures came from: code commit, library versions, XLA flags, devices, CPU.

`record(workdir, step)` appends one JSON line to `workdir/provenance.jsonl` each time a run
starts or resumes (a resumed run may run on other code or another machine than its start);
`describe()` is the same object, for benchmarks that print their figures instead.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess

import jax

PROVENANCE_FILE = "provenance.jsonl"
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def describe() -> dict:
    """This process's code, libraries, XLA flags, devices and CPU, as JSON-able values."""
    device = jax.devices()[0]
    return {
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        **_commit(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in _PACKAGES},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
    }


def record(workdir: str | pathlib.Path, step: int) -> None:
    """Append `describe()` with the step this run starts from to the workdir's log."""
    with (pathlib.Path(workdir) / PROVENANCE_FILE).open("a") as f:
        f.write(json.dumps({"start_step": int(step), **describe()}) + "\n")


def cpu_model() -> str:
    """The host CPU's model name (lscpu's "Model name"), or the platform's best guess."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _commit() -> dict:
    """The git commit of the genai_jax source tree and whether it had uncommitted changes (an
    installed copy outside a checkout has neither)."""
    root = pathlib.Path(__file__).resolve().parents[2]
    git = lambda *args: subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                       text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return {"commit": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return {"commit": head.stdout.strip(), "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}
