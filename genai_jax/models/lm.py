"""The transformer language-model family: next-token cross-entropy on token windows."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import optax
from flax import nnx

from genai_jax.evaluation.lm import lm_metrics
from genai_jax.models.family import Family
from genai_jax.models.transformer import Transformer, TransformerConfig, init_cache
from genai_jax.sampling.decode import generate
from genai_jax.train.optim import learning_rate_schedule, make_optimizer
from genai_jax.train.state import TrainState, make_train_step


def model_config(config, vocab_size: int) -> TransformerConfig:
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    kwargs = {k: v for k, v in config.model.items() if k in fields}
    return TransformerConfig(vocab_size=vocab_size, **kwargs)


def _apply(graphdef, params, tokens, positions, cache):
    """The cached forward pass, for `sampling.decode`."""
    return nnx.merge(graphdef, params)(tokens, positions=positions, cache=cache)


def build(config, data_info: dict) -> Family:
    """The LM family for `config`; `data_info` has `tokenizer` (and its `vocab_size`)."""
    tokenizer = data_info["tokenizer"]
    cfg = model_config(config, tokenizer.vocab_size)
    tx = make_optimizer(config.train)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

    def init(rng: jax.Array) -> TrainState:
        params_rng, state_rng = jax.random.split(rng)
        params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(params=params_rng)), nnx.Param)
        return TrainState.create(params, tx, state_rng, config.train.ema_decay)

    def loss_fn(params, batch, rng):
        model = nnx.merge(graphdef, params)
        logits, _ = model(batch["inputs"], rng=rng if cfg.dropout > 0 else None)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
        return loss, {}

    def eval_step(state: TrainState, batch) -> dict:
        params = state.ema if state.ema is not None else state.params
        loss, _ = loss_fn(params, batch, None)
        return {"loss": loss}

    # One hashable apply/init_cache per family, so decoding compiles once per shape.
    apply = functools.partial(_apply, graphdef)
    empty_cache = functools.partial(init_cache, cfg)

    def sample(state: TrainState, rng: jax.Array, prompts: list[str] | None = None,
               max_new_tokens: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None) -> list[str]:
        s = config.sample
        prompts = prompts if prompts is not None else [s.prompt] * s.num_samples
        params = state.ema if state.ema is not None else state.params
        # An empty prompt starts from the start token, like the beginning of a document.
        encoded = [tokenizer.encode(p, "the prompt") if p else [tokenizer.start_token]
                   for p in prompts]
        out = generate(apply, empty_cache, params, encoded,
                       max_new_tokens or s.max_new_tokens, rng, block_size=cfg.block_size,
                       temperature=s.temperature if temperature is None else temperature,
                       top_k=s.top_k if top_k is None else top_k,
                       top_p=s.top_p if top_p is None else top_p)
        return [p + tokenizer.decode(o) for p, o in zip(prompts, out, strict=True)]

    def save_samples(texts: list[str], directory: str, step: int) -> str:
        path = pathlib.Path(directory) / f"step_{step:08d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        sep = "\n" + "-" * 40 + "\n"
        path.write_text(sep.join(texts))
        return sep.join(texts)

    return Family(
        init=init,
        train_step=make_train_step(loss_fn, tx, accum_steps=config.train.grad_accum_steps,
                                   ema_decay=config.train.ema_decay,
                                   schedule=learning_rate_schedule(config.train)),
        eval_step=eval_step, sample=sample, save_samples=save_samples,
        summarize_eval=lambda m: lm_metrics(m["loss"], data_info["bytes_per_token"]),
        tokens_per_example=cfg.block_size)
