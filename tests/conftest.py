"""Shared fixtures: tiny configs and data files, and one trained run reused across tests."""

from __future__ import annotations

import os
import pathlib
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def tiny_lm_config(**overrides):
    """A 2-layer GPT on a local text file: compiles in a couple of seconds."""
    from genai_jax.config import base_config

    c = base_config()
    c.data.update(name="text_file", tokenizer="char")
    c.model.update(block_size=16, num_layers=2, num_heads=2, embed_dim=32)
    c.train.update(steps=20, batch_size=4, warmup_steps=2, log_every=5, learning_rate=3e-3)
    c.eval.update(every=10, steps=2)
    c.checkpoint.update(every=10, keep=2)
    c.sample.update(max_new_tokens=8)
    return overridden(c, overrides)


def overridden(config, overrides: dict):
    """`config` with dotted `overrides` ({"train.steps": 4, ...}) applied, then locked."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    config.lock()
    return config


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> pathlib.Path:
    """A small generated corpus (a few KB of varied English-like text)."""
    words = ("the quick brown fox jumps over a lazy dog while seven wizards hum softly "
             "and bright stars glow above quiet hills").split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(5 + i % 7)).capitalize() + "."
             for i in range(400)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def env():
    """Environment for subprocesses: the repo importable, no accelerator probing noise."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["JAX_PLATFORMS"] = "cpu"
    return e


@pytest.fixture(scope="session", autouse=True)
def _private_cache_and_tmp(tmp_path_factory):
    """Tests write nothing outside their own directories: the embedded data sets and the
    evaluation classifiers are built once per test session into a cache of its own (shared by
    the workers of `pytest -n`, whose temporary directories sit side by side), and temporary
    files (TFDS leaves an empty one per builder it constructs) go below the session's."""
    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent
    os.environ["GENAI_JAX_CACHE"] = str(root / "genai_jax_cache")
    scratch = tmp_path_factory.getbasetemp() / "tmp"
    scratch.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = tempfile.tempdir = str(scratch)
    # Compiled programs are kept for this process only (a cache per pytest worker; the
    # subprocesses tests start do not use it): a resumed run, or a test that builds the same
    # run again, loads its steps instead of compiling them again.
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp() / "jit"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def image_data_config(name: str = "digits", **overrides):
    """The `data` section of an image config (a ConfigDict) with `overrides`."""
    import ml_collections

    from genai_jax.data import defaults

    c = ml_collections.ConfigDict(defaults("image"))
    c.name = name
    c.update(overrides)
    return c
