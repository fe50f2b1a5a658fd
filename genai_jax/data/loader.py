"""Training batches on Grain: a data set's examples -> this process's rows of each global batch
-> batches -> stacks of `train.steps_per_call` batches, read ahead by `data.workers` worker
processes (0: threads of the training process) holding `data.prefetch` stacks each.

A data set is a Grain `MapDataset` of examples (dicts of numpy arrays) in which example `i` is
row `i % B` of the global batch of step `i // B` (B = `train.batch_size`), a pure function of
(seed, i): Grain's random transformations draw from a generator seeded by (seed, index), its
`shuffle` is a seeded permutation per epoch, and the windows of a token stream are drawn by
`lm_batches.uniform_ints(seed, i)`, a batch at a time. The batches of a step therefore do not
depend on what was read before it, on how many workers read them, or on how many hosts share
them: a resumed run (with any number of workers, on any number of hosts with the same global
batch) sees exactly the batches of an uninterrupted one. The pipeline's whole position is the step,
which every checkpoint holds (`data_step`).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator

import grain
import numpy as np

from genai_jax.errors import DataError

ENDLESS = sys.maxsize  # the length of a data set drawn at random, without epochs
MIN_SHM_BYTES = 1 << 20


class HostRows(grain.MapDataset):
    """Element `k`: row `process_index * b + k % b` of the global batch of step
    `first_step + k // b`, where `b = batch_size // process_count` (a process's contiguous share
    of each global batch, as `parallel.process_rows` cuts it)."""

    def __init__(self, parent: grain.MapDataset, batch_size: int, first_step: int,
                 num_steps: int, process_index: int = 0, process_count: int = 1):
        super().__init__(parent)
        if batch_size % process_count:
            raise DataError(f"a global batch of {batch_size} does not split over "
                            f"{process_count} processes")
        self._global, self._first, self._steps = batch_size, first_step, num_steps
        self._local = batch_size // process_count
        self._offset = process_index * self._local

    def __len__(self) -> int:
        return self._steps * self._local

    def __str__(self) -> str:
        return f"HostRows(first_step={self._first}, rows={self._offset}+{self._local})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._example(index)]

    def _example(self, index: int) -> int:
        step, row = divmod(index, self._local)
        return (self._first + step) * self._global + self._offset + row

    def rows(self, indices) -> dict:
        """Elements `indices` stacked, read together by the parent's `rows`."""
        return self._parent.rows([self._example(i) for i in indices])


class ReadTogether(grain.MapDataset):
    """Element `k`: elements `[k * size, (k + 1) * size)` of `parent`, stacked, read in one call
    of `parent.rows(indices)`: what a data set defines when it reads a batch faster at once than
    example by example (windows of a token stream draw all their offsets together)."""

    def __init__(self, parent: grain.MapDataset, size: int):
        super().__init__(parent)
        self._size = size

    def __len__(self) -> int:
        return len(self._parent) // self._size

    def __str__(self) -> str:
        return f"ReadTogether(size={self._size})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent.rows(range(index * self._size, (index + 1) * self._size))


@dataclasses.dataclass(frozen=True)
class Batches:
    """The global batches of a data set: batch `step` is `examples[step * B:(step + 1) * B]`."""

    examples: grain.MapDataset
    batch_size: int

    def steps(self, first_step: int, num_steps: int, process_index: int = 0,
              process_count: int = 1) -> grain.MapDataset:
        """This process's rows of the batches of `num_steps` steps from `first_step`."""
        rows = HostRows(self.examples, self.batch_size, first_step, num_steps, process_index,
                        process_count)
        if hasattr(self.examples, "rows"):
            return ReadTogether(rows, self.batch_size // process_count)
        return rows.batch(self.batch_size // process_count)

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """This process's rows of the global batch of `step`."""
        return self.steps(step, 1, process_index, process_count)[0]

    def iterator(self, first_step: int, stop_step: int, *, steps_per_call: int = 1,
                 process_index: int = 0, process_count: int = 1, workers: int = 0,
                 prefetch: int = 2) -> Iterator[dict]:
        """`[steps_per_call, rows, ...]` stacks of this process's batches from `first_step` until
        `stop_step` (rounded up to whole calls), read ahead: by `workers` processes that hold
        `prefetch` stacks each (Grain `mp_prefetch`; they are spawned, never forked, so they
        are safe next to JAX's threads), else by a thread of this process that holds `prefetch`
        stacks (0: read when asked, in the caller's thread)."""
        calls = -(-(stop_step - first_step) // steps_per_call)
        stacks = self.steps(first_step, calls * steps_per_call, process_index,
                            process_count).batch(steps_per_call)
        if workers:
            _flags_parsed()
            ds = stacks.to_iter_dataset(grain.ReadOptions(num_threads=1,
                                                          prefetch_buffer_size=1))
            # Arrays under MIN_SHM_BYTES cross to this process pickled through the workers'
            # queue: cheaper than a shared-memory block each (made, mapped, unlinked).
            ds = grain.experimental.WithOptionsIterDataset(
                ds, grain.experimental.DatasetOptions(min_shm_size=MIN_SHM_BYTES))
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
        else:
            ds = stacks.to_iter_dataset(grain.ReadOptions(num_threads=1 if prefetch else 0,
                                                          prefetch_buffer_size=prefetch))
        return iter(ds)


def _flags_parsed() -> None:
    """Grain's worker processes read its absl flags: outside an absl app (tests, notebooks, the
    Python API) they keep their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


@dataclasses.dataclass(frozen=True)
class Rows:
    """A Grain data source over the rows of equally long numpy arrays (an in-memory split)."""

    arrays: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict:
        return {k: v[index] for k, v in self.arrays.items()}


def epochs(source, seed: int) -> grain.MapDataset:
    """Every example of `source` once per epoch, in a fresh seeded order each epoch, endlessly."""
    return grain.MapDataset.source(source).shuffle(seed=seed % 2**32).repeat()


def close(stream) -> None:
    """Stop a pipeline's reader threads and worker processes now, and let the shared memory of
    the batches it handed out be unlinked before the process exits (Grain unlinks it in a
    background thread; batches still queued there at exit would be reported as leaked)."""
    import gc

    stream.close()
    gc.collect()
    try:  # a private detail of Grain's shared-memory arrays; without it, only the warning
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

        deleter = SharedMemoryArray._del_thread_pool  # noqa: SLF001
        if deleter is not None:
            deleter.apply(int)  # one thread, in order: every earlier unlink has run
    except (ImportError, AttributeError):
        pass
