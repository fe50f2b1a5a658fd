"""The input pipeline the trainer drives: training batches by step, fixed evaluation batches,
and what the model needs to know about the data."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from genai_jax.data.lm_batches import LMBatches, eval_batches
from genai_jax.data.text import load_text
from genai_jax.data.tokenizers import DataError, Tokenizer

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """`train.batch(step, process_index, process_count)` gives this process's rows of the global
    batch of `step` as numpy arrays; `eval` is a fixed list of global batches; `info` is what the
    model family needs (e.g. the tokenizer)."""

    train: Any
    eval: list[dict]
    info: dict

    def save(self, workdir: pathlib.Path) -> None:
        if "tokenizer" in self.info:
            self.info["tokenizer"].save(workdir / TOKENIZER_FILE)


def build(config, modality: str, workdir: pathlib.Path | None = None) -> Pipeline:
    """The pipeline for `config`; a tokenizer saved in `workdir` is reused (resume)."""
    if modality != "text":
        raise DataError(f"no input pipeline for data of modality {modality!r}")
    saved = workdir / TOKENIZER_FILE if workdir else None
    tokenizer = Tokenizer.load(saved) if saved and saved.exists() else None
    text = load_text(config.data, tokenizer)
    block, batch = config.model.block_size, config.train.batch_size
    eval_batch = config.eval.batch_size or batch
    return Pipeline(
        train=LMBatches(text.train, batch, block, config.seed),
        eval=eval_batches(text.validation, eval_batch, block, config.eval.steps, config.seed + 1),
        info={"tokenizer": text.tokenizer, "bytes_per_token": text.bytes_per_token,
              "validation_tokens": text.validation})
