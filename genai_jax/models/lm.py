"""The transformer language-model family: next-token cross-entropy on token windows."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from genai_jax import config_checks as config_lib
from genai_jax.config_checks import ConfigError
from genai_jax.evaluation.lm import lm_metrics
from genai_jax.models.family import Family
from genai_jax.models.transformer import (
    ATTENTION_PROJECTIONS,
    LORA_TARGETS,
    MLP_PROJECTIONS,
    Transformer,
    TransformerConfig,
    init_cache,
)
from genai_jax.nn import IMPLEMENTATIONS, REMAT_POLICIES, Dense, LoRA, LoRAParam
from genai_jax.optim import (
    TrainState,
    federated_from_config,
    learning_rate_schedule,
    make_optimizer,
    make_train_step,
    privacy_from_config,
)
from genai_jax.sampling.decode import generate
from genai_jax.tokenization.tokenizers import parse_spec


def config_defaults() -> dict:
    return {
        # vocab_size 0: the tokenizer's (an imported checkpoint's may be larger)
        "model": dict(vocab_size=0, block_size=64, num_layers=4, num_heads=4, num_kv_heads=0,
                      embed_dim=128, mlp_ratio=4.0, mlp="gelu", norm="layernorm", norm_eps=1e-5,
                      position="learned", rope_theta=10_000.0, rope_scaling="none",
                      rope_factor=1.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                      rope_original_context=8192, head_dim=0, mlp_dim=0, use_bias=True,
                      qkv_bias=False, tie_embeddings=True, dropout=0.0, attention="xla",
                      dtype="float32", param_dtype="float32", remat="none",
                      # LoRA (rank 0: off): adapters on the projections named in `targets`
                      # (q, k, v, out, gate, up, down; "attention", "mlp", "all"; or the
                      # Hugging Face names q_proj, ...); only they are trained, and the
                      # whole modules in `modules_to_save` (embed, head), as PEFT's.
                      lora=dict(rank=0, alpha=16.0, dropout=0.0, targets="attention",
                                modules_to_save="")),
        "sample": dict(prompt="", num_samples=1, max_new_tokens=200, temperature=0.8, top_k=0,
                       top_p=1.0),
    }


def validate(config) -> None:
    m = config.model
    config_lib.check_choices(config, {
        "model.mlp": ("gelu", "gelu_tanh", "swiglu"),
        "model.norm": ("layernorm", "rmsnorm"),
        "model.position": ("learned", "rotary"),
        "model.rope_scaling": ("none", "linear", "llama3"),
        "model.attention": IMPLEMENTATIONS,
        "model.remat": tuple(REMAT_POLICIES),
        "model.dtype": ("float32", "bfloat16", "float16"),
        "model.param_dtype": ("float32", "bfloat16"),
    })
    parse_spec(config.data.tokenizer)
    config_lib.check_positive(config, ("model.block_size", "model.num_layers", "model.num_heads",
                                       "model.embed_dim", "sample.max_new_tokens"))
    if m.embed_dim % m.num_heads and not m.head_dim:
        raise ConfigError(f"model.num_heads={m.num_heads} must divide "
                          f"model.embed_dim={m.embed_dim} (or set model.head_dim)")
    if m.head_dim < 0 or m.mlp_dim < 0 or m.norm_eps <= 0 or m.rope_theta <= 0:
        raise ConfigError("model.head_dim and model.mlp_dim must be >= 0 (0 = derived), "
                          "model.norm_eps and model.rope_theta positive")
    kv = m.num_kv_heads or m.num_heads
    if m.num_kv_heads < 0 or m.num_heads % kv:
        raise ConfigError(f"model.num_kv_heads={m.num_kv_heads} must divide "
                          f"model.num_heads={m.num_heads} (0 = same as num_heads)")
    if m.position == "rotary" and (m.head_dim or m.embed_dim // m.num_heads) % 2:
        raise ConfigError("rotary positions need an even head dimension "
                          "(model.head_dim, or model.embed_dim / model.num_heads)")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if m.lora.rank < 0 or m.lora.alpha <= 0 or not 0.0 <= m.lora.dropout < 1.0:
        raise ConfigError("model.lora.rank must be >= 0 (0 = no LoRA), model.lora.alpha "
                          "positive and model.lora.dropout in [0, 1)")
    if m.lora.rank:
        lora_targets(m.lora.targets, m.mlp)
    saved = lora_modules_to_save(m.lora.modules_to_save, m.tie_embeddings)
    if saved and not m.lora.rank:
        raise ConfigError("model.lora.modules_to_save trains whole modules beside LoRA adapters: "
                          "it needs model.lora.rank > 0 (without LoRA every weight is trained)")
    if config.sample.temperature < 0 or not 0.0 < config.sample.top_p <= 1.0:
        raise ConfigError("sample.temperature must be >= 0 and sample.top_p in (0, 1]")
    if config.data.name in ("text_file", "instructions") and not config.data.path:
        raise ConfigError(f"data.name={config.data.name!r} needs data.path: pass "
                          "--config.data.path=FILE")


_TARGET_NAMES = {"attention": ATTENTION_PROJECTIONS, "mlp": MLP_PROJECTIONS, "all": LORA_TARGETS,
                 "o": ("out",), **{t: (t,) for t in LORA_TARGETS},
                 **{f"{t}_proj": (t,) for t in ("q", "k", "v", "gate", "up", "down")},
                 "o_proj": ("out",)}


def lora_targets(spec: str, mlp: str) -> tuple[str, ...]:
    """The projections `model.lora.targets` names (comma-separated), in LORA_TARGETS order;
    a name that is no projection of this model is refused."""
    names = [n.strip() for n in str(spec).split(",") if n.strip()]
    unknown = [n for n in names if n not in _TARGET_NAMES]
    if unknown or not names:
        raise ConfigError(f"model.lora.targets={spec!r}: {unknown[0] if unknown else 'empty'} "
                          f"names no projection; use {', '.join(LORA_TARGETS)}, 'attention', "
                          "'mlp', 'all' or the Hugging Face names (q_proj, ...)")
    chosen = {t for n in names for t in _TARGET_NAMES[n]}
    if mlp != "swiglu" and "gate" in chosen:
        if any(n in ("gate", "gate_proj") for n in names):
            raise ConfigError(f"model.lora.targets={spec!r} names 'gate', which a "
                              f"model.mlp={mlp!r} model does not have (SwiGLU only)")
        chosen.discard("gate")
    return tuple(t for t in LORA_TARGETS if t in chosen)


# The modules a LoRA run may train whole beside its adapters (PEFT's `modules_to_save`).
_SAVE_NAMES = {"embed": "embed", "embed_tokens": "embed", "head": "head", "lm_head": "head"}


def lora_modules_to_save(spec: str, tie_embeddings: bool) -> tuple[str, ...]:
    """The modules `model.lora.modules_to_save` names (comma-separated; may be empty), of
    ("embed", "head"); an unknown name, or the head of a model whose head is its embedding
    (`tie_embeddings`), is refused."""
    names = [n.strip() for n in str(spec).split(",") if n.strip()]
    unknown = [n for n in names if n not in _SAVE_NAMES]
    if unknown:
        raise ConfigError(f"model.lora.modules_to_save={spec!r}: {unknown[0]!r} names no module "
                          "a LoRA run can train whole; use embed, head (or embed_tokens, lm_head)")
    chosen = {_SAVE_NAMES[n] for n in names}
    if "head" in chosen and tie_embeddings:
        raise ConfigError(f"model.lora.modules_to_save={spec!r} names the head, but "
                          "model.tie_embeddings is set (the head is the embedding): name 'embed'")
    return tuple(m for m in ("embed", "head") if m in chosen)


def model_config(config, vocab_size: int) -> TransformerConfig:
    """The transformer of `config.model`, its vocabulary `model.vocab_size` or, when that is 0,
    the tokenizer's `vocab_size`; a tokenizer with more tokens than the model is refused."""
    fields = {f.name for f in dataclasses.fields(TransformerConfig)} - {
        "vocab_size", "lora", "lora_targets"}
    kwargs = {k: v for k, v in config.model.items() if k in fields}
    lora = config.model.get("lora")
    if lora is not None and lora.rank:
        kwargs.update(lora=LoRA(lora.rank, lora.alpha, lora.dropout),
                      lora_targets=lora_targets(lora.targets, config.model.mlp))
    model_vocab = config.model.get("vocab_size", 0) or vocab_size
    if vocab_size > model_vocab:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but model.vocab_size is "
                          f"{model_vocab}: use the model's own tokenizer")
    return TransformerConfig(vocab_size=model_vocab, **kwargs)


