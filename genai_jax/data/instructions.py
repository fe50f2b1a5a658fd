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

The windows are written once into the cache (`genai_jax.data.cache`: keyed by the file's
content, the tokenizer, the block size, the seed and the held-out fraction) and read from there
by index (`PackedWindows`): the examples are tokenised line by line into a scratch ArrayRecord
file, then packed in the shuffled order by random access to it, so neither the examples nor the
windows are ever all in memory.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
from absl import logging

from genai_jax.data import cache, prepare, shards
from genai_jax.data.loader import Batches, epochs
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
    examples = list(_read_examples(_jsonl_file(path), tokenizer))
    _check_count(path, len(examples))
    return examples


def new_tokenizer(spec: str, path: str | pathlib.Path):
    """The tokenizer `spec` names for the instruction data at `path`: a character vocabulary of
    the file's characters, a BPE learnt from its first `prepare.BPE_SAMPLE_BYTES` (the file is
    read line by line, never whole); the others need no data."""
    from genai_jax.tokenization import make_tokenizer, parse_spec

    path, kind = _jsonl_file(path), parse_spec(spec)[0]
    sample = b""
    if kind == "bpe":
        with path.open("rb") as f:
            sample = f.read(prepare.BPE_SAMPLE_BYTES)
        if len(sample) == prepare.BPE_SAMPLE_BYTES and b"\n" in sample:
            sample = sample[:sample.rindex(b"\n") + 1]  # whole lines
    elif kind == "char":
        chars = set()
        with path.open("rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    chars |= set(line.decode("utf-8"))
                except UnicodeDecodeError:
                    raise DataError(f"{path} line {number} is not UTF-8 text; use "
                                    "data.tokenizer='byte'") from None
        sample = "".join(sorted(chars)).encode("utf-8")
    return make_tokenizer(spec, sample, f"data file {path}")


def _jsonl_file(path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.path {str(path)!r} is not a file (instruction data is JSONL)")
    return path


def _check_count(path, count: int) -> None:
    if count < 2:
        raise DataError(f"{path} has {count} examples; it needs at least 2 (one to train on, "
                        "one held out)")


def _read_examples(path: pathlib.Path, tokenizer):
    """The Examples of the lines of `path`, one at a time."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not JSON ({e.msg})") from None
            yield _example(record, tokenizer, where)


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
    counts = {"examples": 0, "cut": 0}
    windows = list(_windows(examples, block_size, counts))
    _warn_cut(counts, block_size)
    stacked = np.stack(windows) if windows else np.zeros((0, len(FIELDS), block_size), np.int32)
    return _fields(stacked)


def _windows(examples, block_size: int, counts: dict):
    """Greedy packing of `examples`, in order: int32 `[len(FIELDS), block_size]` windows, one at
    a time; `counts` counts the examples and those cut to a window."""
    current, fill = [], 0
    for ex in examples:
        counts["examples"] += 1
        n = min(len(ex.tokens) - 1, block_size)  # (input, target) pairs
        if n <= 0:
            continue
        counts["cut"] += len(ex.tokens) - 1 > block_size
        if fill + n > block_size:
            yield _window(current, block_size)
            current, fill = [], 0
        current.append((ex, n))
        fill += n
    if current:
        yield _window(current, block_size)


def _window(parts: list[tuple[Example, int]], block_size: int) -> np.ndarray:
    out = np.zeros((len(FIELDS), block_size), np.int32)
    inputs, targets, loss_mask, segment_ids, positions = out
    at = 0
    for segment, (ex, n) in enumerate(parts, 1):
        row = slice(at, at + n)
        inputs[row], targets[row] = ex.tokens[:n], ex.tokens[1:n + 1]
        loss_mask[row] = ex.trained[1:n + 1]
        segment_ids[row], positions[row] = segment, np.arange(n)
        at += n
    return out


def _fields(windows: np.ndarray) -> dict[str, np.ndarray]:
    """int32 `[..., len(FIELDS), block]` -> {field: `[..., block]`} (the loss mask float32)."""
    return {k: windows[..., i, :].astype(np.float32 if k == "loss_mask" else np.int32)
            for i, k in enumerate(FIELDS)}


def _warn_cut(counts: dict, block_size: int) -> None:
    if counts["cut"]:
        logging.warning("%d of %d examples are longer than model.block_size=%d and were cut",
                        counts["cut"], counts["examples"], block_size)


class PackedWindows(shards.Records):
    """A Grain data source: the packed windows of one split of a prepared directory, read by
    index (`source[i]` -> {field: `[block_size]`})."""

    def __init__(self, directory: str | pathlib.Path, index: dict, split: str):
        super().__init__(directory, index, split)
        self.block_size = index["block_size"]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        window = np.frombuffer(self._raw(index), np.int32)
        if window.size != len(FIELDS) * self.block_size:
            raise DataError(f"{self.directory} holds a window of {window.size} tokens, not "
                            f"{len(FIELDS)} x {self.block_size}: delete it to prepare it again")
        return _fields(window.reshape(len(FIELDS), self.block_size))


def packed_batches(windows, batch_size: int, seed: int) -> Batches:
    """Batches of packed windows (a data source, e.g. `PackedWindows`), epoch by epoch in a
    fresh seeded order (a pure function of (seed, step), like every training pipeline, so
    resumed runs see the same batches)."""
    return Batches(epochs(windows, seed), batch_size)


@dataclasses.dataclass(frozen=True)
class InstructionData:
    train: PackedWindows
    validation: PackedWindows
    bytes_per_token: float  # completion bytes per trained token, held-out split


def load_instructions(data_cfg, tokenizer, block_size: int, seed: int) -> InstructionData:
    """The packed windows of the JSONL at `data_cfg.path`, prepared into the cache on first
    use."""
    path = _jsonl_file(data_cfg.path)
    fraction = data_cfg.validation_fraction
    identity = {"instructions": cache.file_identity(path), "block_size": block_size,
                "seed": seed, "validation_fraction": fraction, "format": PACKED_FORMAT}
    fingerprint = shards.tokenizer_sha256(tokenizer)
    directory = cache.prepared(identity, fingerprint, lambda out: _prepare(
        path, tokenizer, fingerprint, block_size, seed, fraction, out))
    index = shards.read_index(directory)
    return InstructionData(PackedWindows(directory, index, "train"),
                           PackedWindows(directory, index, "validation"),
                           index["bytes_per_token"])


PACKED_FORMAT = "genai_jax.packed_instructions/1"
EXAMPLES = "examples.array_record"  # the scratch file of the tokenised examples


def _prepare(path: pathlib.Path, tokenizer, fingerprint: str, block_size: int, seed: int,
             fraction: float, out: pathlib.Path) -> None:
    """Tokenise the examples of `path` into a scratch file, hold out the last `fraction` of
    them, and write the training ones packed in a seeded order, and the held-out ones in order,
    as records of int32 `[len(FIELDS), block_size]` windows; `index.json` last."""
    out.mkdir(parents=True, exist_ok=True)
    scratch = out / EXAMPLES
    count = shards.write_records(scratch, (
        np.array([len(ex.tokens), ex.completion_bytes], np.int64).tobytes()
        + ex.tokens.astype(np.int32).tobytes() + ex.trained.astype(np.uint8).tobytes()
        for ex in _read_examples(path, tokenizer)))
    _check_count(path, count)
    n_val = max(1, int(round(count * fraction)))
    if count - n_val <= 0:
        raise DataError(f"data.path {path} leaves no training examples after holding out "
                        f"data.validation_fraction={fraction}")
    examples = shards.ShardReader([str(scratch)])
    read = lambda i: _decode_example(examples[int(i)])  # noqa: E731
    order = np.random.default_rng(seed).permutation(count - n_val)
    counts = {"examples": 0, "cut": 0}
    splits = {}
    for split, indices in (("train", order), ("validation", range(count - n_val, count))):
        name = f"{split}-00000.array_record"
        windows = shards.write_records(out / name, (
            w.tobytes() for w in _windows(map(read, indices), block_size, counts)))
        splits[split] = {"shards": [{"file": name, "records": windows}], "records": windows}
    _warn_cut(counts, block_size)
    trained = completion_bytes = 0  # of the held-out examples: bits per byte's normaliser
    for i in range(count - n_val, count):
        ex = read(i)
        trained += int(ex.trained[1:].sum())
        completion_bytes += ex.completion_bytes
    scratch.unlink()
    shards.write_json(out / shards.INDEX, {
        "format": shards.FORMAT, "kind": "instruction_windows", "packing": PACKED_FORMAT,
        "block_size": block_size, "examples": count, "held_out_examples": n_val,
        "tokenizer_sha256": fingerprint, "splits": splits,
        "bytes_per_token": completion_bytes / max(trained, 1)})


def _decode_example(record: bytes) -> Example:
    n, completion_bytes = np.frombuffer(record, np.int64, 2)
    tokens = np.frombuffer(record, np.int32, int(n), 16)
    trained = np.frombuffer(record, np.uint8, int(n), 16 + 4 * int(n)).astype(bool)
    return Example(tokens, trained, int(completion_bytes))


def eval_batches(windows, batch_size: int, num_batches: int) -> list:
    """The held-out windows (a data source) in order, as whole batches (the last rows repeat
    the first ones to fill the last batch); at most `num_batches`."""
    n = len(windows)
    count = min(num_batches, -(-n // batch_size))
    rows = [windows[int(i)] for i in np.arange(count * batch_size) % n]
    return [{k: np.stack([r[k] for r in rows[i * batch_size:(i + 1) * batch_size]])
             for k in FIELDS} for i in range(count)]
