"""Continuous batching: a fixed number of decode slots over one KV cache, run by one thread.

Every iteration of the engine's loop:
  1. admits waiting sequences into free slots: each is prefilled alone (its prompt padded to a
     bucket length, a power of two) into its slot's cache row, and its last logits become the
     slot's pending logits;
  2. samples one token for every busy slot from the pending logits (per-row settings and random
     streams: `genai_jax.serving.lm.next_tokens`);
  3. hands the new tokens to their requests, and frees the slots of those that stopped (end of
     sequence, a stop string, max_tokens, or a cancelled request);
  4. runs one decode step over all slots, which gives the next pending logits.
So a request joins the running batch between two decode steps and leaves as soon as it stops.
The cache grows and shrinks by buckets with the longest sequence in it (a decode step reads the
whole cache). Nothing compiles after warm-up: per cache length one decode step and one prefill
per prompt bucket that fits, the resizes, three samplers (greedy, plain, filtered) and the
log-probability functions.

A sequence is one choice of one request (`n` choices take `n` slots). Text is decoded here, so
that stop strings end generation where they occur; streamed text holds back what could still be
the start of a stop string or of an unfinished UTF-8 character.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from genai_jax.serving.lm import TOP_LOGPROBS, LanguageModel
from genai_jax.serving.metrics import Metrics

MIN_BUCKET = 16
MAX_CHOICES = 16  # a request's n


class QueueFull(Exception):
    """More sequences are waiting than the engine's queue holds (the server answers 429)."""


class Unavailable(Exception):
    """The engine is shutting down or has stopped on an error (the server answers 503)."""


