"""What a family needs to check its own config keys: the error, and reading dotted keys.

It sits below the families, which call it from their `validate`; `genai_jax.config`, which
composes the families' defaults and so imports them, sits above.
"""

from __future__ import annotations

from genai_jax.errors import UserError


class ConfigError(UserError):
    """A config value that cannot work; the message names the key and the fix."""


def get(config, dotted: str):
    """`config` at a dotted key, e.g. `get(config, "model.num_heads")`."""
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def get_or_none(config, dotted: str):
    """`get`, or None where the key does not exist (in a config saved by an older version)."""
    try:
        return get(config, dotted)
    except (KeyError, AttributeError):
        return None


def check_choices(config, choices: dict[str, tuple]) -> None:
    """ConfigError unless every dotted key of `choices` has one of its allowed values."""
    for key, allowed in choices.items():
        if get(config, key) not in allowed:
            raise ConfigError(f"{key}={get(config, key)!r} is not one of {list(allowed)}")


def check_positive(config, keys) -> None:
    """ConfigError unless every dotted key of `keys` is positive."""
    for key in keys:
        if get(config, key) <= 0:
            raise ConfigError(f"{key}={get(config, key)} must be positive")


def privacy_enabled(config) -> bool:
    """DP-SGD is on when `train.privacy` sets a noise multiplier or a target epsilon."""
    p = get_or_none(config, "train.privacy")
    return p is not None and (p.noise_multiplier is not None or p.target_epsilon is not None)


def federated_enabled(config) -> bool:
    """Federated training is on when `train.federated.clients_per_round` is positive."""
    return (get_or_none(config, "train.federated.clients_per_round") or 0) > 0
