"""Config defaults shared by every experiment, and the checks that run before anything compiles.

Experiment files in `experiments/configs/` start from `base_config(family)` and set their own
values; `validate` rejects impossible values with one line that names the key and the fix
(unknown keys and wrong types are already rejected by the locked `ConfigDict` and
`config_flags`). It composes the families' defaults, so it sits above `genai_jax.models`; the
families check their own keys with `genai_jax.config_checks` (whose `ConfigError` is this one).
"""

from __future__ import annotations

import json
import pathlib

import ml_collections
from ml_collections.config_dict import placeholder

from genai_jax import data, models, parallel
from genai_jax.config_checks import (
    ConfigError,
    check_choices,
    check_positive,
    federated_enabled,
    get,
    get_or_none,
    privacy_enabled,
)


def base_config(family: str = "transformer") -> ml_collections.ConfigDict:
    """Defaults every experiment shares, with `family`'s model and sampling defaults and its
    data modality's data defaults (`genai_jax.models.FAMILIES`)."""
    defaults = models.module(family).config_defaults()
    c = ml_collections.ConfigDict()
    c.seed = 0
    # A workdir (trained or imported) to start from: its weights, model.* keys and tokenizer.
    c.init_from = ""
    c.data = data.defaults(models.modality(family))
    c.model = dict(family=family, **defaults["model"])
    c.train = dict(steps=1000, batch_size=12, learning_rate=1e-3, min_learning_rate=1e-4,
                   warmup_steps=100, weight_decay=0.1, b1=0.9, b2=0.99, grad_clip=1.0,
                   grad_accum_steps=1, ema_decay=0.0, log_every=50,
                   steps_per_call=1)
    # DP-SGD (`genai_jax.optim.dp`), on when a noise multiplier or a target epsilon is set:
    # per-example gradients clipped to clip_norm, Gaussian noise of noise_multiplier x
    # clip_norm (solved from target_epsilon over train.steps when unset); sampling "poisson"
    # (what the accountant assumes) or "shuffle" (fixed batches: no guarantee); accountant
    # "rdp" or "pld"; per_example_chunk: examples whose gradients are computed at once (0: a
    # whole micro-batch). train.grad_clip must be 0.
    c.train.privacy = ml_collections.ConfigDict(dict(
        noise_multiplier=placeholder(float), target_epsilon=placeholder(float), clip_norm=1.0,
        delta=1e-5, sampling="poisson", accountant="rdp", per_example_chunk=0))
    # Federated training (`genai_jax.optim.federated`), on when clients_per_round > 0: a step
    # is a round in which clients_per_round of the clients of `partition` ("iid", "label_skew"
    # (labelled images, Dirichlet dirichlet_alpha), "by_speaker" (play text)) each take
    # local_steps steps of client_optimizer ("sgd", or "adam" with fresh moments each round)
    # at client_lr (client_lr_schedule "constant", or "cosine": a warm-up over
    # train.warmup_steps rounds, then a decay to a tenth) on local batches of
    # train.batch_size (clipped to train.grad_clip when set), and the server
    # applies the mean client update with server_optimizer ("fedavg": SGD with
    # server_momentum, "fedadam": Adam) at server_lr. num_clients: iid and
    # label_skew deal the data into that many; by_speaker keeps the N speakers with the most
    # text (0: all). client_sampling: "uniform" (the round's clients drawn uniformly, their
    # updates weighted by their amounts of data), or "by_size" (drawn with replacement in
    # proportion to their amounts of data, updates weighted equally). client_moments: Adam
    # clients' moments "fresh" every round, or "averaged" (kept by the server as the mean of the
    # last round's clients' moments). With train.privacy:
    # user-level DP-FedAvg (clip_norm bounds a client's update; a client is the privacy unit;
    # clients uniform, weighted equally).
    c.train.federated = ml_collections.ConfigDict(dict(
        clients_per_round=0, num_clients=0, partition="iid", dirichlet_alpha=0.5,
        local_steps=5, client_lr=0.1, client_lr_schedule="constant", client_optimizer="sgd",
        server_optimizer="fedavg", server_lr=1.0, server_momentum=0.0,
        client_sampling="uniform", client_moments="fresh"))
    # eval.batch_size 0: train.batch_size
    c.eval = dict(every=250, steps=20, batch_size=0, **defaults.get("eval", {}))
    c.checkpoint = dict(every=500, keep=3, async_save=True)
    # Mesh axis sizes (-1: the remaining devices) and the logical-axis -> mesh-axes rules
    # (comma-separated mesh axes, "" = replicated), e.g. --config.mesh.rules.embed=tensor.
    c.mesh = dict(data=-1, fsdp=1, tensor=1, rules=parallel.rules_as_config())
    c.sample = defaults["sample"]
    return c


