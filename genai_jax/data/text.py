"""Text data sets as token streams, and deterministic language-model batches.

Sources (`config.data.name`):
  - "stdlib_code": the embedded default, this interpreter's standard library sources, built once
    into a TFDS data dir by `StdlibCode` and read back as an array_record data source;
  - "text_file": the local UTF-8 (or any bytes, for byte tokenization) file at `data.path`,
    split by position: the first `1 - validation_fraction` of its tokens train, the rest validate;
  - any other name: a TFDS catalog data set (e.g. "tiny_shakespeare", "lm1b") read with
    `tfds.data_source`, its `data.text_key` feature being the text.
Documents of a split are joined into one stream with an end-of-document token: a NUL byte for
the byte/char tokenizers, the tokenizer's EOS (else BOS) token for the others.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np

from genai_jax import paths
from genai_jax.tokenization.tokenizers import (
    DOCUMENT_SEPARATOR,
    AnyTokenizer,
    DataError,
    make_tokenizer,
    parse_spec,
)


@dataclasses.dataclass(frozen=True)
class TextData:
    tokenizer: AnyTokenizer
    train: np.ndarray  # int `[n_train]`
    validation: np.ndarray  # int `[n_validation]`
    # UTF-8 bytes of the validation text per validation token: bits per byte, unlike loss per
    # token, compares models with different tokenizers.
    bytes_per_token: float


def load_text(data_cfg, tokenizer: AnyTokenizer | None = None) -> TextData:
    """Token streams of the train and validation splits named by `data_cfg`.

    `tokenizer`: reuse a saved one (resume, sampling, evaluation) instead of building it.
    """
    source = _describe(data_cfg)
    if tokenizer is None and parse_spec(data_cfg.tokenizer)[0] in ("byte", "gpt2", "hf"):
        # Built before the data is read: a bad hf:DIR fails before a large data set loads.
        tokenizer = make_tokenizer(data_cfg.tokenizer, b"", source)
    if data_cfg.name == "text_file":
        documents = {"all": [_read_text_file(data_cfg.path)]}
    else:
        documents = {"train": _tfds_documents(data_cfg, data_cfg.train_split),
                     "validation": _tfds_documents(data_cfg, data_cfg.eval_split)}
    if tokenizer is None:
        tokenizer = make_tokenizer(data_cfg.tokenizer, _tokenizer_text(data_cfg, documents),
                                   source)
    if data_cfg.name == "text_file":
        (raw,) = documents["all"]
        tokens, starts = tokenizer.encode_with_offsets(raw, source)
        n = int(len(tokens) * (1 - data_cfg.validation_fraction))
        streams = {"train": tokens[:n], "validation": tokens[n:]}
        val_bytes = len(raw) - int(starts[n]) if n < len(tokens) else 0
    else:
        streams = {k: tokenizer.encode_documents(v, source) for k, v in documents.items()}
        # Counted as the byte tokenizer sees the split (one byte between documents), so bits per
        # byte is the same measure whatever joins the documents.
        val_bytes = len(DOCUMENT_SEPARATOR.join(documents["validation"]))
    for split, tokens in streams.items():
        if len(tokens) < 2:
            raise DataError(f"the {split} split of {source} has {len(tokens)} tokens; "
                            "it needs at least 2 (check data.path / data.validation_fraction)")
    return TextData(tokenizer, streams["train"], streams["validation"],
                    val_bytes / len(streams["validation"]))


def _tokenizer_text(data_cfg, documents: dict[str, list[bytes]]) -> bytes:
    """What a new tokenizer is built from. A BPE learns its merges from the training text alone
    (for a text file, its first `1 - validation_fraction`, cut at a character); a character
    vocabulary needs every character of both splits."""
    if not data_cfg.tokenizer.startswith("bpe:"):
        # Canaries (`genai_jax.data.private`) are written in digits the text may lack.
        canaries = b" my PIN is 0123456789" if data_cfg.get("canaries") else b""
        return b"".join(DOCUMENT_SEPARATOR.join(docs) for docs in documents.values()) + canaries
    if data_cfg.name != "text_file":
        return DOCUMENT_SEPARATOR.join(documents["train"])
    (raw,) = documents["all"]
    cut = int(len(raw) * (1 - data_cfg.validation_fraction))
    while 0 < cut < len(raw) and raw[cut] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        cut -= 1
    return raw[:cut]


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


def _tfds_documents(data_cfg, split: str) -> list[bytes]:
    """The documents of one split of a TFDS data set, as UTF-8 (or any) bytes."""
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
    return [_as_bytes(source[i][data_cfg.text_key]) for i in range(len(source))]


def _as_bytes(x) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode("utf-8")
    return np.asarray(x).item() if np.asarray(x).dtype == object else bytes(x)
