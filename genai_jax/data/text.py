"""Text data sets as token streams read from prepared ArrayRecord shards.

Sources (`config.data.name`):
  - "stdlib_code": the embedded default, this interpreter's standard library sources, built once
    into a TFDS data dir by `StdlibCode` and read back as an array_record data source;
  - "text_file": the local UTF-8 (or any bytes, for byte tokenization) file at `data.path`,
    one document split by position: the first `1 - validation_fraction` of its bytes (cut at a
    line) train, the rest validate;
  - any other name: a TFDS catalog data set (e.g. "tiny_shakespeare", "lm1b") read with
    `tfds.data_source`, its `data.text_key` feature being the text.

A data set is tokenised once, document by document, into a prepared directory in the cache
(`$GENAI_JAX_CACHE/tokens/KEY`: the format `experiments.prepare_data` writes, by the same code,
`genai_jax.data.prepare`), keyed by everything its tokens depend on (the source, the tokenizer,
the validation fraction), and read back by slices (`shards.TokenStream`): no split is ever held
in memory. Every document ends with the end-of-document token (NUL for the byte/char
tokenizers, else the tokenizer's EOS, else BOS; a text file's single document ends with its
validation tail).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib

import numpy as np
from absl import logging

from genai_jax import paths
from genai_jax.data import cache, prepare, shards
from genai_jax.data.private import CANARY_PREFIX
from genai_jax.tokenization.tokenizers import (
    AnyTokenizer,
    DataError,
    load_tokenizer,
    make_tokenizer,
    parse_spec,
)

# Canaries ("my PIN is 4 8 1 5 9 2", `genai_jax.data.private`) are written in characters the
# text may lack.
CANARY_CHARACTERS = "".join(sorted(set(CANARY_PREFIX + " 0123456789")))
# A text file is prepared in this process (no worker processes to start beside a training run)
# in units of this many bytes, which bounds the memory the preparation takes.
UNIT_BYTES = 16 << 20
# Bumped when what a preparation writes changes, so that older cache entries are not reused.
CACHE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TextData:
    tokenizer: AnyTokenizer
    directory: pathlib.Path  # the prepared shards
    train: shards.TokenStream  # sliceable: `train[a:b]` -> numpy
    validation: shards.TokenStream
    # UTF-8 bytes of the validation text per validation token: bits per byte, unlike loss per
    # token, compares models with different tokenizers.
    bytes_per_token: float


def load_text(data_cfg, tokenizer: AnyTokenizer | None = None) -> TextData:
    """The token streams of the train and validation splits named by `data_cfg`.

    `tokenizer`: reuse a saved one (resume, sampling, evaluation) instead of building it."""
    directory = prepared_text(data_cfg, tokenizer)
    index = shards.read_index(directory)
    streams = {s: shards.TokenStream(directory, index, s) for s in shards.SPLITS}
    validation = index["splits"]["validation"]
    return TextData(load_tokenizer(directory), directory, streams["train"],
                    streams["validation"], validation["bytes"] / validation["tokens"])


def prepared_text(data_cfg, tokenizer: AnyTokenizer | None = None) -> pathlib.Path:
    """The cache directory holding the text data set `data_cfg` names, tokenised with
    `tokenizer` (else one built from `data.tokenizer`, from the data for char / bpe:N),
    prepared now if it is not there yet (a killed preparation resumes)."""
    spec, source = data_cfg.tokenizer, _describe(data_cfg)
    kind, _ = parse_spec(spec)
    if tokenizer is None and kind in ("byte", "gpt2", "hf"):
        # Built before the data is read: a bad hf:DIR fails before a large data set is read.
        tokenizer = make_tokenizer(spec, b"", source)
    extra = CANARY_CHARACTERS if kind == "char" and data_cfg.get("canaries") else ""
    log = lambda line: logging.info("%s: %s", source, line)  # noqa: E731
    if data_cfg.name == "text_file":
        path = _text_file(data_cfg.path)
        fraction = data_cfg.validation_fraction
        identity = {"file": cache.file_identity(path), "validation_fraction": fraction}
        write = lambda out: prepare.prepare_text(  # noqa: E731
            [path], out, spec, validation_fraction=fraction, workers=1, unit_bytes=UNIT_BYTES,
            tokenizer=tokenizer, extra_characters=extra, single_document=True, log=log)
    else:
        sources, identity = _tfds_sources(data_cfg)
        write = lambda out: prepare.prepare_documents(  # noqa: E731
            sources, f"data set {data_cfg.name!r}", out, spec, tokenizer=tokenizer,
            extra_characters=extra, log=log)
    identity = {**identity, "tokenizer": spec, "extra_characters": extra,
                "format": shards.FORMAT, "version": CACHE_VERSION}
    fingerprint = None if tokenizer is None else shards.tokenizer_sha256(tokenizer)
    directory = cache.prepared(identity, fingerprint, write)
    log(f"tokens read from {directory} (tokenised there once)")
    return directory


def _describe(data_cfg) -> str:
    return f"data file {data_cfg.path}" if data_cfg.name == "text_file" else (
        f"data set {data_cfg.name!r}")


def _text_file(path: str) -> pathlib.Path:
    if not path:
        raise DataError("data.name='text_file' needs data.path: pass --config.data.path=FILE")
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.path {path!r} is not a file")
    size = p.stat().st_size
    if size == 0 or (size < 1 << 16 and not p.read_bytes().strip()):
        raise DataError(f"data.path {path!r} is empty")
    return p


class _Texts:
    """The `text_key` feature of a TFDS data source's examples, as bytes, by index."""

    def __init__(self, source, key: str):
        self.source, self.key = source, key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> bytes:
        return _as_bytes(self.source[index][self.key])


