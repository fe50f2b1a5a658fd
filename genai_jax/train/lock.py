"""One training process per workdir: an advisory lock on `workdir/train.lock`.

The lock is `flock`ed for as long as the run lives, so the kernel releases it when the process
dies, however it dies (`kill -9` included); the file keeps the holder's pid, host and start time
for the refusal line, and a file whose lock is free but whose text names a holder was left by a
run that did not end cleanly: it is taken over with a warning. Only process 0 of a multi-process
job takes it (the job's other processes are its own), so a second job on the same workdir is
refused by its process 0.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import pathlib
import socket

from absl import logging

from genai_jax.errors import UserError

LOCK_FILE = "train.lock"


class WorkdirBusy(UserError):
    pass


class WorkdirLock:
    def __init__(self, workdir: str | pathlib.Path):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise WorkdirBusy naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or "a process that has not written its name yet"
            os.close(fd)
            raise WorkdirBusy(f"workdir {self.path.parent} is being trained by another process "
                              f"({holder}): wait for it to end or stop it, or use another "
                              "--workdir") from None
        stale = _read(fd)
        if stale:
            logging.warning("taking over %s, left by a run that did not end cleanly (%s)",
                            self.path, stale)
        started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}"
                  .encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Clear the holder's name and drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()
