"""Where genai_jax keeps what it builds once and reuses: `$GENAI_JAX_CACHE` (default
`~/.cache/genai_jax`): the embedded data sets prepared as TFDS data (`tensorflow_datasets/`) and
the scoring classifiers of the image metrics. Tests point it at a temporary directory, so a
test run writes nothing outside its own directories."""

from __future__ import annotations

import os
import pathlib


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GENAI_JAX_CACHE", "~/.cache/genai_jax")).expanduser()


def embedded_data_dir(data_cfg) -> str:
    """The TFDS data dir of an embedded data set (digits, stdlib_code): `data.data_dir` when
    set, else the cache (TFDS's own default, `~/tensorflow_datasets`, is for the catalog's)."""
    if data_cfg.data_dir:
        return os.path.expanduser(data_cfg.data_dir)
    return str(cache_dir() / "tensorflow_datasets")
