"""Data prepared once and kept in the cache (`$GENAI_JAX_CACHE/tokens/KEY`): the text sets a
config names, tokenised (`genai_jax.data.text`), and instruction data, packed
(`genai_jax.data.instructions`). KEY is a digest of everything the prepared data depends on; a
directory counts as prepared once its `index.json` exists (written last)."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import shutil

from genai_jax import paths
from genai_jax.data import shards
from genai_jax.errors import DataError

# A file up to this size is identified by a digest of all of it, a larger one by its size,
# modification time and a digest of its first and last SAMPLE_BYTES.
DIGEST_BYTES = 64 << 20
SAMPLE_BYTES = 1 << 20


def prepared(identity: dict, fingerprint: str | None, write) -> pathlib.Path:
    """The cache directory of the data `identity` describes, made by `write(directory)` when it
    is not there yet (one process at a time). `fingerprint`: of the tokenizer the data must be
    tokenised with, when one is given; None when the preparation builds it from the data (such
    a directory is then found by `identity` alone, and reused by a run holding the same
    tokenizer)."""
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
    root = paths.cache_dir() / "tokens"
    names = [key] if fingerprint is None else [key, f"{key}-{fingerprint[:16]}"]
    for name in names:
        index = root / name / shards.INDEX
        if index.is_file() and fingerprint in (None, json.loads(index.read_text())
                                               .get("tokenizer_sha256")):
            return root / name
    out = root / names[-1]
    with _locked(root / f"{names[-1]}.lock"):
        if not (out / shards.INDEX).is_file():
            try:
                write(out)
            except DataError:  # bad input: nothing worth resuming (a kill leaves it, to resume)
                shutil.rmtree(out, ignore_errors=True)
                raise
    return out


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def file_identity(path: pathlib.Path) -> dict:
    """What a file's prepared data depends on: its path and a digest of its content (of a large
    file: its size, modification time and a digest of its ends)."""
    stat = path.stat()
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        if stat.st_size <= DIGEST_BYTES:
            while block := f.read(1 << 20):
                digest.update(block)
            identity = {}
        else:
            digest.update(f.read(SAMPLE_BYTES))
            f.seek(stat.st_size - SAMPLE_BYTES)
            digest.update(f.read(SAMPLE_BYTES))
            identity = {"mtime_ns": stat.st_mtime_ns}
    return {"path": str(path.resolve()), "bytes": stat.st_size, "digest": digest.hexdigest(),
            **identity}