_POSITIVE = ("train.steps", "train.batch_size", "train.grad_accum_steps", "train.log_every",
             "train.steps_per_call", "eval.every", "eval.steps", "checkpoint.every",
             "checkpoint.keep", "sample.num_samples")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for the first impossible value found: the keys every experiment has
    here, then the family's own (`validate` of its module)."""
    if config.model.family not in models.FAMILIES:
        raise ConfigError(f"model.family={config.model.family!r} is not one of "
                          f"{sorted(models.FAMILIES)}")
    check_positive(config, _POSITIVE)
    t = config.train
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(f"train.grad_accum_steps={t.grad_accum_steps} must divide "
                          f"train.batch_size={t.batch_size}")
    for key in ("train.steps", "train.log_every", "eval.every", "checkpoint.every"):
        if get(config, key) % t.steps_per_call:
            raise ConfigError(f"{key}={get(config, key)} must be a multiple of "
                              f"train.steps_per_call={t.steps_per_call}")
    if config.eval.batch_size < 0:
        raise ConfigError(f"eval.batch_size={config.eval.batch_size} must be >= 0 "
                          "(0 = train.batch_size)")
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={t.ema_decay} must be in [0, 1) (0 = no EMA)")
    if t.learning_rate <= 0 or t.min_learning_rate < 0 or t.warmup_steps < 0:
        raise ConfigError("train.learning_rate must be positive, train.min_learning_rate and "
                          "train.warmup_steps non-negative")
    if not 0.0 <= config.data.nonmember_fraction < 1.0:
        raise ConfigError(f"data.nonmember_fraction={config.data.nonmember_fraction} must be "
                          "in [0, 1)")
    if (get_or_none(config, "data.canary_repeats") or 1) < 1:
        raise ConfigError(f"data.canary_repeats={config.data.canary_repeats} must be >= 1")
    for key in ("data.workers", "data.prefetch", "data.random_crop", "data.max_members",
                "data.canaries"):
        if (get_or_none(config, key) or 0) < 0:
            raise ConfigError(f"{key}={get(config, key)} must be >= 0")
    if not 0.0 < config.data.validation_fraction < 1.0:
        raise ConfigError(f"data.validation_fraction={config.data.validation_fraction} must be "
                          "in (0, 1)")
    if config.data.path and not pathlib.Path(config.data.path).expanduser().exists():
        raise ConfigError(f"data.path {config.data.path!r} does not exist")
    parallel.rules_from_config(config.mesh)
    _validate_privacy(config)
    _validate_federated(config)
    models.module(config.model.family).validate(config)


def _validate_privacy(config) -> None:
    p = config.train.privacy
    check_choices(config, {"train.privacy.sampling": ("poisson", "shuffle"),
                           "train.privacy.accountant": ("rdp", "pld")})
    if not privacy_enabled(config):
        return
    # (Federated: grad_clip clips the clients' local steps, clip_norm their updates.)
    if (config.train.grad_clip > 0 and config.model.family != "gan"  # the GAN has none
            and not federated_enabled(config)):
        raise ConfigError(f"train.grad_clip={config.train.grad_clip} clips the batch gradient, "
                          "which DP-SGD replaces with per-example clipping "
                          "(train.privacy.clip_norm): set --config.train.grad_clip=0")
    if not p.clip_norm > 0 or not 0 < p.delta < 1 or p.per_example_chunk < 0:
        raise ConfigError("train.privacy.clip_norm must be positive, train.privacy.delta in "
                          "(0, 1) and train.privacy.per_example_chunk >= 0")
    if p.noise_multiplier is not None and p.noise_multiplier < 0:
        raise ConfigError(f"train.privacy.noise_multiplier={p.noise_multiplier} must be >= 0")
    if p.target_epsilon is not None and not p.target_epsilon > 0:
        raise ConfigError(f"train.privacy.target_epsilon={p.target_epsilon} must be positive")
    micro = config.train.batch_size // config.train.grad_accum_steps
    if p.per_example_chunk and micro % p.per_example_chunk:
        raise ConfigError(f"train.privacy.per_example_chunk={p.per_example_chunk} must divide "
                          f"the micro-batch of {micro} (train.batch_size / "
                          "train.grad_accum_steps)")


