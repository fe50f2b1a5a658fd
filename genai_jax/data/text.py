"""Text data sets as token streams, and deterministic language-model batches.

Sources (`config.data.name`):
  - "stdlib_code": the embedded default, this interpreter's standard library sources, built once
    into a TFDS data dir by `StdlibCode` and read back as an array_record data source;
  - "text_file": the local UTF-8 (or any bytes, for byte tokenization) file at `data.path`,
    split by position: the first `1 - validation_fraction` of its tokens train, the rest validate;
  - any other name: a TFDS catalog data set (e.g. "tiny_shakespeare", "lm1b") read with
    `tfds.data_source`, its `data.text_key` feature being the text.
Documents of a split are joined with a NUL byte (an end-of-document token) into one stream.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from genai_jax import paths
from genai_jax.data.tokenizers import DataError, Tokenizer

DOCUMENT_SEPARATOR = b"\0"


@dataclasses.dataclass(frozen=True)
class TextData:
    tokenizer: Tokenizer
    train: np.ndarray  # int `[n_train]`
    validation: np.ndarray  # int `[n_validation]`
    bytes_per_token: float  # UTF-8 bytes per token of the validation text (for bits per byte)


def load_text(data_cfg, tokenizer: Tokenizer | None = None) -> TextData:
    """Token streams of the train and validation splits named by `data_cfg`.

    `tokenizer`: reuse a saved one (resume, sampling, evaluation) instead of building it.
    """
    if data_cfg.name == "text_file":
        raw = {"all": _read_text_file(data_cfg.path)}
    else:
        raw = {"train": _tfds_text(data_cfg, data_cfg.train_split),
               "validation": _tfds_text(data_cfg, data_cfg.eval_split)}
    if tokenizer is None:
        tokenizer = Tokenizer.from_text(data_cfg.tokenizer, b"".join(raw.values()),
                                        _describe(data_cfg))
    streams = {k: tokenizer.encode(v, _describe(data_cfg)) for k, v in raw.items()}
    if data_cfg.name == "text_file":
        n = int(len(streams["all"]) * (1 - data_cfg.validation_fraction))
        streams = {"train": streams["all"][:n], "validation": streams["all"][n:]}
        val_bytes = (len(streams["validation"]) if tokenizer.kind == "byte" else
                     len(tokenizer.decode(streams["validation"]).encode("utf-8")))
    else:
        val_bytes = len(raw["validation"])
    for split, tokens in streams.items():
        if len(tokens) < 2:
            raise DataError(f"the {split} split of {_describe(data_cfg)} has {len(tokens)} tokens; "
                            "it needs at least 2 (check data.path / data.validation_fraction)")
    return TextData(tokenizer, streams["train"], streams["validation"],
                    val_bytes / len(streams["validation"]))


def _describe(data_cfg) -> str:
    return f"data file {data_cfg.path}" if data_cfg.name == "text_file" else (
        f"data set {data_cfg.name!r}")


def _read_text_file(path: str) -> bytes:
    if not path:
        raise DataError("data.name='text_file' needs data.path: pass --config.data.path=FILE")
    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data.path {path!r} is not a file")
    raw = p.read_bytes()
    if not raw.strip():
        raise DataError(f"data.path {path!r} is empty")
    return raw


def _tfds_text(data_cfg, split: str) -> bytes:
    """All documents of one split of a TFDS data set, joined into one byte string."""
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
    if known and split not in known:
        raise DataError(f"data set {data_cfg.name!r} has no split {split!r}; it has "
                        f"{sorted(known)} (set data.train_split / data.eval_split)")
    try:
        if data_cfg.name == "stdlib_code":
            source = builder.as_data_source(split=split)
        else:
            source = tfds.data_source(data_cfg.name, split=split, data_dir=data_dir)
    except OSError as e:
        raise DataError(f"could not download data set {data_cfg.name!r} ({type(e).__name__}): "
                        "prepare it once on a machine online and point data.data_dir at "
                        "it") from None
    if len(source) == 0:
        raise DataError(f"the {split} split of data set {data_cfg.name!r} is empty")
    first = source[0]
    if data_cfg.text_key not in first:
        raise DataError(f"data set {data_cfg.name!r} has no feature {data_cfg.text_key!r}; it has "
                        f"{sorted(first)} (set data.text_key)")
    docs = (_as_bytes(source[i][data_cfg.text_key]) for i in range(len(source)))
    return DOCUMENT_SEPARATOR.join(docs)


def _as_bytes(x) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode("utf-8")
    return np.asarray(x).item() if np.asarray(x).dtype == object else bytes(x)
