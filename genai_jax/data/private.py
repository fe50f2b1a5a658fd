"""The batches of differentially private training (DP-SGD): privacy units sampled per step.

The privacy unit is what a guarantee protects: an image, or, for text, one of a fixed set of
non-overlapping windows of the training split (`WindowUnits`: window j is tokens
[j (L + 1), (j + 1)(L + 1)), so no token is in two units). With `sampling='poisson'` the batch
of step s holds each of the N units independently with probability q = B / N (B =
`train.batch_size`, the expected batch size), as the accountant assumes: its size varies, so
it is padded to a fixed `cap` rows and every row carries `example_mask` (1: a unit, 0:
padding, which contributes nothing). The cap is chosen so that a step with more than `cap`
units has probability below `OVERFLOW_PROBABILITY` over the whole run (such a step would keep
`cap` of them: a change of the mechanism as unlikely as that). With `sampling='shuffle'` the
batches are B units of a fresh permutation each epoch (the usual, non-private way; not what
the accountant assumes). Either way the batch of a step is a function of (seed, step), so a
resumed run sees the batches of an uninterrupted one.

The same units serve the privacy audits (`genai_jax.privacy.audit`): `split_units` holds some
out at random as non-members before training, and `canary_patches` writes random secrets into
some members (`WindowUnits.patches`).
"""

from __future__ import annotations

import dataclasses
import math

import grain
import numpy as np
from absl import logging
from scipy import stats

from genai_jax.data import lm_batches
from genai_jax.data.loader import ENDLESS, Batches, epochs
from genai_jax.errors import DataError

OVERFLOW_PROBABILITY = 1e-9  # of any step of a run sampling more units than its cap


@dataclasses.dataclass(frozen=True)
class WindowUnits:
    """A Grain data source: the non-overlapping windows of a token stream (packed: with the
    segment ids, positions and loss mask of the documents in each); `patches` writes tokens
    over some of them (`{unit: ((offset, tokens), ...)}`: inserted canaries)."""

    tokens: np.ndarray
    block_size: int
    end_of_document: int | None = None
    patches: dict | None = None

    def __len__(self) -> int:
        return len(self.tokens) // (self.block_size + 1)

    def unit_tokens(self, index: int) -> np.ndarray:
        """The `block_size + 1` tokens of unit `index`, patches written in."""
        start = int(index) * (self.block_size + 1)
        seq = np.array(self.tokens[start:start + self.block_size + 1], np.int32)
        for offset, tokens in (self.patches or {}).get(int(index), ()):
            seq[offset:offset + len(tokens)] = tokens
        return seq

    def __getitem__(self, index: int) -> dict:
        seq = self.unit_tokens(index)
        if self.end_of_document is None:
            return lm_batches.window(seq, 0, self.block_size)
        return lm_batches.packed_window(seq, 0, self.block_size, self.end_of_document)


@dataclasses.dataclass(frozen=True)
class Subset:
    """A Grain data source: the examples of `source` at `indices`, in that order."""

    source: object
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.source[int(self.indices[index])]