@dataclasses.dataclass
class Settings:
    """How to generate, from the request (OpenAI's names and defaults)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    n: int = 1
    logprobs: int | None = None  # how many alternatives per token (0: the chosen token only)
    echo: bool = False  # also the prompt's log-probabilities (completions)
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens


@dataclasses.dataclass
class Update:
    """What one sequence produced since its last update."""

    index: int  # the choice
    text: str = ""
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict] = dataclasses.field(default_factory=list)  # one per token
    finish_reason: str | None = None  # "stop" | "length" when the sequence is done


@dataclasses.dataclass
class Request:
    prompt: np.ndarray  # int32 token ids
    settings: Settings
    emit: Callable[[Update], None]  # called from the engine thread
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    prompt_logprobs: list[dict] | None = None  # echo + logprobs: filled at prefill (the
    # first token's logprob is None)
    cancelled: bool = False
    first_token_at: float | None = None


@dataclasses.dataclass
class _Sequence:
    request: Request
    index: int
    key: np.ndarray  # uint32[2]: the sequence's random stream
    tokens: list[int] = dataclasses.field(default_factory=list)
    sent: int = 0  # characters of text already emitted


@jax.jit
def _choice_keys(seed: jax.Array) -> jax.Array:
    """The random streams `uint32[MAX_CHOICES, 2]` of the choices of a request seeded `seed`."""
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(
        jnp.arange(MAX_CHOICES))


def bucket(length: int, block_size: int) -> int:
    """The padded prompt length a prompt of `length` tokens is prefilled at."""
    size = MIN_BUCKET
    while size < length:
        size *= 2
    return min(size, block_size)


def buckets(block_size: int) -> list[int]:
    return sorted({bucket(n, block_size) for n in range(1, block_size + 1)})


class Engine:
    """Runs `model` for the requests `submit` hands it, on a thread of its own."""

    def __init__(self, model: LanguageModel, *, slots: int = 16, max_queue: int = 256,
                 metrics: Metrics | None = None):
        self.model, self.slots, self.max_queue = model, slots, max_queue
        self.metrics = metrics or Metrics()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._busy: dict[int, _Sequence] = {}
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # per-slot sampling settings, on the host; sent with every step
        self._keys = np.zeros((slots, 2), np.uint32)
        self._temperature = np.zeros(slots, np.float32)
        self._top_k = np.zeros(slots, np.int32)
        self._top_p = np.ones(slots, np.float32)
        self._positions = np.zeros(slots, np.int32)
        # The cache is as long as the longest sequence needs (a bucket): a decode step reads
        # all of it, and on a CPU that reading is a large part of the step.
        self._length = bucket(1, model.block_size)
        self._cache = model.empty_cache(slots, self._length)
        self._pending = jnp.zeros((slots, model.vocab_size), jnp.float32, device=model.device)

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="genai-engine", daemon=True)
        self._thread.start()

    def warm_up(self) -> None:
        """Compile every shape the loop will run: for each cache length, the decode step and a
        prefill per prompt bucket that fits; the resizes between cache lengths; the prompt
        log-probabilities; the three samplers and the step's log-probabilities."""
        m, zeros = self.model, np.zeros(self.slots, np.int32)
        sizes = buckets(m.block_size)
        for length in sizes:
            self._resize(length)
            for size in sizes[:sizes.index(length) + 1]:
                tokens = np.zeros((1, size), np.int32)
                prompt_logits, self._pending, self._cache = m.prefill_slot(
                    m.weights, self._cache, self._pending, tokens, np.int32(1), np.int32(0))
                if length == size:
                    m.logprobs(prompt_logits, tokens[0])
            self._pending, self._cache = m.decode_step(m.weights, self._cache, zeros, zeros)
        for old in sizes:  # every resize: compiled per (from, to)
            for new in sizes:
                self._resize(old)
                self._resize(new)
        self._resize(sizes[0])
        _choice_keys(np.uint32(0))
        for mode in ("greedy", "plain", "filtered"):
            out = self._sample(mode, zeros)
        m.logprobs(self._pending, out)
        jax.block_until_ready(self._pending)

    def _resize(self, length: int) -> None:
        if length != self._length:
            self._cache = self.model.resize(self._cache, length=length)
            self._length = length

    def _fit(self, needed: int) -> None:
        """Make the cache the bucket of `needed` positions long (growing or shrinking)."""
        self._resize(bucket(needed, self.model.block_size))

    def submit(self, request: Request) -> None:
        """Queue `request`'s `n` sequences; raises QueueFull when they do not fit now and
        Unavailable when the engine is stopping or stopped."""
        s = request.settings
        seed = s.seed if s.seed is not None else np.random.randint(0, 2**32, dtype=np.uint64)
        keys = np.asarray(_choice_keys(np.uint32(seed % 2**32)))  # any integer seed
        with self._wake:
            if self._stopping or self.error is not None:
                raise Unavailable("the server is shutting down" if self._stopping else
                                  f"the engine stopped: {self.error!r}")
            if len(self._waiting) + s.n > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} sequences are waiting (the queue holds "
                                f"{self.max_queue}): retry later")
            for i in range(s.n):
                self._waiting.append(_Sequence(request, i, keys[i]))
            self.metrics.queue_depth.set(len(self._waiting))
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Stop generating for `request` (its client went away); its slots free up."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._busy:
                        self._wake.wait()
                    if self._stopping and not self._waiting and not self._busy:
                        return
                self._drop_cancelled()
                self._admit()
                if self._busy:
                    self._step()
        except BaseException as e:  # a bug: every waiting request gets an error
            logging.exception("the engine stopped")
            with self._wake:
                self.error = e
                left = [*self._busy.values(), *self._waiting]
            for seq in left:
                seq.request.emit(Update(seq.index, finish_reason="error"))
            raise

    def _drop_cancelled(self) -> None:
        """Free the slots and queue places of cancelled requests; each dropped sequence ends
        with finish_reason "cancelled" (a handler still waiting on it returns)."""
        dropped = []
        for slot, seq in list(self._busy.items()):
            if seq.request.cancelled:
                dropped.append(self._busy.pop(slot))
                self._positions[slot] = 0
        self.metrics.slots_busy.set(len(self._busy))
        with self._wake:
            dropped += [s for s in self._waiting if s.request.cancelled]
            self._waiting = collections.deque(s for s in self._waiting
                                              if not s.request.cancelled)
        for seq in dropped:
            seq.request.emit(Update(seq.index, finish_reason="cancelled"))

    def _admit(self) -> None:
        free = [s for s in range(self.slots) if s not in self._busy]
        while free:
            with self._wake:
                if not self._waiting:
                    break
                seq = self._waiting.popleft()
                self.metrics.queue_depth.set(len(self._waiting))
            slot = free.pop(0)
            try:
                admitted = self._prefill(seq, slot)
            except Exception:  # a bug shown by this request: it alone gets an error
                logging.exception("prefill failed")
                seq.request.emit(Update(seq.index, finish_reason="error"))
                admitted = False
            if not admitted:
                free.insert(0, slot)

    def _prefill(self, seq: _Sequence, slot: int) -> bool:
        """Prefill `seq`'s prompt into `slot`; False when it needs no slot after that."""
        m, request, s = self.model, seq.request, seq.request.settings
        self.metrics.queue_wait.observe(time.perf_counter() - request.arrival)
        length = len(request.prompt)
        tokens = np.zeros((1, bucket(length, m.block_size)), np.int32)
        tokens[0, :length] = request.prompt
        self._fit(max(tokens.shape[1], self._written() + 1))
        prompt_logits, self._pending, self._cache = m.prefill_slot(
            m.weights, self._cache, self._pending, tokens, np.int32(length), np.int32(slot))
        if s.echo and s.logprobs is not None and request.prompt_logprobs is None:
            following = np.roll(tokens[0], -1)  # row i scores prompt token i + 1
            first = {"token": int(request.prompt[0]), "logprob": None, "top": []}
            request.prompt_logprobs = [first] + _entries(
                m.logprobs(prompt_logits, following), following[:length - 1], s.logprobs)
        if s.max_tokens == 0:  # scoring only (echo): nothing to generate
            request.emit(Update(seq.index, finish_reason="length"))
            return False
        self._keys[slot] = seq.key
        self._temperature[slot] = s.temperature
        self._top_k[slot] = s.top_k
        self._top_p[slot] = s.top_p
        self._positions[slot] = length
        self._busy[slot] = seq
        return True

    def _sample(self, mode: str, counters: np.ndarray) -> jax.Array:
        return self.model.next_tokens(self._pending, self._keys, counters, self._temperature,
                                      self._top_k, self._top_p, mode=mode)

    def _step(self) -> None:
        m, busy = self.model, self._busy
        settings = [seq.request.settings for seq in busy.values()]
        if all(s.temperature == 0 for s in settings):
            mode = "greedy"
        elif all(s.top_k == 0 and s.top_p >= 1 for s in settings):
            mode = "plain"
        else:
            mode = "filtered"
        counters = np.zeros(self.slots, np.int32)
        for slot, seq in busy.items():
            counters[slot] = len(seq.tokens)
        tokens = self._sample(mode, counters)
        scored = (m.logprobs(self._pending, tokens)
                  if any(s.logprobs is not None for s in settings) else None)
        host = np.asarray(tokens)
        self.metrics.occupancy.observe(len(busy) / self.slots)
        now = time.perf_counter()
        for slot, seq in list(busy.items()):
            top = seq.request.settings.logprobs
            entry = (_entries(scored, host, top, row=slot)[0]
                     if scored is not None and top is not None else None)
            try:
                done = self._advance(seq, int(host[slot]), entry, now)
            except Exception:  # a bug shown by this request: it alone gets an error
                logging.exception("a generated token could not be handed over")
                seq.request.emit(Update(seq.index, finish_reason="error"))
                done = True
            if done:
                del busy[slot]
                self._positions[slot] = 0  # a free row's step writes at 0, within any length
        self.metrics.generation_tokens.inc(len(settings))
        self.metrics.slots_busy.set(len(busy))
        if not busy:
            return
        # the decode step writes each token at its row's position and gives the next logits
        self._fit(self._written() + 1)
        positions = self._positions.copy()
        for slot in busy:
            self._positions[slot] += 1
        self._pending, self._cache = m.decode_step(m.weights, self._cache, host, positions)

    def _written(self) -> int:
        """The position the busy slots' next decode step writes at, at most (0: none busy)."""
        return max((int(self._positions[slot]) for slot in self._busy), default=0)

    def _advance(self, seq: _Sequence, token: int, entry: dict | None, now: float) -> bool:
        """Give `seq` its new token (and its log-probability entry); True when it is done."""
        request, s, m = seq.request, seq.request.settings, self.model
        if request.first_token_at is None:
            request.first_token_at = now
            self.metrics.ttft.observe(now - request.arrival)
        finish, new = None, []
        if token == m.eos_token_id and not s.ignore_eos:
            finish = "stop"  # the end-of-sequence token is not part of the text
        else:
            new = [token]
            seq.tokens.append(token)
        text = m.tokenizer.decode(seq.tokens)
        cut = min((i for i in (text.find(stop, max(seq.sent - len(stop), 0)) for stop in s.stop)
                   if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        elif finish is None and len(seq.tokens) >= s.max_tokens:
            finish = "length"
        if finish is None:
            # hold back an unfinished UTF-8 character and what may start a stop string
            stable = len(text.rstrip("\ufffd"))
            stable -= max((len(stop) - 1 for stop in s.stop), default=0)
            text = text[:max(stable, seq.sent)]
        update = Update(seq.index, text[seq.sent:], new,
                        [entry] if entry is not None and new else [], finish)
        seq.sent = max(seq.sent, len(text))
        if update.text or update.tokens or update.finish_reason:
            request.emit(update)
        return finish is not None or request.cancelled


def _entries(scored, tokens: np.ndarray, top: int, row: int | None = None) -> list[dict]:
    """Log-probability entries `{"token": id, "logprob": x, "top": [(id, x), ...]}` from
    `LanguageModel.logprobs`'s (chosen, top ids, top log-probs): of row `row` alone, or of the
    rows of `tokens`."""
    chosen, ids, lps = (np.asarray(a) for a in scored)
    top = min(top, TOP_LOGPROBS)
    rows = [row] if row is not None else range(len(tokens))
    return [{"token": int(tokens[r]), "logprob": float(chosen[r]),
             "top": [(int(t), float(x)) for t, x in zip(ids[r, :top], lps[r, :top], strict=True)]}
            for r in rows]
