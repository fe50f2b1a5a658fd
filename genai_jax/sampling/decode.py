"""Autoregressive decoding with a KV cache: one prefill, then a `lax.fori_loop` of single-token
steps, compiled once per (batch, prompt length, new tokens) shape.

`apply(params, tokens, positions, cache) -> (logits, cache)` is the model's cached forward:
tokens/positions `[batch, seq]`, logits `[batch, seq, vocab]`. Prompts are right-padded; row `b`'s
real prompt is `prompts[b, :lengths[b]]` and its generated tokens go at positions
`lengths[b], lengths[b] + 1, ...`, so rows of different lengths decode together.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from genai_jax import parallel


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Next tokens `[batch]` from logits `[batch, vocab]`; temperature 0 is greedy (argmax)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest set whose mass reaches top_p: a token stays if the mass before it
        # is below top_p (so the most likely token always stays)
        before = cumulative - jax.nn.softmax(sorted_logits, axis=-1)
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1,
                         keepdims=True)
        logits = jnp.where(logits < cutoff, neg_inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("apply", "init_cache", "max_new_tokens",
                                              "temperature", "top_k", "top_p"))
def _generate_segment(params, prompts, lengths, rng, *, apply, init_cache, max_new_tokens,
                      temperature, top_k, top_p):
    batch, prompt_len = prompts.shape
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    cache = init_cache(batch, prompt_len + max_new_tokens)
    positions = jnp.broadcast_to(jnp.arange(prompt_len), prompts.shape)
    logits, cache = apply(params, prompts, positions, cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    first = sample(last, jax.random.fold_in(rng, 0))
    out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)

    def step(i, carry):
        out, cache = carry
        token = out[:, i - 1]
        pos = (lengths + i - 1)[:, None]
        logits, cache = apply(params, token[:, None], pos, cache)
        return out.at[:, i].set(sample(logits[:, 0], jax.random.fold_in(rng, i))), cache

    out, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache))
    return out


def generate(apply: Callable, init_cache: Callable, params, prompts: list[np.ndarray],
             max_new_tokens: int, rng: jax.Array, *, block_size: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0) -> list[np.ndarray]:
    """Continue each prompt (int arrays, lengths may differ, each at least 1) by
    `max_new_tokens` tokens.

    Within `block_size` positions this is one compiled prefill + decode loop. Longer generations
    shift the context like nanoGPT's crop, but in halves so the cache stays useful: each further
    segment re-reads the last `block_size // 2` tokens and generates up to as many more.
    `apply` and `init_cache` must be hashable (module-level functions or `functools.partial`s).
    """
    seqs = [np.asarray(p, np.int32) for p in prompts]
    if any(len(s) == 0 for s in seqs):
        raise ValueError("every prompt needs at least one token")
    kw = dict(apply=apply, init_cache=init_cache, temperature=temperature, top_k=top_k,
              top_p=top_p)
    remaining, segment = max_new_tokens, 0
    while remaining > 0:
        longest = max(len(s) for s in seqs)
        if longest + remaining <= block_size and segment == 0:
            window, n = longest, remaining
        else:
            window = block_size // 2
            n = min(remaining, block_size - window)
        ctx = [s[-window:] for s in seqs]
        lengths = np.array([len(c) for c in ctx], np.int32)
        padded = np.zeros((len(ctx), int(lengths.max())), np.int32)
        for i, c in enumerate(ctx):
            padded[i, :len(c)] = c
        new = parallel.fetch(_generate_segment(params, padded, lengths,
                                               jax.random.fold_in(rng, segment),
                                               max_new_tokens=n, **kw))
        seqs = [np.concatenate([s, row]) for s, row in zip(seqs, new, strict=True)]
        remaining -= n
        segment += 1
    return [s[len(p):] for s, p in zip(seqs, prompts, strict=True)]
