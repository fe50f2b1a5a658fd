"""A language model loaded from an export: the compiled prefill and decode functions, the
weights, the tokenizer, and per-row sampling. No flax, no model code.

`LanguageModel.generate` decodes a batch the way `experiments.sample` does (same tokens for
greedy decoding); the server's continuous batching (`genai_jax.serving.engine`) drives the
lower-level pieces: `empty_cache`, `prefill_slot`, `decode_step` and `next_tokens`.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from genai_jax.serving import artifacts
from genai_jax.tokenization import load_tokenizer

TOP_LOGPROBS = 20  # the most alternatives a request may ask for (OpenAI's chat limit)


def next_tokens(logits: jax.Array, keys: jax.Array, counters: jax.Array,
                temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, *,
                mode: str, known: int) -> jax.Array:
    """One token per row `[rows]` from logits `[rows, vocab]`, each row with its own sampling
    settings `[rows]` and random stream: row r draws with `fold_in(keys[r], counters[r])`, so
    what a row samples never depends on the other rows.

    `mode` picks the compiled variant: "greedy" (every row argmax), "plain" (temperature only)
    or "filtered" (top-k and top-p too, through one sort of the vocabulary). In the last two a
    row with temperature 0 is still greedy. Only the `known` first tokens (the tokenizer's: a
    model's vocabulary may be larger) are ever drawn.
    """
    if known < logits.shape[-1]:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < known, logits,
                           jnp.finfo(jnp.float32).min)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        return greedy
    x = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
    if mode == "filtered":
        neg_inf = jnp.finfo(jnp.float32).min
        ordered = -jnp.sort(-x, axis=-1)  # descending
        vocab = x.shape[-1]
        kth = jnp.take_along_axis(ordered, (jnp.clip(top_k, 1, vocab) - 1)[:, None], axis=-1)
        kth = jnp.where(top_k[:, None] > 0, kth, neg_inf)
        # top-p: keep the smallest set whose mass reaches top_p (a token stays if the mass
        # before it is below top_p, so the most likely token always stays)
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep = (before < top_p[:, None]) | (top_p[:, None] >= 1)  # (cumsum saturates at 1)
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < jnp.maximum(kth, cutoff), neg_inf, x)
    step_keys = jax.vmap(jax.random.fold_in)(keys, counters)
    sampled = jax.vmap(jax.random.categorical)(step_keys, x).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def logprobs(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Log-probabilities under the model (before temperature) of `tokens` `[rows]`, and the
    `TOP_LOGPROBS` most likely tokens `[rows, k]` with theirs."""
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    top_lp, top_ids = jax.lax.top_k(lp, min(TOP_LOGPROBS, lp.shape[-1]))
    return chosen, top_ids, top_lp


class LanguageModel:
    """An exported language model, ready to run on this process's default device."""

    def __init__(self, directory: str | pathlib.Path, manifest: dict | None = None):
        self.directory = pathlib.Path(directory)
        self.manifest = manifest or artifacts.read_manifest(self.directory)
        info = self.manifest["lm"]
        self.block_size, self.vocab_size = info["block_size"], info["vocab_size"]
        self.known_tokens = info["tokenizer_size"]  # <= vocab_size: the ids text can have
        self.eos_token_id = info["eos_token_id"]
        self.start_token = info["start_token"]
        self._kv_heads, self._head_dim = info["kv_heads"], info["head_dim"]
        self._cache_dtype = jnp.dtype(info["cache_dtype"])
        self._num_layers = info["num_layers"]
        self.tokenizer = load_tokenizer(self.directory)
        # Everything the compiled functions take lives on one device, committed to it, so that
        # their results (committed) feed them again without a second compilation.
        self.device = jax.devices()[0]
        self.weights = jax.device_put(artifacts.load_weights(self.directory), self.device)
        functions = self.manifest["functions"]
        prefill = artifacts.load_function(self.directory, functions["prefill"]).call
        decode = artifacts.load_function(self.directory, functions["decode"]).call
        self._prefill = jax.jit(prefill)
        self._decode = jax.jit(decode)

        # The server's pieces. `cache` holds one row per decode slot and `pending` `[slots,
        # vocab]` each slot's logits for its next token; both are donated and updated in place.
        def prefill_slot(weights, cache, pending, tokens, length, slot):
            """Prefill `tokens` `[1, bucket]` (`length` real) into slot `slot`; returns the
            prompt's logits `[bucket, vocab]` too (for its log-probabilities)."""
            row = jax.tree.map(lambda c: jnp.zeros((1, *c.shape[1:]), c.dtype), cache)
            logits, row = prefill(weights, tokens, row)
            cache = jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice_in_dim(c, r, slot, 0),
                                 cache, row)
            pending = jax.lax.dynamic_update_slice_in_dim(
                pending, jax.lax.dynamic_slice_in_dim(logits[0], length - 1, 1), slot, 0)
            return logits[0], pending, cache

        def decode_step(weights, cache, tokens, positions):
            logits, cache = decode(weights, tokens, positions, cache)
            return logits, cache

        def resize(cache, length):
            """The cache `length` positions long: cut, or zero-padded at the end."""
            def one(c):
                if length <= c.shape[2]:
                    return c[:, :, :length]
                return jnp.pad(c, ((0, 0), (0, 0), (0, length - c.shape[2]), (0, 0)))
            return jax.tree.map(one, cache)

        self.prefill_slot = jax.jit(prefill_slot, donate_argnums=(1, 2))
        self.decode_step = jax.jit(decode_step, donate_argnums=1)
        self.resize = jax.jit(resize, static_argnames="length")
        self.next_tokens = jax.jit(functools.partial(next_tokens, known=self.known_tokens),
                                   static_argnames="mode")
        self.logprobs = jax.jit(logprobs)

    @property
    def has_chat_template(self) -> bool:
        return getattr(self.tokenizer, "chat_template", None) is not None

    def empty_cache(self, batch: int, length: int | None = None) -> list[dict[str, jax.Array]]:
        """A KV cache of `batch` rows of `length` positions (default: the context): per layer
        `{"k", "v"}` `[batch, kv_heads, length, head_dim]`."""
        shape = (batch, self._kv_heads, length or self.block_size, self._head_dim)
        zeros = functools.partial(jnp.zeros, shape, self._cache_dtype, device=self.device)
        return [{"k": zeros(), "v": zeros()} for _ in range(self._num_layers)]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0) -> list[np.ndarray]:
        """Continue each prompt (token ids) by `max_new_tokens` tokens, all rows in one batch
        (right-padded prompts, one prefill, then one decode step per token); prompt plus new
        tokens must fit the context."""
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.min() < 1 or lengths.max() + max_new_tokens > self.block_size:
            raise ValueError(f"prompts need 1 to {self.block_size - max_new_tokens} tokens to "
                             f"generate {max_new_tokens} within the context of "
                             f"{self.block_size}")
        rows = len(prompts)
        padded = np.zeros((rows, lengths.max()), np.int32)
        for i, p in enumerate(prompts):
            padded[i, :len(p)] = p
        logits, cache = self._prefill(self.weights, padded, self.empty_cache(rows))
        logits = logits[np.arange(rows), lengths - 1]
        mode = "greedy" if temperature == 0 else (
            "filtered" if top_k or top_p < 1 else "plain")
        settings = (jnp.full(rows, temperature, jnp.float32), jnp.full(rows, top_k, jnp.int32),
                    jnp.full(rows, top_p, jnp.float32))
        keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(seed), r) for r in range(rows)])
        out = []
        for i in range(max_new_tokens):
            tokens = self.next_tokens(logits, keys, jnp.full(rows, i, jnp.int32), *settings,
                                      mode=mode)
            out.append(np.asarray(tokens))
            if i + 1 < max_new_tokens:
                logits, cache = self._decode(self.weights, tokens, jnp.asarray(lengths + i),
                                             cache)
        return list(np.stack(out, axis=1)) if out else [np.zeros(0, np.int32)] * rows
