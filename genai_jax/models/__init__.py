"""The model zoo: one module per family, each building a `Family` of pure functions."""

from __future__ import annotations

from genai_jax.models.family import Family

# family name -> (module providing `build(config, data_info) -> Family`, data modality)
FAMILIES = {
    "transformer": ("genai_jax.models.lm", "text"),
}


def modality(name: str) -> str:
    return FAMILIES[name][1]


def build(config, data_info: dict) -> Family:
    import importlib

    module, _ = FAMILIES[config.model.family]
    return importlib.import_module(module).build(config, data_info)


__all__ = ["FAMILIES", "Family", "build", "modality"]
