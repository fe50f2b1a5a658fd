"""Orbax checkpoints of the training state: periodic, asynchronous, atomic, keep the last N.

Crash safety, layer by layer:
- Orbax writes each step into a temporary directory and renames it when complete, so a kill
  mid-save leaves no step directory that a restart would pick up (leftover temporary
  directories are removed when the next run opens the directory).
- A step directory that is there but cannot be read (a file cut short or missing) is moved to
  `checkpoints_unreadable/` with one warning line, and the run resumes from the newest step
  that reads; when none does, it stops with one error line instead of starting afresh over a
  workdir that has checkpoints.
- A save that fails (disk full, I/O error, a file-size limit) raises `CheckpointWriteError` at
  the next save or at `wait`; the previous checkpoints are untouched (Orbax deletes old steps
  only after a new one is finalised).

A checkpoint holds the whole training state (item `state`), or only the model's parameters
(item `params`, with `"params_only": true` in its metadata): what `experiments.import_checkpoint`
writes at step 0, about a third of a state with Adam's moments. A run restored from one starts
its optimizer afresh (`Family.init_from_params`).
"""

from __future__ import annotations

import contextlib
import pathlib
import shutil

import jax
import orbax.checkpoint as ocp
from absl import logging

from genai_jax.errors import UserError

UNREADABLE_DIR = "checkpoints_unreadable"


class CheckpointError(UserError):
    pass


class CheckpointWriteError(CheckpointError):
    pass


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True,
                 create: bool = True, save_concurrent_bytes: int | None = None,
                 chunk_bytes: int | None = None):
        """`save_concurrent_bytes` bounds the bytes Orbax copies and writes at once (at least
        the largest array's) and `chunk_bytes` the size of the chunks TensorStore encodes and
        writes: a save then holds about the largest array beyond the state, not a second
        copy of it (the import of a checkpoint saves this way)."""
        self.directory = pathlib.Path(directory).absolute()
        self._writable = create  # read-only users (sampling, evaluation) never move anything
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=create)
        handlers = None
        if save_concurrent_bytes is not None:  # Orbax takes GB (a fraction works), + rounding
            limited = lambda: ocp.StandardCheckpointHandler(
                save_concurrent_gb=(save_concurrent_bytes + 2**20) / 1e9)
            handlers = {"state": limited(), "params": limited(),
                        "meta": ocp.JsonCheckpointHandler()}
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)
        self._chunk_bytes = chunk_bytes
        self._saving: int | None = None  # the step of the save in flight, if any
        self._last_saved: int | None = self._manager.latest_step()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict, *, params_only: bool = False) -> None:
        """Start saving `state` (a pytree of jax.Arrays; the parameters alone with
        `params_only`) and `meta` (JSON) as `step`; a failure of the previous save is raised
        here."""
        self.wait()
        self._saving = step
        item = "params" if params_only else "state"
        meta = {**meta, "params_only": True} if params_only else meta
        save_args = None if self._chunk_bytes is None else jax.tree.map(
            lambda _: ocp.SaveArgs(chunk_byte_size=self._chunk_bytes), state)
        with self._write_errors():
            self._manager.save(step, args=ocp.args.Composite(
                **{item: ocp.args.StandardSave(state, save_args=save_args)},
                meta=ocp.args.JsonSave(meta)), force=True)
        if not self._manager.is_saving_in_progress():
            self.wait()  # synchronous saves: check at once

    def check(self) -> None:
        """Raise CheckpointWriteError now if the save in flight has already failed (does not
        wait for one still writing), so a run stops soon after, not at its next save."""
        if self._saving is not None and not self._manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight is complete; raise CheckpointWriteError if it failed."""
        if self._saving is None:
            return
        with self._write_errors():
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
            if self._manager.latest_step() != self._saving:  # Orbax skipped its finalisation
                raise OSError("the checkpoint was not completed (see the log above)")
        self._last_saved, self._saving = self._saving, None

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Restore onto the shardings of `abstract_state` (ShapeDtypeStructs with `.sharding`),
        so a checkpoint written under one mesh loads under another. A parameters-only
        checkpoint (meta `params_only`) gives the parameters, restored onto
        `abstract_state.params`."""
        meta = self._manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]
        item, target = (("params", abstract_state.params) if meta.get("params_only") else
                        ("state", abstract_state))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.StandardRestore(target)}))
        return restored[item], meta

    def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
        """`(step, state, meta)` of the newest checkpoint that reads, None when there is none.

        Unreadable newer steps are moved aside (one warning each); if steps exist and none
        reads, raise CheckpointError rather than let the caller start afresh."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        failures = []
        for step in steps:
            try:
                state, meta = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any failure to read means "unreadable"
                failures.append(f"step {step}: {_first_line(e)}")
                continue
            for bad in steps[:steps.index(step)]:
                moved = self._move_aside(bad)
                logging.warning("the checkpoint of step %d in %s cannot be read (%s); %s step %d",
                                bad, self.directory, failures[steps.index(bad)],
                                f"moved it to {UNREADABLE_DIR} and resumed from" if moved else
                                "using", step)
            self._last_saved = step
            return step, state, meta
        if failures:
            raise CheckpointError(
                f"no checkpoint in {self.directory} can be read ({'; '.join(failures[:2])}): "
                "restore a good copy, or move the checkpoints directory away to start afresh")
        return None

    def close(self) -> None:
        self._manager.close()

    def _move_aside(self, step: int) -> bool:
        """Move an unreadable step out of the way of new saves (process 0 of a training run)."""
        if not self._writable:
            return False
        if jax.process_index() == 0:
            target = self.directory.parent / UNREADABLE_DIR
            target.mkdir(exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target / str(step)))
        self._manager.reload()
        return True

    @contextlib.contextmanager
    def _write_errors(self):
        """Any failure of a save as one CheckpointWriteError line."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - disk full, EFBIG, tensorstore errors...
            step, self._saving = self._saving, None
            kept = ("no earlier checkpoint exists" if self._last_saved is None else
                    f"the checkpoint of step {self._last_saved} is intact")
            raise CheckpointWriteError(f"could not write the checkpoint of step {step} to "
                                       f"{self.directory}: {_first_line(error)}; {kept}"
                                       ) from error


def _first_line(error: BaseException) -> str:
    """The gist of `error` for a one-line message (TensorStore appends pages of its spec)."""
    text = str(error).split(". See full TensorStore details")[0].strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:200]


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs of `abstract_state` placed on `shardings` (same tree)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)