def _tfds_sources(data_cfg) -> tuple[dict[str, _Texts], dict]:
    """({"train": documents, "validation": documents}, what identifies them) of a TFDS data
    set: random-access array_record data sources, read one document at a time."""
    import tensorflow_datasets as tfds

    data_dir = os.path.expanduser(data_cfg.data_dir) if data_cfg.data_dir else None
    if data_cfg.name == "stdlib_code":
        from genai_jax.data.stdlib_code import StdlibCode

        builder = StdlibCode(data_dir=paths.embedded_data_dir(data_cfg),
                             file_format="array_record")
        if not builder.is_prepared():
            builder.download_and_prepare()
    else:
        try:
            builder = tfds.builder(data_cfg.name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise DataError(f"data.name={data_cfg.name!r} is neither 'stdlib_code', 'text_file' "
                            "nor a TFDS catalog data set") from None
    known = builder.info.splits  # empty until the data set is prepared
    sources, identity = {}, {"tfds": builder.info.full_name, "data_dir": builder.data_dir,
                             "text_key": data_cfg.text_key, "splits": {}}
    for split, name in (("train", data_cfg.train_split), ("validation", data_cfg.eval_split)):
        if known and name not in known:
            raise DataError(f"data set {data_cfg.name!r} has no split {name!r}; it has "
                            f"{sorted(known)} (set data.train_split / data.eval_split)")
        try:
            if data_cfg.name == "stdlib_code":
                source = builder.as_data_source(split=name)
            else:
                source = tfds.data_source(data_cfg.name, split=name, data_dir=data_dir)
        except OSError as e:
            raise DataError(f"could not download data set {data_cfg.name!r} "
                            f"({type(e).__name__}): prepare it once on a machine online and "
                            "point data.data_dir at it") from None
        if len(source) == 0:
            raise DataError(f"the {name} split of data set {data_cfg.name!r} is empty")
        if data_cfg.text_key not in source[0]:
            raise DataError(f"data set {data_cfg.name!r} has no feature {data_cfg.text_key!r}; "
                            f"it has {sorted(source[0])} (set data.text_key)")
        sources[split] = texts = _Texts(source, data_cfg.text_key)
        ends = hashlib.blake2b(texts[0] + b"\0" + texts[len(texts) - 1], digest_size=16)
        identity["splits"][split] = {"name": name, "documents": len(source),
                                     "ends": ends.hexdigest()}
    return sources, identity


def _as_bytes(x) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode("utf-8")
    return np.asarray(x).item() if np.asarray(x).dtype == object else bytes(x)
