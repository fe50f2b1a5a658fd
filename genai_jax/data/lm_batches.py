"""Deterministic language-model batches: random windows of a token stream, a pure function of
(seed, step), so a resumed run sees exactly the batches of an uninterrupted one and every host
can cut its own rows of the global batch without talking to the others."""

from __future__ import annotations

import dataclasses

import numpy as np

from genai_jax.errors import DataError
from genai_jax.parallel.sharding import process_rows


@dataclasses.dataclass(frozen=True)
class LMBatches:
    """`batch(step)`: `{"inputs", "targets"}` int32 `[batch_size, block_size]` windows."""

    tokens: np.ndarray
    batch_size: int
    block_size: int
    seed: int

    def __post_init__(self):
        if len(self.tokens) <= self.block_size + 1:
            raise DataError(f"a split of {len(self.tokens)} tokens is too short for windows of "
                             f"model.block_size={self.block_size}")

    def offsets(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, len(self.tokens) - self.block_size - 1, self.batch_size)

    def batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """Rows of the global batch for `step` that belong to `process_index`."""
        offsets = process_rows(self.offsets(step), process_index, process_count)
        return windows(self.tokens, offsets, self.block_size)


def windows(tokens: np.ndarray, offsets: np.ndarray, block_size: int) -> dict:
    idx = offsets[:, None] + np.arange(block_size + 1)
    seq = tokens[idx].astype(np.int32)
    return {"inputs": seq[:, :-1], "targets": seq[:, 1:]}


def eval_batches(tokens: np.ndarray, batch_size: int, block_size: int, num_batches: int,
                 seed: int) -> list[dict]:
    """A fixed set of random validation windows (nanoGPT's `estimate_loss`)."""
    source = LMBatches(tokens, batch_size, block_size, seed)
    return [source.batch(i) for i in range(num_batches)]


def sequential_batches(tokens: np.ndarray, batch_size: int, block_size: int,
                       max_batches: int = 0) -> list[dict]:
    """Non-overlapping windows covering the stream from the start (full-split evaluation);
    the tail that does not fill a whole batch is dropped. `max_batches=0`: all of them."""
    n_windows = (len(tokens) - 1) // block_size
    n_batches = n_windows // batch_size
    if max_batches:
        n_batches = min(n_batches, max_batches)
    if n_batches == 0:
        raise DataError(f"the validation split ({len(tokens)} tokens) is shorter than one batch "
                         f"of {batch_size} x {block_size} tokens")
    starts = np.arange(n_batches * batch_size) * block_size
    return [windows(tokens, starts[i * batch_size:(i + 1) * batch_size], block_size)
            for i in range(n_batches)]
