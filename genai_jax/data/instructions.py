"""Instruction data for fine-tuning: JSONL examples, the loss on completions only, packed windows.

`data.name="instructions"`, `data.path=FILE.jsonl`, one example per line, either
  - `{"prompt": ..., "completion": ...}`: BOS (when the tokenizer has one), the prompt, the
    completion and EOS; the loss counts the completion and EOS; or
  - `{"messages": [{"role": ..., "content": ...}, ...]}`: the conversation as the tokenizer's chat
    template renders it (`HFTokenizer.apply_chat_template`; without a template, `role: content`
    lines), the loss counting the tokens of the assistant's messages.

The last `data.validation_fraction` of the lines are held out. Examples are shuffled (by
`seed`) and packed greedily into windows of `model.block_size` (input, target) pairs: each
window carries `segment_ids` (1, 2, ... per example, 0 for padding) so that attention never
crosses examples, `positions` that restart at 0 for each example, and a `loss_mask` (1 where the
target is a completion token). An example longer than a window is cut to the window.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
from absl import logging

from genai_jax.data.loader import Batches, Rows, epochs
from genai_jax.errors import DataError

FIELDS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [n]
    trained: np.ndarray  # bool [n]: token i is a completion token (a target of the loss)
    completion_bytes: int  # UTF-8 bytes of the completion text (for bits per byte)


def read_jsonl(path: str | pathlib.Path, tokenizer) -> list[Example]:
    """Every line of the JSONL file at `path` as an Example; a bad line is one DataError that
    names its number."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.path {str(path)!r} is not a file (instruction data is JSONL)")
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not JSON ({e.msg})") from None
            examples.append(_example(record, tokenizer, where))
    if len(examples) < 2:
        raise DataError(f"{path} has {len(examples)} examples; it needs at least 2 (one to "
                        "train on, one held out)")
    return examples


def _example(record, tokenizer, where: str) -> Example:
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        return _conversation(record["messages"], tokenizer, where)
    if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)
            and isinstance(record.get("completion"), str)):
        raise DataError(f"{where} has neither string fields \"prompt\" and \"completion\" nor a "
                        "\"messages\" list")
    prompt = tokenizer.encode(record["prompt"], where)
    completion = tokenizer.encode(record["completion"], where)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    tokens = np.concatenate([np.asarray(bos + list(prompt), np.int32), completion,
                             np.asarray(eos, np.int32)]).astype(np.int32)
    trained = np.arange(len(tokens)) >= len(bos) + len(prompt)
    return Example(tokens, trained, len(record["completion"].encode("utf-8")))


def _conversation(messages: list, tokenizer, where: str) -> Example:
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: message {i} needs string fields \"role\" and \"content\"")
    if getattr(tokenizer, "chat_template", None):
        render = lambda ms, prompt=False: tokenizer.apply_chat_template(
            ms, add_generation_prompt=prompt)
    else:  # no template: one "role: content" line per message
        render = lambda ms, prompt=False: "".join(f"{m['role']}: {m['content']}\n" for m in ms) + (
            "assistant: " if prompt else "")
    text = render(messages)
    # The assistant's spans: what its message adds to the conversation before it (with the
    # generation prompt, which the model is given, not asked to produce).
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(render(messages[:i], True).encode("utf-8"))
            spans.append((start, len(render(messages[:i + 1]).encode("utf-8"))))
    if not spans:
        raise DataError(f"{where}: the conversation has no \"assistant\" message to learn")
    tokens, starts = tokenizer.encode_with_offsets(text, where)
    trained = np.zeros(len(tokens), bool)
    for start, end in spans:
        trained |= (starts >= start) & (starts < end)
    if tokenizer.eos_token_id is not None and (not len(tokens) or
                                               tokens[-1] != tokenizer.eos_token_id):
        tokens = np.append(tokens, np.int32(tokenizer.eos_token_id))
        trained = np.append(trained, True)
    return Example(tokens.astype(np.int32), trained, sum(e - s for s, e in spans))


def pack(examples: list[Example], block_size: int) -> dict[str, np.ndarray]:
    """Greedy packing, in order, into `[windows, block_size]` arrays of FIELDS."""
    windows, current, fill = [], [], 0
    cut = 0
    for ex in examples:
        n = min(len(ex.tokens) - 1, block_size)  # (input, target) pairs
        if n <= 0:
            continue
        cut += len(ex.tokens) - 1 > block_size
        if fill + n > block_size:
            windows.append(current)
            current, fill = [], 0
        current.append((ex, n))
        fill += n
    if current:
        windows.append(current)
    if cut:
        logging.warning("%d of %d examples are longer than model.block_size=%d and were cut",
                        cut, len(examples), block_size)
    out = {k: np.zeros((len(windows), block_size), np.float32 if k == "loss_mask" else np.int32)
           for k in FIELDS}
    for w, window in enumerate(windows):
        at = 0
        for segment, (ex, n) in enumerate(window, 1):
            row = slice(at, at + n)
            out["inputs"][w, row] = ex.tokens[:n]
            out["targets"][w, row] = ex.tokens[1:n + 1]
            out["loss_mask"][w, row] = ex.trained[1:n + 1]
            out["segment_ids"][w, row] = segment
            out["positions"][w, row] = np.arange(n)
            at += n
    return out


def packed_batches(windows: dict[str, np.ndarray], batch_size: int, seed: int) -> Batches:
    """Batches of packed windows, epoch by epoch in a fresh seeded order (a pure function of
    (seed, step), like every training pipeline, so resumed runs see the same batches)."""
    return Batches(epochs(Rows(windows), seed), batch_size)


@dataclasses.dataclass(frozen=True)
class InstructionData:
    train: dict[str, np.ndarray]
    validation: dict[str, np.ndarray]
    bytes_per_token: float  # completion bytes per trained token, held-out split


def load_instructions(data_cfg, tokenizer, block_size: int, seed: int) -> InstructionData:
    examples = read_jsonl(data_cfg.path, tokenizer)
    n_val = max(1, int(round(len(examples) * data_cfg.validation_fraction)))
    train, held_out = examples[:-n_val], examples[-n_val:]
    if not train:
        raise DataError(f"data.path {data_cfg.path} leaves no training examples after holding "
                        f"out data.validation_fraction={data_cfg.validation_fraction}")
    order = np.random.default_rng(seed).permutation(len(train))
    trained_tokens = sum(int(ex.trained[1:].sum()) for ex in held_out)
    return InstructionData(
        pack([train[i] for i in order], block_size), pack(held_out, block_size),
        sum(ex.completion_bytes for ex in held_out) / max(trained_tokens, 1))


def eval_batches(windows: dict[str, np.ndarray], batch_size: int, num_batches: int) -> list:
    """The held-out windows in order, as whole batches (the last rows repeat the first ones
    to fill the last batch); at most `num_batches`."""
    n = len(windows["inputs"])
    count = min(num_batches, -(-n // batch_size))
    rows = np.arange(count * batch_size) % n
    return [{k: v[rows[i * batch_size:(i + 1) * batch_size]] for k, v in windows.items()}
            for i in range(count)]
