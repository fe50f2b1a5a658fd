"""The model zoo: one module per family, each building a `Family` of pure functions.

A family module provides `build(config, data_info) -> Family`, `config_defaults()` (its
`model`, `sample` and extra `eval` keys) and `validate(config)` (its own impossible values).
Registering it here is all it takes for `experiments.train` to run it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from genai_jax.models.family import Family

# family name -> (module, data modality)
FAMILIES = {
    "transformer": ("genai_jax.models.lm", "text"),
    "vae": ("genai_jax.models.vae", "image"),
    "gan": ("genai_jax.models.gan", "image"),
    "diffusion": ("genai_jax.models.diffusion", "image"),
}


def modality(name: str) -> str:
    return FAMILIES[name][1]


def module(name: str) -> ModuleType:
    return importlib.import_module(FAMILIES[name][0])


def build(config, data_info: dict) -> Family:
    return module(config.model.family).build(config, data_info)


__all__ = ["FAMILIES", "Family", "build", "modality", "module"]
