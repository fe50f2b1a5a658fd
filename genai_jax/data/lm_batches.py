"""Language-model examples as Grain data sets: windows of a token stream drawn at random, a pure
function of (seed, example index) (`genai_jax.data.loader`), so a resumed run sees exactly the
batches of an uninterrupted one and every host cuts its own rows without talking to the others.

A window is `{"inputs", "targets"}` int32 `[block_size]`. With packing (`data.packing=true`) a
window starts at the beginning of a document and carries `segment_ids` (1, 2, ... per document
in it), `positions` that restart at 0 with each document and a `loss_mask` that leaves out the
pairs whose input ends a document (the next document's first token is not predictable from it):
attention never crosses documents, and neither does the loss.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from genai_jax.data.loader import ENDLESS, Batches
from genai_jax.errors import DataError


class WindowExamples(grain.MapDataset):
    """Example `i`: the window of `tokens` (an int array, or a `shards.TokenStream`) at offset
    `uniform_ints(seed, i, ...)`; packed (`end_of_document` given): from the first document
    start at or after it. `rows(indices)` reads a batch of windows at once: their offsets drawn
    together, one gather from an array, one record read per window from shards."""

    def __init__(self, tokens, block_size: int, seed: int, end_of_document: int | None = None):
        super().__init__()
        if len(tokens) < block_size + 1:
            raise DataError(f"a split of {len(tokens)} tokens is too short for windows of "
                            f"model.block_size={block_size}")
        self._tokens, self._block, self._seed, self._end = (tokens, block_size, seed,
                                                            end_of_document)

    def __len__(self) -> int:
        return ENDLESS

    def __str__(self) -> str:
        return f"WindowExamples(block_size={self._block}, packed={self._end is not None})"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return {k: v[0] for k, v in self.rows([index]).items()}

    def rows(self, indices) -> dict:
        tokens, block = self._tokens, self._block
        n = len(tokens)
        offsets = uniform_ints(self._seed, indices, n - block)  # every window of block + 1
        if self._end is None:
            seq = _slices(tokens, offsets, block + 1).astype(np.int32)
            return {"inputs": seq[:, :-1], "targets": seq[:, 1:]}
        # Packed: one read per window of [offset - 1, offset + 2 block + 1), which holds the
        # block before the window's first document start and the window from there. A window
        # moves to the first document start in [offset, offset + block): after an
        # end-of-document token in `[offset - 1, offset + block - 1)` (or at 0); with none
        # there, it starts mid-document.
        span = min(2 * block + 2, n)
        first = np.clip(offsets - 1, 0, n - span)
        spans = _slices(tokens, first, span)
        ahead = np.maximum(offsets - 1, 0) - first  # where that range starts in the span
        columns = np.arange(span)
        inside = (columns >= ahead[:, None]) & (columns < (offsets + block - 1 - first)[:, None])
        ends = inside & (spans == self._end)
        moved = ends.any(axis=1) & (offsets > 0)
        starts = np.where(moved, np.minimum(first + ends.argmax(axis=1) + 1, n - block - 1),
                          offsets)
        seq = np.take_along_axis(spans, (starts - first)[:, None] + np.arange(block + 1), 1)
        return packed_windows(seq.astype(np.int32), self._end)


def _slices(tokens, starts: np.ndarray, length: int) -> np.ndarray:
    """`[len(starts), length]`: the slices `[start, start + length)` of `tokens` (an array: one
    gather; a stream read from shards: its `windows`)."""
    if isinstance(tokens, np.ndarray):
        return tokens[starts[:, None] + np.arange(length)]
    return tokens.windows(starts, length)


_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele, Lea and Flood, 2014): a bijection of uint64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform_ints(seed: int, indices, high: int) -> np.ndarray:
    """int64 `[len(indices)]`, each uniform in [0, high): output `index` of the SplitMix64
    generator started from a hash of `seed`. A pure function of (seed, index), like Grain's
    per-example generators, but drawn for a whole batch in one numpy call."""
    with np.errstate(over="ignore"):
        start = _mix64(np.uint64(int(seed) % 2**64) ^ np.uint64(0x6A09E667F3BCC909))
        x = _mix64(start + (np.asarray(indices, np.uint64) + np.uint64(1)) * _GAMMA)
    draws = ((x >> np.uint64(11)).astype(np.float64) * (high / 2.0**53)).astype(np.int64)
    return np.minimum(draws, high - 1)


@dataclasses.dataclass(frozen=True)
class TokenizedWindow:
    """A Grain random map over raw text records (`shards.TextRecords`): tokenises, from a
    random record on (packed: from the first document start at or after it), just enough text
    for one window, the end-of-document token after each document's last record; unpacked
    windows start at a random word of the first record."""

    records: object
    tokenizer: object
    block_size: int
    end_of_document: int
    packing: bool = False

    def __call__(self, index, rng: np.random.Generator) -> dict:
        del index
        n, need = len(self.records), self.block_size + 1
        at = int(rng.integers(0, n))
        if self.packing:  # the first record that starts a document
            for _ in range(n):
                if at == 0 or self.records[at - 1][1]:
                    break
                at = (at + 1) % n
        text, ends = self.records[at]
        start = 0 if self.packing else _word_start(text, int(rng.integers(0, len(text) or 1)))
        parts, have = [], 0
        for _ in range(n):
            ids, whole = self._encode(text[start:], need - have)
            parts.append(ids)
            have += len(ids)
            if whole and ends:
                parts.append(np.array([self.end_of_document], np.int32))
                have += 1
            if have >= need:
                break
            at = (at + 1) % n
            (text, ends), start = self.records[at], 0
        tokens = np.concatenate(parts)
        if len(tokens) < need:
            raise DataError(f"a split of {len(tokens)} tokens is too short for windows of "
                            f"model.block_size={self.block_size}")
        if self.packing:
            return packed_window(tokens, 0, self.block_size, self.end_of_document)
        return window(tokens, 0, self.block_size)

    def _encode(self, text: bytes, want: int) -> tuple[np.ndarray, bool]:
        """At least `want` tokens of `text` when it has them, tokenising a prefix cut before a
        whitespace byte (growing it as needed); and whether all of `text` was tokenised."""
        budget = 6 * want + 64
        while True:
            if budget >= len(text):
                return self._ids(text), True
            cut = max(text.rfind(b" ", 0, budget), text.rfind(b"\n", 0, budget))
            if cut <= 0:  # no whitespace: cut between two characters
                cut = budget
                while text[cut] & 0xC0 == 0x80:
                    cut -= 1
            ids = self._ids(text[:cut])
            if len(ids) >= want:
                return ids, False
            budget *= 2


    def _ids(self, text: bytes) -> np.ndarray:
        backend = getattr(self.tokenizer, "backend", None)
        if backend is None:  # byte
            return self.tokenizer.encode(text, "a text record")
        encoding = backend.encode(text.decode("utf-8"), add_special_tokens=False)
        return np.asarray(encoding.ids, np.int32)


def _word_start(text: bytes, at: int) -> int:
    """The first word start (after a space or newline) at or after byte `at`, else 0."""
    if at == 0:
        return 0
    space = min((i for i in (text.find(b" ", at), text.find(b"\n", at)) if i >= 0),
                default=-1)
    return space + 1 if 0 <= space < len(text) - 1 else 0


def window(tokens, offset: int, block_size: int) -> dict:
    seq = np.asarray(tokens[offset:offset + block_size + 1]).astype(np.int32)
    return {"inputs": seq[:-1], "targets": seq[1:]}


def packed_window(tokens, offset: int, block_size: int, end_of_document: int) -> dict:
    seq = np.asarray(tokens[offset:offset + block_size + 1]).astype(np.int32)
    return {k: v[0] for k, v in packed_windows(seq[None], end_of_document).items()}


def packed_windows(seq: np.ndarray, end_of_document: int) -> dict:
    """The packed windows of int32 `seq` `[n, block_size + 1]` (inputs, then the last target):
    each `[n, block_size]`."""
    inputs, targets = seq[:, :-1], seq[:, 1:]
    ends = inputs == end_of_document
    # A document's end-of-document token is its last: the segment changes after it.
    segment = np.concatenate([np.zeros((len(seq), 1), np.int32),
                              np.cumsum(ends[:, :-1], axis=1, dtype=np.int32)], axis=1)
    columns = np.arange(seq.shape[1] - 1)
    first = np.diff(segment, axis=1, prepend=-1) != 0  # a segment's first column
    positions = columns - np.maximum.accumulate(np.where(first, columns, 0), axis=1)
    return {"inputs": inputs, "targets": targets, "loss_mask": (~ends).astype(np.float32),
            "segment_ids": segment + 1, "positions": positions.astype(np.int32)}


def windows(tokens, batch_size: int, block_size: int, seed: int,
            end_of_document: int | None = None) -> Batches:
    """Batches of random windows of `tokens` (packed when `end_of_document` is given)."""
    return Batches(WindowExamples(tokens, block_size, seed, end_of_document), batch_size)


def tokenized_windows(records, tokenizer, batch_size: int, block_size: int, seed: int,
                      end_of_document: int, packing: bool) -> Batches:
    """Batches of windows tokenised on the fly from raw text records (`TokenizedWindow`)."""
    transform = TokenizedWindow(records, tokenizer, block_size, end_of_document, packing)
    return Batches(grain.MapDataset.range(ENDLESS).seed(seed).random_map(transform), batch_size)


def mixture(streams: list, weights: list[float], batch_size: int, block_size: int, seed: int,
            end_of_document: int | None = None) -> Batches:
    """Batches whose examples come from several token streams in the proportions `weights`
    (Grain's `MapDataset.mix`: source and example are functions of the example index), each
    stream's windows drawn with a seed of its own."""
    sources = [WindowExamples(s, block_size, seed + 7919 * i, end_of_document)
               for i, s in enumerate(streams)]
    if len(sources) == 1:
        return Batches(sources[0], batch_size)
    return Batches(grain.MapDataset.mix(sources, weights), batch_size)


def eval_batches(source: Batches, num_batches: int) -> list[dict]:
    """The first `num_batches` batches of `source`: a fixed set of random validation windows
    (nanoGPT's `estimate_loss`)."""
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
    out = []
    for i in range(n_batches):
        rows = [window(tokens, (i * batch_size + r) * block_size, block_size)
                for r in range(batch_size)]
        out.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    return out
