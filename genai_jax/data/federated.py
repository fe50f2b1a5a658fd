"""Federated data: the training split partitioned into clients, and the rows of each round.

Partitions (`train.federated.partition`):
  - `iid`: the training examples (images; for text, the non-overlapping windows of
    `block_size + 1` tokens of `genai_jax.data.private.WindowUnits`) dealt at random into
    `num_clients` parts of near-equal size;
  - `label_skew` (labelled images): for every class, its examples split over the clients in
    proportions drawn from Dirichlet(`dirichlet_alpha`) (Hsu et al., 2019): small alphas give
    clients few classes;
  - `by_speaker` (play text, as LEAF's Shakespeare): every speech (a heading line "NAME:", its
    lines, up to a blank line) goes to its speaker's client, heading included, so a client's
    text reads like the play; `num_clients` 0 keeps every speaker, N the N with the most text.
A partition that leaves a client without data is refused (one line).

A round is one trainer step. Its global batch is `slots x local_steps x local_batch` rows:
slot c holds the `local_steps` local batches of one selected client, contiguous, so that
clients split over the data-parallel devices as the rows do (`slots` is a multiple of their
number; slots beyond the round's clients are padding). Rows carry `client_mask` (1: a real
client, 0: a padding slot) and `client_weight` (the slot's weight in the server's average).
The clients of round r are drawn from a generator seeded by (seed, r), by
`train.federated.client_sampling`:
  - `uniform`: `clients_per_round` distinct clients uniformly, each weighted by its amount of
    data (FedAvg as McMahan et al., 2017 run it); under DP-FedAvg with `sampling='poisson'`,
    each client independently with probability clients_per_round / num_clients (padded to a
    cap like DP-SGD's batches, `genai_jax.data.private.poisson_cap`), weighted equally;
  - `by_size`: `clients_per_round` draws with replacement, client c with probability
    proportional to its amount of data, weighted equally (scheme I of Li et al., "On the
    Convergence of FedAvg on Non-IID Data", 2020). The expected update is `uniform`'s, but
    every slot counts as much as another: with play speakers, whose amounts of text span three
    orders of magnitude, `uniform`'s weights leave a round of 10 clients about 3.4 clients'
    worth of update, and most of its small clients' windows repeat their few lines.
Each client's examples are drawn by (seed, r, client) (`by_size`: by (seed, r, client, slot),
so a client drawn twice reads two draws). So a round's rows are a function of (seed, round),
and a resumed run sees the rounds of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import re

import grain
import numpy as np
from absl import logging

from genai_jax.config_checks import privacy_enabled
from genai_jax.data import private
from genai_jax.data.loader import ENDLESS, Batches
from genai_jax.errors import DataError

PARTITIONS = ("iid", "label_skew", "by_speaker")
MASK, WEIGHT = "client_mask", "client_weight"


@dataclasses.dataclass(frozen=True)
class IndexedClients:
    """Clients that own examples of a Grain data source: client c owns `source[i]` for every i
    in `members[c]` and reads them epoch by epoch in a fresh random order."""

    source: object
    members: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.members)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(m) for m in self.members], np.float64)

    def draw(self, client: int, count: int, rng: np.random.Generator) -> np.ndarray:
        own = self.members[client]
        order = [rng.permutation(own) for _ in range(math.ceil(count / len(own)))]
        return np.concatenate(order)[:count]

    def example(self, client: int, spec: int) -> dict:
        del client
        return self.source[int(spec)]


@dataclasses.dataclass(frozen=True)
class StreamClients:
    """Clients that own a token stream each (`by_speaker`): an example is a window of
    `block_size + 1` tokens at a random offset of the client's stream; a stream shorter than
    that gives one window, padded, whose `loss_mask` counts its real targets only."""

    streams: list[np.ndarray]
    block_size: int

    def __len__(self) -> int:
        return len(self.streams)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(s) for s in self.streams], np.float64)

    def draw(self, client: int, count: int, rng: np.random.Generator) -> np.ndarray:
        room = max(len(self.streams[client]) - self.block_size - 1, 0)
        return rng.integers(0, room + 1, count)

    def example(self, client: int, spec: int) -> dict:
        block = self.block_size
        seq = np.zeros(block + 1, np.int32)
        part = self.streams[client][int(spec):int(spec) + block + 1]
        seq[:len(part)] = part
        return {"inputs": seq[:-1], "targets": seq[1:],
                "loss_mask": (np.arange(block) < len(part) - 1).astype(np.float32)}


def iid(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """`n` examples dealt at random into `num_clients` parts of near-equal size."""
    if num_clients > n:
        raise DataError(f"train.federated.partition='iid' deals {n} training examples to "
                        f"num_clients={num_clients}: some client would be empty; lower "
                        "train.federated.num_clients")
    order = np.random.default_rng([seed, 0x46454431]).permutation(n)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def label_skew(labels: np.ndarray, num_clients: int, alpha: float, seed: int
               ) -> list[np.ndarray]:
    """Every class's examples split over `num_clients` clients in Dirichlet(alpha)
    proportions (drawn per class)."""
    rng = np.random.default_rng([seed, 0x46454432])
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        own = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = np.round(np.cumsum(shares)[:-1] * len(own)).astype(int)
        for client, chunk in enumerate(np.split(own, cuts)):
            parts[client].append(chunk)
    members = [np.sort(np.concatenate(p)) for p in parts]
    empty = [c for c, m in enumerate(members) if not len(m)]
    if empty:
        raise DataError(f"train.federated.partition='label_skew' with dirichlet_alpha={alpha} "
                        f"leaves {len(empty)} of num_clients={num_clients} clients without "
                        f"examples (client {empty[0]} first): raise "
                        "train.federated.dirichlet_alpha or lower num_clients")
    return members


_HEADING = re.compile(r"^([^\s:][^:\n]{0,60}):[ \t]*$")


def speeches(text: str) -> list[tuple[str, str]]:
    """`(speaker, speech)` for every speech of a play's text: blocks separated by blank lines
    whose first line is a heading "NAME:"; a block without one continues the previous speech's
    speaker (text before the first heading is dropped). The speech keeps its heading and ends
    with the blank line, so the speeches of all speakers joined are the text again."""
    out: list[tuple[str, str]] = []
    for block in re.split(r"\n[ \t]*\n", text):
        if not block.strip():
            continue
        first = block.lstrip("\n").split("\n", 1)[0]
        match = _HEADING.match(first)
        if match:
            out.append((match.group(1).strip(), block.strip("\n") + "\n\n"))
        elif out:
            out.append((out[-1][0], block.strip("\n") + "\n\n"))
    return out


def by_speaker(text: str, tokenize, num_clients: int) -> tuple[list[np.ndarray], list[str]]:
    """`(streams, names)`: the token stream of every speaker's speeches (in order), largest
    first; `num_clients` > 0 keeps that many."""
    texts: dict[str, list[str]] = {}
    for speaker, speech in speeches(text):
        texts.setdefault(speaker, []).append(speech)
    if not texts:
        raise DataError("train.federated.partition='by_speaker' found no speaker headings (a "
                        "line \"NAME:\" opening a block after a blank line) in the training text")
    streams = {name: np.asarray(tokenize("".join(parts)), np.int32)
               for name, parts in texts.items()}
    names = sorted(streams, key=lambda n: (-len(streams[n]), n))
    if num_clients:
        if num_clients > len(names):
            raise DataError(f"train.federated.num_clients={num_clients} but the training text "
                            f"has {len(names)} speakers (partition='by_speaker'): lower it, or "
                            "0 for all")
        names = names[:num_clients]
    short = [n for n in names if len(streams[n]) < 2]
    if short:
        raise DataError(f"speaker {short[0]!r} has {len(streams[short[0]])} tokens: a client "
                        "without a next token to learn (partition='by_speaker')")
    return [streams[n] for n in names], names


class ClientRounds(grain.MapDataset):
    """Element i: row `i % rows` of the batch of round `i // rows`, `rows = slots x
    local_examples`: row `c x local_examples + k` is example k of the client in slot c."""

    def __init__(self, clients, per_round: int, poisson: bool, slots: int,
                 local_examples: int, seed: int, by_size: bool = False):
        super().__init__()
        self._clients, self._per_round, self._poisson = clients, per_round, poisson
        self._slots, self._local, self._seed = slots, local_examples, seed
        self._sizes, self._by_size = clients.sizes, by_size
        # FedAvg's weight of a slot's update: the client's amount of data, or equal
        self._weights = (np.ones_like(self._sizes) if by_size or poisson else self._sizes)
        # A padding slot's rows: an example of client 0 (masked out, so any would do).
        self._padding = clients.example(0, int(clients.draw(0, 1, np.random.default_rng(0))[0]))
        self._round, self._plan = -1, ([], [])

    def __len__(self) -> int:
        return ENDLESS

    def __str__(self) -> str:
        return f"ClientRounds({len(self._clients)} clients, {self._per_round} per round)"

    def clients_of(self, round_: int) -> np.ndarray:
        """The clients selected for `round_`."""
        return self.plan(round_)[0]

    def plan(self, round_: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """The clients of `round_` and the examples each one reads."""
        if round_ != self._round:  # rows are read round by round: one draw per round
            rng = np.random.default_rng([self._seed, 0x524E44, round_])
            n = len(self._clients)
            k = int(rng.binomial(n, self._per_round / n)) if self._poisson else self._per_round
            if k > self._slots:
                logging.warning("round %d drew %d clients, more than its cap of %d "
                                "(probability < %g): it keeps %d", round_, k, self._slots,
                                private.OVERFLOW_PROBABILITY, self._slots)
            if self._by_size:
                chosen = rng.choice(n, k, replace=True, p=self._sizes / self._sizes.sum())
                seeds = [[self._seed, round_, int(c), slot] for slot, c in enumerate(chosen)]
            else:
                chosen = rng.choice(n, min(k, self._slots), replace=False)
                seeds = [[self._seed, round_, int(c)] for c in chosen]
            specs = [self._clients.draw(int(c), self._local, np.random.default_rng(s))
                     for c, s in zip(chosen, seeds, strict=True)]
            self._round, self._plan = round_, (chosen, specs)
        return self._plan

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        round_, row = divmod(int(index), self._slots * self._local)
        slot, k = divmod(row, self._local)
        chosen, specs = self.plan(round_)
        if slot < len(chosen):
            client = int(chosen[slot])
            example = self._clients.example(client, int(specs[slot][k]))
            return {**example, MASK: np.float32(1), WEIGHT: np.float32(self._weights[client])}
        return {**self._padding, MASK: np.float32(0), WEIGHT: np.float32(0)}


def slots_of(fed_cfg, num_clients: int, poisson: bool, rounds: int, multiple: int) -> int:
    """The client slots of a round: clients_per_round (or, Poisson-sampled, a cap exceeded with
    probability below OVERFLOW_PROBABILITY over the run), rounded up to a multiple of
    `multiple` (the data-parallel devices and processes)."""
    if poisson:
        return private.poisson_cap(num_clients, fed_cfg.clients_per_round, rounds, multiple)
    return multiple * math.ceil(fed_cfg.clients_per_round / multiple)


def client_batches(clients, config, multiple: int = 1, augment=None) -> tuple[Batches, dict]:
    """The training batches of a federated run over `clients` (`augment`ed per example like
    the centralised ones), and what the trainer needs to know about them
    (`info["federated"]`)."""
    fed, train = config.train.federated, config.train
    n = len(clients)
    if fed.clients_per_round > n:
        raise DataError(f"train.federated.clients_per_round={fed.clients_per_round} exceeds "
                        f"the {n} clients of the partition")
    poisson = privacy_enabled(config) and train.privacy.sampling == "poisson"
    slots = slots_of(fed, n, poisson, train.steps, multiple)
    local = fed.local_steps * train.batch_size
    rounds = ClientRounds(clients, fed.clients_per_round, poisson, slots, local, config.seed,
                          by_size=fed.client_sampling == "by_size")
    info = {"num_clients": n, "slots": slots, "client_sizes": clients.sizes,
            "examples_per_round": fed.clients_per_round * local}
    examples = rounds if augment is None else rounds.seed(config.seed + 3).random_map(augment)
    return Batches(examples, slots * local), info


def text_clients(config, tokens: np.ndarray, tokenizer, end_of_document) -> object:
    """The clients of a federated LM run over the training token stream `tokens`."""
    fed, block = config.train.federated, config.model.block_size
    if fed.partition == "by_speaker":
        text = tokenizer.decode(tokens[:])  # the play's whole text: its speakers
        streams, _ = by_speaker(text, lambda s: tokenizer.encode(s, "a speaker's text"),
                                fed.num_clients)
        return StreamClients(streams, block)
    if fed.partition != "iid":
        raise DataError(f"train.federated.partition={fed.partition!r} partitions labelled "
                        "images; text takes 'iid' or 'by_speaker'")
    units = private.WindowUnits(tokens, block, end_of_document)
    return IndexedClients(units, iid(len(units), fed.num_clients, config.seed))


def image_clients(config, source) -> IndexedClients:
    """The clients of a federated image run over the training split `source`."""
    fed = config.train.federated
    if fed.partition == "by_speaker":
        raise DataError("train.federated.partition='by_speaker' partitions play text; images "
                        "take 'iid' or 'label_skew'")
    if fed.partition == "iid":
        return IndexedClients(source, iid(len(source), fed.num_clients, config.seed))
    labels = _labels(source)
    return IndexedClients(source, label_skew(labels, fed.num_clients, fed.dirichlet_alpha,
                                             config.seed))


def _labels(source) -> np.ndarray:
    if hasattr(source, "label"):
        return np.asarray(source.label)
    return np.concatenate([source.get(np.arange(i, min(i + 4096, len(source))))["label"]
                           for i in range(0, len(source), 4096)])
