"""The input pipeline the trainer drives: training batches by step, fixed evaluation batches,
and what the model needs to know about the data."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

from genai_jax.data import instructions
from genai_jax.data.images import ImageBatches, load_images
from genai_jax.data.images import eval_batches as image_eval_batches
from genai_jax.data.lm_batches import LMBatches, eval_batches
from genai_jax.data.text import load_text
from genai_jax.tokenization.tokenizers import DataError, load_tokenizer, make_tokenizer

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
    """The pipeline for `config`; a tokenizer saved in `workdir` is reused (resume), else that
    of the run `config.init_from` names (fine-tuning keeps its base model's tokenizer)."""
    if modality == "image":
        return _image_pipeline(config, workdir)
    if modality != "text":
        raise DataError(f"no input pipeline for data of modality {modality!r}")
    saved = None
    for directory in (workdir, config.get("init_from")):
        if directory and saved is None:
            saved = load_tokenizer(pathlib.Path(directory))
    block, batch = config.model.block_size, config.train.batch_size
    eval_batch = config.eval.batch_size or batch
    if config.data.name == "instructions":
        return _instruction_pipeline(config, saved, eval_batch)
    text = load_text(config.data, saved)
    return Pipeline(
        train=LMBatches(text.train, batch, block, config.seed),
        eval=eval_batches(text.validation, eval_batch, block, config.eval.steps, config.seed + 1),
        info={"tokenizer": text.tokenizer, "bytes_per_token": text.bytes_per_token,
              "validation_tokens": text.validation})


def _instruction_pipeline(config, tokenizer, eval_batch: int) -> Pipeline:
    """Packed instruction windows (`genai_jax.data.instructions`) from the JSONL at data.path."""
    if tokenizer is None:
        raw = pathlib.Path(config.data.path).expanduser().read_bytes()
        tokenizer = make_tokenizer(config.data.tokenizer, raw, f"data file {config.data.path}")
    data = instructions.load_instructions(config.data, tokenizer, config.model.block_size,
                                          config.seed)
    return Pipeline(
        train=instructions.PackedBatches(data.train, config.train.batch_size, config.seed),
        eval=instructions.eval_batches(data.validation, eval_batch, config.eval.steps),
        info={"tokenizer": tokenizer, "bytes_per_token": data.bytes_per_token,
              "validation_windows": data.validation})


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
