"""The transformer language-model family: next-token cross-entropy on token windows."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import optax
from flax import nnx

from genai_jax import config_checks as config_lib
from genai_jax.config_checks import ConfigError
from genai_jax.data.tokenizers import parse_spec
from genai_jax.evaluation.lm import lm_metrics
from genai_jax.models.family import Family
from genai_jax.models.transformer import Transformer, TransformerConfig, init_cache
from genai_jax.nn import IMPLEMENTATIONS, REMAT_POLICIES
from genai_jax.optim import TrainState, learning_rate_schedule, make_optimizer, make_train_step
from genai_jax.sampling.decode import generate


def config_defaults() -> dict:
    return {
        "model": dict(block_size=64, num_layers=4, num_heads=4, num_kv_heads=0, embed_dim=128,
                      mlp_ratio=4.0, mlp="gelu", norm="layernorm", position="learned",
                      use_bias=True, tie_embeddings=True, dropout=0.0, attention="xla",
                      dtype="float32", param_dtype="float32", remat="none"),
        "sample": dict(prompt="", num_samples=1, max_new_tokens=200, temperature=0.8, top_k=0,
                       top_p=1.0),
    }


def validate(config) -> None:
    m = config.model
    config_lib.check_choices(config, {
        "model.mlp": ("gelu", "swiglu"),
        "model.norm": ("layernorm", "rmsnorm"),
        "model.position": ("learned", "rotary"),
        "model.attention": IMPLEMENTATIONS,
        "model.remat": tuple(REMAT_POLICIES),
        "model.dtype": ("float32", "bfloat16", "float16"),
        "model.param_dtype": ("float32", "bfloat16"),
    })
    parse_spec(config.data.tokenizer)
    config_lib.check_positive(config, ("model.block_size", "model.num_layers", "model.num_heads",
                                       "model.embed_dim", "sample.max_new_tokens"))
    if m.embed_dim % m.num_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} must divide "
                          f"model.embed_dim={m.embed_dim}")
    kv = m.num_kv_heads or m.num_heads
    if m.num_kv_heads < 0 or m.num_heads % kv:
        raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} must divide "
                          f"model.num_heads={m.num_heads} (0 = same as num_heads)")
    if m.position == "rotary" and (m.embed_dim // m.num_heads) % 2:
        raise ConfigError("rotary positions need an even head dimension "
                          "(model.embed_dim / model.num_heads)")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if config.sample.temperature < 0 or not 0.0 < config.sample.top_p <= 1.0:
        raise ConfigError("sample.temperature must be >= 0 and sample.top_p in (0, 1]")
    if config.data.name == "text_file" and not config.data.path:
        raise ConfigError("data.name='text_file' needs data.path: pass --config.data.path=FILE")


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
        params = state.eval_params
        loss, _ = loss_fn(params, batch, None)
        return {"loss": loss}

    # One hashable apply/init_cache per family, so decoding compiles once per shape.
    apply = functools.partial(_apply, graphdef)
    empty_cache = functools.partial(init_cache, cfg)

    def sample(state: TrainState, rng: jax.Array, prompts: list[str] | None = None,
               max_new_tokens: int | None = None, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None,
               num_samples: int | None = None) -> list[str]:
        s = config.sample
        prompts = prompts if prompts is not None else [s.prompt] * (num_samples or
                                                                    s.num_samples)
        params = state.eval_params
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
        sep = "\n" + "-" * 40 + "\n"
        if jax.process_index() == 0:  # one process writes
            path.parent.mkdir(parents=True, exist_ok=True)
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