def _until(tokens, eos: int | None):
    """`tokens` up to (without) the first end-of-sequence token: generation stops there."""
    tokens = list(tokens)
    return tokens[:tokens.index(eos)] if eos is not None and eos in tokens else tokens


def _apply(graphdef, params, tokens, positions, cache):
    """The cached forward pass, for `sampling.decode`."""
    return nnx.merge(graphdef, params)(tokens, positions=positions, cache=cache)


def build(config, data_info: dict) -> Family:
    """The LM family for `config`; `data_info` has `tokenizer` (and its `vocab_size`)."""
    tokenizer = data_info["tokenizer"]
    cfg = model_config(config, tokenizer.vocab_size)
    tx = make_optimizer(config.train)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))

    saved = (lora_modules_to_save(config.model.lora.modules_to_save, cfg.tie_embeddings)
             if cfg.lora is not None else ())
    trained = nnx.Any(LoRAParam, *(nnx.PathContains(m) for m in saved))

    def create(params, state_rng) -> TrainState:
        """The state that trains `params`: all of them, or with LoRA the adapters only and the
        modules of `model.lora.modules_to_save`, in float32 (the optimizer and the EMA see
        nothing else; the base is `frozen`)."""
        if cfg.lora is None:
            return TrainState.create(params, tx, state_rng, config.train.ema_decay)
        adapters, base = nnx.split_state(params, trained, ...)
        adapters = jax.tree.map(lambda x: x.astype(jnp.float32), adapters)
        return TrainState.create(adapters, tx, state_rng, config.train.ema_decay, frozen=base)

    def init(rng: jax.Array) -> TrainState:
        params_rng, state_rng = jax.random.split(rng)
        return create(nnx.state(Transformer(cfg, rngs=nnx.Rngs(params=params_rng)), nnx.Param),
                      state_rng)

    def init_from_params(params, rng: jax.Array) -> TrainState:
        """A fresh state around pretrained `params` (a model without adapters), cast to
        `model.param_dtype`; LoRA adapters start as `init` draws them (B = 0: the pretrained
        function exactly)."""
        params_rng, state_rng = jax.random.split(rng)
        if cfg.lora is None:
            return create(jax.tree.map(lambda x: x.astype(cfg.param_dtype), params), state_rng)
        # The frozen base in model.param_dtype; the modules trained whole stay as they come
        # (`create` makes them float32); fresh adapters (their random base is unused).
        kept, base = nnx.split_state(params, trained, ...)
        fresh = nnx.state(Transformer(cfg, rngs=nnx.Rngs(params=params_rng)), LoRAParam)
        return create(nnx.merge_state(jax.tree.map(lambda x: x.astype(cfg.param_dtype), base),
                                      kept, fresh), state_rng)

    def export_params(state: TrainState):
        """The parameters evaluated with, adapters folded into their kernels: those of the same
        transformer without LoRA (what export and `init_from` take)."""
        model = nnx.merge(graphdef, state.eval_params, copy=True)  # the state stays as it is
        if cfg.lora is None:
            return nnx.state(model, nnx.Param)
        for _, module in nnx.iter_modules(model):
            if isinstance(module, Dense) and module.lora is not None:
                module.kernel[...] = module.merged_kernel()
        # (the modules trained whole are float32: back to the model's parameter dtype)
        return jax.tree.map(lambda x: x.astype(cfg.param_dtype),
                            nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam))))

    dropout = cfg.dropout > 0 or (cfg.lora is not None and cfg.lora.dropout > 0)

    def logits_of(params, batch, rng):
        model = nnx.merge(graphdef, params)
        logits, _ = model(batch["inputs"], positions=batch.get("positions"),
                          segment_ids=batch.get("segment_ids"),
                          rng=rng if dropout else None)
        return logits

    def masked_mean(values, batch):
        """The mean over the tokens the loss counts: packed instruction batches
        (`data.instructions`) and short federated clients carry a loss mask."""
        if "loss_mask" not in batch:
            return values.mean()
        mask = batch["loss_mask"]
        return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    def loss_fn(params, batch, rng):
        """Mean next-token cross-entropy (over the loss mask's tokens, where there is one)."""
        logits = logits_of(params, batch, rng)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return masked_mean(losses, batch), {}

    def eval_step(state: TrainState, batch) -> dict:
        """Loss and next-token accuracy (the share of tokens whose most likely prediction is
        the target)."""
        logits = logits_of(state.eval_params, batch, None)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        hits = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
        return {"loss": masked_mean(losses, batch), "accuracy": masked_mean(hits, batch)}

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
        encoded = [tokenizer.encode_prompt(p) if p else [tokenizer.start_token]
                   for p in prompts]
        encoded = [e if len(e) else [tokenizer.start_token] for e in encoded]
        out = generate(apply, empty_cache, params, encoded,
                       max_new_tokens or s.max_new_tokens, rng, block_size=cfg.block_size,
                       temperature=s.temperature if temperature is None else temperature,
                       top_k=s.top_k if top_k is None else top_k,
                       top_p=s.top_p if top_p is None else top_p)
        return [p + tokenizer.decode(_until(o, tokenizer.eos_token_id))
                for p, o in zip(prompts, out, strict=True)]

    def save_samples(texts: list[str], directory: str, step: int) -> str:
        path = pathlib.Path(directory) / f"step_{step:08d}.txt"
        sep = "\n" + "-" * 40 + "\n"
        if jax.process_index() == 0:  # one process writes
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(sep.join(texts))
        return sep.join(texts)

    return Family(
        init=init, init_from_params=init_from_params, export_params=export_params,
        train_step=make_train_step(loss_fn, tx, accum_steps=config.train.grad_accum_steps,
                                   ema_decay=config.train.ema_decay,
                                   schedule=learning_rate_schedule(config.train),
                                   privacy=privacy_from_config(config, data_info),
                                   federated=federated_from_config(config, data_info)),
        eval_step=eval_step, sample=sample, save_samples=save_samples,
        summarize_eval=lambda m: {**lm_metrics(m["loss"], data_info["bytes_per_token"]),
                                  "accuracy": m["accuracy"]},
        tokens_per_example=cfg.block_size)
