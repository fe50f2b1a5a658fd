"""The input pipeline the trainer drives: training batches by step, fixed evaluation batches,
and what the model needs to know about the data."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from genai_jax.data.images import ImageBatches, load_images
from genai_jax.data.images import eval_batches as image_eval_batches
from genai_jax.data.lm_batches import LMBatches, eval_batches
from genai_jax.data.text import load_text
from genai_jax.data.tokenizers import DataError, load_tokenizer

IMAGE_INFO_FILE = "data_info.json"  # the example shape and classes a saved image model expects


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
            self.info["tokenizer"].save(workdir)
        if "shape" in self.info:
            (workdir / IMAGE_INFO_FILE).write_text(json.dumps(_shape_info(self.info)) + "\n")


def build(config, modality: str, workdir: pathlib.Path | None = None) -> Pipeline:
    """The pipeline for `config`; a tokenizer saved in `workdir` is reused (resume)."""
    if modality == "image":
        return _image_pipeline(config, workdir)
    if modality != "text":
        raise DataError(f"no input pipeline for data of modality {modality!r}")
    text = load_text(config.data, load_tokenizer(workdir) if workdir else None)
    block, batch = config.model.block_size, config.train.batch_size
    eval_batch = config.eval.batch_size or batch
    return Pipeline(
        train=LMBatches(text.train, batch, block, config.seed),
        eval=eval_batches(text.validation, eval_batch, block, config.eval.steps, config.seed + 1),
        info={"tokenizer": text.tokenizer, "bytes_per_token": text.bytes_per_token,
              "validation_tokens": text.validation})


def _shape_info(info: dict) -> dict:
    return {"shape": list(info["shape"]), "num_classes": info["num_classes"]}


def _image_pipeline(config, workdir: pathlib.Path | None) -> Pipeline:
    data = load_images(config.data, config.seed)
    saved = workdir / IMAGE_INFO_FILE if workdir else None
    if saved and saved.exists():
        expected, found = json.loads(saved.read_text()), _shape_info(data.info)
        if expected != found:
            raise DataError(f"workdir {workdir} holds a model of examples {expected}, and "
                            f"{data.description} gives {found}: use a new --workdir or the "
                            "data it was trained on")
    eval_batch = config.eval.batch_size or config.train.batch_size
    return Pipeline(train=ImageBatches(data.train, config.train.batch_size, config.seed),
                    eval=image_eval_batches(data.validation, eval_batch, config.eval.steps),
                    info=data.info)
