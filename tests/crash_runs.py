"""Train the tiny LM and kill this process with SIGKILL at a chosen point, for the crash tests.

    python tests/crash_runs.py TEXT_FILE WORKDIR POINT

(`experiments.train --config=tests/crash_runs.py:TEXT_FILE` trains the same config.)

POINT is where the process kills itself (SIGKILL: no handler, no cleanup, as `kill -9`):
  - `before_first_checkpoint`: right after logging step 5 (the first checkpoint is at 10);
  - `during_save`: inside the save of step 10, after Orbax wrote the temporary directory and
    before it renames it into place;
  - `after_save`: right after the checkpoint of step 10 is complete.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from orbax.checkpoint._src.path import atomicity  # noqa: E402

from genai_jax.train import checkpoint, metrics, train  # noqa: E402
from tests.conftest import tiny_lm_config  # noqa: E402  (tests/pallas has a conftest too)

CRASH_OVERRIDES = {"train.steps": 20, "train.log_every": 1, "checkpoint.every": 10,
                   "eval.every": 10}


def crash_config(text_file: str):
    return tiny_lm_config(**{"data.path": text_file, **CRASH_OVERRIDES})


get_config = crash_config  # `--config=tests/crash_runs.py:TEXT_FILE` for experiments.train


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    if point == "before_first_checkpoint":
        write = metrics.MetricWriter.write

        def write_then_die(self, step, record):
            write(self, step, record)
            if step == 5:
                die()

        metrics.MetricWriter.write = write_then_die
    elif point == "during_save":
        async def finalize_never(self, *args, **kwargs):
            die()

        atomicity.AtomicRenameTemporaryPath.finalize = finalize_never
    elif point == "after_save":
        wait = checkpoint.Checkpointer.wait

        def wait_then_die(self):
            saving = self._saving
            wait(self)
            if saving == 10:
                die()

        checkpoint.Checkpointer.wait = wait_then_die
        save = checkpoint.Checkpointer.save

        def save_and_finish(self, step, state, meta):
            save(self, step, state, meta)
            self.wait()

        checkpoint.Checkpointer.save = save_and_finish
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    text_file, workdir, point = sys.argv[1:]
    arm(point)
    train(crash_config(text_file), workdir, progress=False)
    raise SystemExit("the run was not killed")