def split_units(n: int, nonmember_fraction: float, max_members: int, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """`(members, nonmembers)`: the units a run trains on and those a privacy audit holds out,
    drawn at random from the same `n` (`data.nonmember_fraction` of them held out, then at most
    `data.max_members` of the rest trained on; 0 = all)."""
    order = np.random.default_rng([seed, 0x4D494131]).permutation(n)
    held = int(round(n * nonmember_fraction))
    members = order[held:] if not max_members else order[held:held + max_members]
    if len(members) < 2:
        raise DataError(f"{len(members)} of the {n} training units are left to train on "
                        "(data.nonmember_fraction, data.max_members): lower them")
    return np.sort(members), np.sort(order[:held])


CANARY_PREFIX = "my PIN is "
CANARY_DIGITS = 6


def canary_secrets(count: int, seed: int) -> list[str]:
    """`count` random six-digit secrets, written "4 8 1 5 9 2" (The Secret Sharer's format)."""
    rng = np.random.default_rng([seed, 0x43414E41])
    return [" ".join(str(d) for d in rng.integers(0, 10, CANARY_DIGITS)) for _ in range(count)]


def canary_patches(secrets: list[str], tokenize, members: np.ndarray, repeats: int,
                   block_size: int, seed: int) -> dict:
    """`WindowUnits.patches` inserting each of `secrets` (after CANARY_PREFIX) into `repeats`
    distinct member units at a random offset, no two canaries in one unit."""
    encoded = [np.asarray(tokenize(CANARY_PREFIX + s), np.int32) for s in secrets]
    longest = max((len(e) for e in encoded), default=0)
    if longest > block_size + 1:
        raise DataError(f"a canary is {longest} tokens, longer than the context of "
                        f"model.block_size + 1 = {block_size + 1}: raise the block size")
    if len(secrets) * repeats > len(members):
        raise DataError(f"data.canaries={len(secrets)} x data.canary_repeats={repeats} "
                        f"need as many training units; there are {len(members)}")
    rng = np.random.default_rng([seed, 0x50415443])
    hosts = rng.choice(members, len(secrets) * repeats, replace=False)
    patches = {}
    for k, unit in enumerate(hosts):
        tokens = encoded[k // repeats]
        offset = int(rng.integers(0, block_size + 2 - len(tokens)))
        patches[int(unit)] = ((offset, tokens),)
    return patches


def overflow_probability(units: int, expected: int, steps: int, cap: int) -> float:
    """A bound (union over the steps) on the probability that some step of a run samples more
    than `cap` units."""
    return float(min(1.0, steps * stats.binom.sf(cap, units, expected / units)))


def poisson_cap(units: int, expected: int, steps: int, multiple: int = 1) -> int:
    """The smallest multiple of `multiple` that a Poisson-sampled batch (Binomial(units,
    expected / units) units) exceeds in some step of `steps` with probability below
    OVERFLOW_PROBABILITY (a union bound over the steps)."""
    q = expected / units
    cap = int(stats.binom.isf(OVERFLOW_PROBABILITY / max(steps, 1), units, q)) + 1
    cap = multiple * math.ceil(cap / multiple)
    while overflow_probability(units, expected, steps, cap) >= OVERFLOW_PROBABILITY:
        cap += multiple
    return min(cap, multiple * math.ceil(units / multiple))


class PoissonRows(grain.MapDataset):
    """Element i: row `i % cap` of the batch of step `i // cap`, in which each unit of `parent`
    is drawn independently with probability q (Binomial(N, q) units, then that many distinct
    ones uniformly: the same distribution), from a generator seeded by (seed, step)."""

    def __init__(self, parent: grain.MapDataset, expected: int, cap: int, seed: int):
        super().__init__(parent)
        self._n, self._q, self._cap, self._seed = len(parent), expected / len(parent), cap, seed
        self._step, self._chosen = -1, np.zeros(0, np.int64)

    def __len__(self) -> int:
        return ENDLESS

    def __str__(self) -> str:
        return f"PoissonRows(q={self._q:.4g}, cap={self._cap})"

    def units_of(self, step: int) -> np.ndarray:
        """The indices of the units in the batch of `step`."""
        if step != self._step:  # rows are read step by step: one draw per step and process
            rng = np.random.default_rng([self._seed, step])
            k = int(rng.binomial(self._n, self._q))
            if k > self._cap:
                logging.warning("step %d drew %d privacy units, more than its cap of %d "
                                "(probability < %g): it keeps %d", step, k, self._cap,
                                OVERFLOW_PROBABILITY, self._cap)
            self._chosen = rng.choice(self._n, min(k, self._cap), replace=False)
            self._step = step
        return self._chosen

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, row = divmod(int(index), self._cap)
        chosen = self.units_of(step)
        real = row < len(chosen)
        example = self._parent[int(chosen[row]) if real else 0]
        return {**example, "example_mask": np.float32(real)}


def _with_mask(example: dict) -> dict:
    return {**example, "example_mask": np.float32(1.0)}


def private_batches(units, privacy_cfg, batch_size: int, steps: int, seed: int,
                    multiple: int = 1, augment=None) -> Batches:
    """The training batches of a DP-SGD run over the privacy units `units` (a Grain data
    source): Poisson-sampled and padded to `poisson_cap` rows (a multiple of `multiple`), or
    shuffled batches of `batch_size`; `augment`ed per example like the non-private batches."""
    if len(units) < 2:
        raise DataError(f"the training split holds {len(units)} privacy units (a window of "
                        "model.block_size + 1 tokens, or an image): DP-SGD needs more")
    if privacy_cfg.sampling == "poisson":
        cap = poisson_cap(len(units), batch_size, steps, multiple)
        examples = PoissonRows(grain.MapDataset.source(units), batch_size, cap, seed)
    else:
        cap, examples = batch_size, epochs(units, seed).map(_with_mask)
    if augment is not None:
        examples = examples.seed(seed + 3).random_map(augment)
    return Batches(examples, cap)
