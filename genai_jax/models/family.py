"""The model-family interface: the trainer's only view of a model.

A family is a few pure functions over a state pytree. The trainer jit-compiles `train_step` and
`eval_step` with shardings derived from the logical axis names carried by the state's
`nnx.Variable`s; it never looks inside the state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

State = Any
Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Family:
    """What a model family provides.

    init: `rng -> state` (pure; the trainer runs it under jit with output shardings).
    train_step: `(state, batch) -> (state, metrics)`; the trainer donates the old state.
    eval_step: `(state, batch) -> metrics` (means over the batch).
    sample: `(state, rng, **kwargs) -> outputs`, e.g. a list of strings or an image array.
    save_samples: `(outputs, directory, step) -> str` writes them under `workdir/samples/` and
      returns a short human-readable summary (printed at the end of training). `sample` and
      `save_samples` run on every process of a multi-process run (they may compute with
      parameters spread over all of them); only process 0 writes files.
    summarize_eval: `mean eval metrics -> reported metrics` (e.g. loss -> perplexity).
    sample_eval: optional `(state, rng, directory, step) -> metrics` run at every evaluation
      after the eval batches: metrics of generated samples (e.g. the classifier Fréchet
      distance), writing what it generated under `directory` (e.g. PNG grids).
    init_from_params: optional `(params, rng) -> state`: a fresh training state around given
      parameters (a run restored from a parameters-only checkpoint, e.g. an imported one).
    export_params: `state -> params` of the model evaluated with, in the layout of a model
      without adapters (what `init_from` starts from and export writes): a parameter pytree
      (`nnx.State`), no optimizer state.
    generate: optional `(params, rng, labels int32 [n]) -> x` over `export_params(state)`: the
      image families' sampler (`x` in model range, `[n, H, W, C]` or `[n, dim]`), which `sample`
      calls and `genai_jax.serving.export_images` exports; None for the language model.
    tokens_per_example: how many `throughput_unit`s one batch row counts for (tokens per
      window for the LM, 1 for images), for `train/{throughput_unit}_per_s`.
    """

    init: Callable[[jax.Array], State]
    train_step: Callable[[State, Batch], tuple[State, Metrics]]
    eval_step: Callable[[State, Batch], Metrics]
    sample: Callable[..., Any]
    save_samples: Callable[[Any, str, int], str]
    summarize_eval: Callable[[dict[str, float]], dict[str, float]] = lambda m: m
    sample_eval: Callable[[State, jax.Array, str, int], dict[str, float]] | None = None
    init_from_params: Callable[[Any, jax.Array], State] | None = None
    export_params: Callable[[State], Any] = lambda state: state.eval_params
    generate: Callable[[Any, jax.Array, jax.Array], jax.Array] | None = None
    tokens_per_example: int = 1
    throughput_unit: str = "tokens"
