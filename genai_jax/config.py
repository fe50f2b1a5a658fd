"""Config defaults shared by every experiment, and the checks that run before anything compiles.

Experiment files in `experiments/configs/` start from `base_config()` and set their own values;
`validate` rejects impossible values with one line that names the key and the fix (unknown keys
and wrong types are already rejected by the locked `ConfigDict` and `config_flags`).
"""

from __future__ import annotations

import json
import pathlib

import ml_collections

from genai_jax.errors import UserError
from genai_jax.nn import IMPLEMENTATIONS


class ConfigError(UserError):
    """A config value that cannot work; the message names the key and the fix."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(name="stdlib_code", path="", data_dir="", tokenizer="byte",
                  train_split="train", eval_split="validation", text_key="text",
                  validation_fraction=0.1)
    c.model = dict(family="transformer", block_size=64, num_layers=4, num_heads=4,
                   num_kv_heads=0, embed_dim=128, mlp_ratio=4.0, mlp="gelu", norm="layernorm",
                   position="learned", use_bias=True, tie_embeddings=True, dropout=0.0,
                   attention="xla", dtype="float32", param_dtype="float32")
    c.train = dict(steps=1000, batch_size=12, learning_rate=1e-3, min_learning_rate=1e-4,
                   warmup_steps=100, weight_decay=0.1, b1=0.9, b2=0.99, grad_clip=1.0,
                   grad_accum_steps=1, ema_decay=0.0, log_every=50,
                   steps_per_call=1)
    c.eval = dict(every=250, steps=20, batch_size=0)  # batch_size 0: train.batch_size
    c.checkpoint = dict(every=500, keep=3, async_save=True)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sample = dict(prompt="", num_samples=1, max_new_tokens=200, temperature=0.8, top_k=0,
                    top_p=1.0)
    return c


_CHOICES = {
    "model.mlp": ("gelu", "swiglu"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.position": ("learned", "rotary"),
    "model.attention": IMPLEMENTATIONS,
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "data.tokenizer": ("byte", "char"),
}
_POSITIVE = ("train.steps", "train.batch_size", "train.grad_accum_steps", "train.log_every",
             "train.steps_per_call",
             "eval.every", "eval.steps", "checkpoint.every", "checkpoint.keep",
             "model.block_size", "model.num_layers", "model.num_heads", "model.embed_dim",
             "sample.num_samples", "sample.max_new_tokens")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for the first impossible value found."""
    from genai_jax import models

    if config.model.family not in models.FAMILIES:
        raise ConfigError(f"model.family={config.model.family!r} is not one of "
                          f"{sorted(models.FAMILIES)}")
    for key, choices in _CHOICES.items():
        if _get(config, key) not in choices:
            raise ConfigError(f"{key}={_get(config, key)!r} is not one of {list(choices)}")
    for key in _POSITIVE:
        if _get(config, key) <= 0:
            raise ConfigError(f"{key}={_get(config, key)} must be positive")
    m, t = config.model, config.train
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
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(f"train.grad_accum_steps={t.grad_accum_steps} must divide "
                          f"train.batch_size={t.batch_size}")
    for key in ("train.steps", "train.log_every", "eval.every", "checkpoint.every"):
        if _get(config, key) % t.steps_per_call:
            raise ConfigError(f"{key}={_get(config, key)} must be a multiple of "
                              f"train.steps_per_call={t.steps_per_call}")
    if config.eval.batch_size < 0:
        raise ConfigError(f"eval.batch_size={config.eval.batch_size} must be >= 0 "
                          "(0 = train.batch_size)")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={t.ema_decay} must be in [0, 1) (0 = no EMA)")
    if t.learning_rate <= 0 or t.min_learning_rate < 0 or t.warmup_steps < 0:
        raise ConfigError("train.learning_rate must be positive, train.min_learning_rate and "
                          "train.warmup_steps non-negative")
    if not 0.0 < config.data.validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction={config.data.validation_fraction} must be "
                          "in (0, 1)")
    if config.sample.temperature < 0 or not 0.0 < config.sample.top_p <= 1.0:
        raise ConfigError("sample.temperature must be >= 0 and sample.top_p in (0, 1]")
    if config.data.name == "text_file" and not config.data.path:
        raise ConfigError("data.name='text_file' needs data.path: pass --config.data.path=FILE")
    if config.data.path and not pathlib.Path(config.data.path).expanduser().exists():
        raise ConfigError(f"data.path {config.data.path!r} does not exist")


def save(config: ml_collections.ConfigDict, path: pathlib.Path) -> None:
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def load(path: pathlib.Path) -> ml_collections.ConfigDict:
    """A config saved by `save`, locked like a config file's."""
    config = ml_collections.ConfigDict(json.loads(path.read_text()))
    config.lock()
    return config


# Keys whose change makes a checkpoint unusable (the state's shapes or meaning).
_STATE_KEYS = ("model", "data.tokenizer", "data.name", "train.ema_decay", "train.grad_clip")


def incompatibilities(saved: ml_collections.ConfigDict,
                      current: ml_collections.ConfigDict) -> list[str]:
    """`key: saved -> current` for every state-defining key that differs."""
    out = []
    for key in _STATE_KEYS:
        a, b = _get(saved, key), _get(current, key)
        if isinstance(a, ml_collections.ConfigDict):
            out += [f"{key}.{k}: {a[k]!r} -> {b.get(k)!r}" for k in a if a[k] != b.get(k)]
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out