def _validate_federated(config) -> None:
    f, t = config.train.federated, config.train
    check_choices(config, {"train.federated.partition": ("iid", "label_skew", "by_speaker"),
                           "train.federated.server_optimizer": ("fedavg", "fedadam"),
                           "train.federated.client_optimizer": ("sgd", "adam"),
                           "train.federated.client_lr_schedule": ("constant", "cosine"),
                           "train.federated.client_sampling": ("uniform", "by_size"),
                           "train.federated.client_moments": ("fresh", "averaged")})
    if not 0.0 <= f.server_momentum < 1.0:
        raise ConfigError(f"train.federated.server_momentum={f.server_momentum} must be in "
                          "[0, 1)")
    if f.clients_per_round < 0 or f.num_clients < 0:
        raise ConfigError("train.federated.clients_per_round and num_clients must be >= 0 "
                          "(clients_per_round 0: centralised training)")
    if not federated_enabled(config):
        return
    if config.model.family == "gan":
        raise ConfigError("federated training (train.federated.clients_per_round > 0) runs "
                          "families with one loss: the transformer, the VAE and diffusion, "
                          "not the GAN's two players")
    check_positive(config, ("train.federated.local_steps", "train.federated.client_lr",
                            "train.federated.server_lr", "train.federated.dirichlet_alpha"))
    if f.partition != "by_speaker" and f.num_clients < f.clients_per_round:
        raise ConfigError(f"train.federated.partition={f.partition!r} deals the data into "
                          f"train.federated.num_clients={f.num_clients} clients, fewer than "
                          f"clients_per_round={f.clients_per_round}: set num_clients")
    if f.partition == "by_speaker" and 0 < f.num_clients < f.clients_per_round:
        raise ConfigError(f"train.federated.num_clients={f.num_clients} keeps fewer speakers "
                          f"than clients_per_round={f.clients_per_round}")
    modality = models.modality(config.model.family)
    wanted = {"label_skew": "image", "by_speaker": "text"}.get(f.partition, modality)
    if wanted != modality:
        raise ConfigError(f"train.federated.partition={f.partition!r} partitions {wanted} "
                          f"data, and model.family={config.model.family!r} trains on "
                          f"{modality}: use 'iid' or "
                          f"{'by_speaker' if modality == 'text' else 'label_skew'}")
    if t.grad_accum_steps != 1:
        raise ConfigError("train.grad_accum_steps must be 1 in federated training: a round's "
                          "clients already take train.federated.local_steps steps each")
    if f.client_sampling == "by_size" and privacy_enabled(config):
        raise ConfigError("train.federated.client_sampling='by_size' favours the clients with "
                          "more data; DP-FedAvg samples clients uniformly and weighs them "
                          "equally (a client is the privacy unit): use 'uniform'")
    if f.client_moments == "averaged" and (f.client_optimizer != "adam"
                                           or privacy_enabled(config)):
        raise ConfigError("train.federated.client_moments='averaged' averages the Adam "
                          "clients' moments at the server (client_optimizer='adam'), without "
                          "noise: not under DP-FedAvg")
    if t.privacy.per_example_chunk:
        raise ConfigError("train.privacy.per_example_chunk is DP-SGD's: DP-FedAvg clips whole "
                          "client updates; set it to 0")
    d = config.data
    if d.nonmember_fraction or d.max_members or d.get("canaries"):
        raise ConfigError("privacy audits (data.nonmember_fraction, data.max_members, "
                          "data.canaries) split centralised training data: not federated runs")


