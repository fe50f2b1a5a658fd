"""Orbax checkpoints of the training state: periodic, asynchronous, atomic, keep the last N.

Orbax writes each step into a temporary directory and renames it when complete, so a crash or a
kill mid-save never leaves a half checkpoint that a restart would pick up.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, async_save: bool = True,
                 create: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        """Start saving `state` (a pytree of jax.Arrays) and `meta` (JSON) as `step`."""
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)),
                           force=True)

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Restore onto the shardings of `abstract_state` (ShapeDtypeStructs with `.sharding`),
        so a checkpoint written under one mesh loads under another."""
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_with_shardings(abstract_state, shardings):
    """ShapeDtypeStructs of `abstract_state` placed on `shardings` (same tree)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, shardings)