# model.* keys a run started from another (`init_from`) may set its own way: how the same
# weights are computed with, regularised or stored, never their shapes or meaning.
_FINETUNE_FREE = ("attention", "remat", "dropout", "dtype", "param_dtype", "lora")


def inherit(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict,
            source: str) -> ml_collections.ConfigDict:
    """`config` with the `model.*` keys and `data.tokenizer` of `base` (the config of the run
    `source` that `config.init_from` names) wherever `config` leaves them at their defaults.

    A key that `config` sets to another value than `base` is refused with one line naming it;
    so is another model family. `model.block_size` may be smaller (rotary positions only: a
    learned position table has one row per position)."""
    if base.model.family != config.model.family:
        raise ConfigError(f"init_from={source} holds a {base.model.family!r} model, and this "
                          f"config a {config.model.family!r} one")
    defaults = base_config(config.model.family)
    out = ml_collections.ConfigDict(config.to_dict())
    conflicts = []
    for key, value in base.model.items():
        if key in _FINETUNE_FREE or key not in out.model:
            continue
        mine = out.model[key]
        if mine == defaults.model.get(key) or mine == value:
            out.model[key] = value
        elif key == "block_size" and mine < value and base.model.position == "rotary":
            continue
        else:
            conflicts.append(f"model.{key}={mine!r} (it has {value!r})")
    if out.data.tokenizer not in (defaults.data.tokenizer, base.data.tokenizer):
        conflicts.append(f"data.tokenizer={out.data.tokenizer!r} (it has "
                         f"{base.data.tokenizer!r})")
    if conflicts:
        raise ConfigError(f"init_from={source} holds another model: {'; '.join(conflicts[:3])};"
                          " leave these keys unset to inherit them")
    out.data.tokenizer = base.data.tokenizer
    out.lock()
    return out


def save(config: ml_collections.ConfigDict, path: pathlib.Path) -> None:
    """Write `config` as JSON, atomically (other processes of a run may be reading it)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def load(path: pathlib.Path) -> ml_collections.ConfigDict:
    """A config saved by `save`, locked like a config file's. Keys added to the family's
    defaults since the run was saved take their default values."""

    def merged(defaults: dict, saved: dict) -> dict:
        out = dict(defaults)
        for key, value in saved.items():
            both = isinstance(value, dict) and isinstance(defaults.get(key), dict)
            out[key] = merged(defaults[key], value) if both else value
        return out

    saved = json.loads(path.read_text())
    defaults = base_config(saved["model"]["family"]).to_dict()
    config = ml_collections.ConfigDict(merged(defaults, saved))
    config.lock()
    return config


# Keys whose change makes a checkpoint unusable (the state's shapes or meaning), and the keys
# inside them that only change how the same state is computed with.
# A run's privacy settings are part of what it is (its guarantee covers all of its steps), and
# so is a privacy audit's split of its data into members and non-members, and a federated
# run's clients and rounds (its server optimizer's state has another meaning).
_STATE_KEYS = ("model", "data.name", "data.tokenizer", "train.ema_decay", "train.grad_clip",
               "train.privacy", "train.federated", "data.nonmember_fraction", "data.max_members",
               "data.canaries", "data.canary_repeats")
_COMPUTE_ONLY = ("model.remat", "model.attention", "model.kernels")


def incompatibilities(saved: ml_collections.ConfigDict,
                      current: ml_collections.ConfigDict) -> list[str]:
    """`key: saved -> current` for every state-defining key that differs. `saved` was read back
    from JSON, so `current` goes through JSON too: a tuple and the list it was saved as agree."""
    current = ml_collections.ConfigDict(json.loads(current.to_json_best_effort()))
    plain = lambda v: v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
    out = []
    for key in _STATE_KEYS:
        a, b = get_or_none(saved, key), get_or_none(current, key)
        if isinstance(a, ml_collections.ConfigDict):
            out += [f"{key}.{k}: {plain(a[k])!r} -> {plain(b.get(k))!r}" for k in a
                    if plain(a[k]) != plain(b.get(k)) and f"{key}.{k}" not in _COMPUTE_ONLY]
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out
