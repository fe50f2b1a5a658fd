"""Text files and JSONL into tokenised ArrayRecord shards (`genai_jax.data.shards`), in parallel
over CPU cores, resumable.

Inputs: `*.jsonl` / `*.json` files hold one document per line (its `text_key` field); any other
file is one UTF-8 document (or any bytes, for the byte tokenizer). A JSONL document goes to the
validation split when a hash of its file and byte offset falls in the last
`validation_fraction` of the buckets (stable whatever the order or number of workers); a file
that is a single document gives the last `validation_fraction` of its bytes (cut at a line, or
a character in a file of one line) to validation. `prepare_documents` writes the splits of a
random-access source (a TFDS data set) instead. `genai_jax.data.text` prepares the data sets a
config names (a text file, the embedded corpus, a TFDS catalog set) this way, once, into a
cache.

The files are cut into work units of about `unit_bytes` at line boundaries; unit N writes
`train-N.array_record` and `validation-N.array_record` and then `progress/N.json` with its
counts, each by a rename of a complete file, so a killed preparation resumes where it stopped
and never leaves a half-written shard under its final name. `index.json` comes last.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import pathlib
import time

import numpy as np

from genai_jax.data import shards
from genai_jax.errors import DataError
from genai_jax.tokenization.tokenizers import (
    DOCUMENT_SEPARATOR,
    end_of_document,
    load_tokenizer,
    make_tokenizer,
    parse_spec,
)

JSONL_SUFFIXES = (".jsonl", ".json")
UNIT_BYTES = 64 << 20
PIECE_BYTES = 1 << 20  # text handed to a tokenizer at once (bounds its per-token bookkeeping)
PIECES_AT_ONCE = 8  # pieces a BPE encodes together (in parallel threads outside workers)
BPE_SAMPLE_BYTES = 64 << 20  # the training text a new BPE learns from
PROGRESS = "progress"
RAW = "none"  # --tokenizer=none: documents stay text, tokenised on the fly by training
RAW_RECORD_BYTES = 16 << 10


@dataclasses.dataclass(frozen=True)
class Unit:
    """Bytes `[start, end)` (whole lines) of an input file."""

    number: int
    path: str
    start: int
    end: int
    jsonl: bool
    cut: int  # single-document files: where validation begins (bytes); else -1

    @property
    def where(self) -> str:
        return self.path

    def key(self) -> dict:
        return dataclasses.asdict(self)

    def documents(self, text_key: str, split_fraction: float | None
                  ) -> tuple[list[bytes], list[bytes]]:
        return _documents(self, text_key, split_fraction)

    def ends_document(self, split: str) -> bool:
        """Whether a document of this unit's `split` ends with it: every JSONL line; a
        single-document file only at its end (which the validation split holds)."""
        return self.jsonl or (split == "validation" and self.end == pathlib.Path(self.path)
                              .stat().st_size)

    def not_utf8(self, at: int) -> str:
        return f"{self.path} is not UTF-8 text (near byte {self.start + at})"


@dataclasses.dataclass(frozen=True)
class DocumentRange:
    """Documents `[start, end)` of one split of a random-access source (`source[i]` -> bytes),
    e.g. a TFDS data set's: each a whole document."""

    number: int
    split: str
    name: str  # the source, for messages
    source: object = dataclasses.field(compare=False, repr=False)
    start: int = 0
    end: int = 0

    @property
    def where(self) -> str:
        return f"{self.name} ({self.split} documents {self.start}-{self.end - 1})"

    def key(self) -> dict:
        return {"number": self.number, "split": self.split, "name": self.name,
                "start": self.start, "end": self.end}

    def documents(self, text_key: str, split_fraction: float | None) -> tuple:
        """(train, validation): the range's documents, read one at a time as they are
        iterated, in its split."""
        del text_key, split_fraction  # the source's documents are text, its split is fixed
        docs = _Documents(self.source, range(self.start, self.end))
        return (docs, []) if self.split == "train" else ([], docs)

    def ends_document(self, split: str) -> bool:
        return True

    def not_utf8(self, at: int) -> str:
        return f"{self.where} is not UTF-8 text"


@dataclasses.dataclass(frozen=True)
class _Documents:
    """Documents of a random-access source, read one at a time as they are iterated."""

    source: object
    indices: range

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return (self.source[i] for i in self.indices)


DOCUMENTS_PER_UNIT = 16384


def prepare_text(inputs: list[pathlib.Path], out: pathlib.Path, tokenizer_spec: str, *,
                 validation_fraction: float = 0.1, text_key: str = "text",
                 workers: int = 0, unit_bytes: int = UNIT_BYTES, tokenizer=None,
                 extra_characters: str = "", single_document: bool = False,
                 log=print) -> dict:
    """Prepare `inputs` into `out`; returns the index. `workers=0`: one per CPU core (1: in
    this process). `tokenizer`: tokenise with this one (else one is made from
    `tokenizer_spec`, a character vocabulary also holding `extra_characters`).
    `single_document`: every input is one document, whatever its suffix."""
    if not inputs:
        raise DataError("no input files")
    if not 0.0 < validation_fraction < 1.0:
        raise DataError(f"validation_fraction={validation_fraction} must be in (0, 1)")
    _check_spec(tokenizer_spec)
    if unit_bytes < 1:
        raise DataError(f"work units of {unit_bytes} bytes: give a positive size")
    settings = {"tokenizer": tokenizer_spec, "validation_fraction": validation_fraction,
                "text_key": text_key, "unit_bytes": unit_bytes,
                "inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size}
                           for p in inputs]}
    if single_document:
        settings["single_document"] = True
    units = _units(inputs, unit_bytes, validation_fraction, single_document)
    processes = min(workers or os.cpu_count() or 1, len(units))
    return _prepare(units, pathlib.Path(out).expanduser(), settings, processes, tokenizer,
                    extra_characters, log)


def prepare_documents(sources: dict[str, object], name: str, out: pathlib.Path,
                      tokenizer_spec: str, *, tokenizer=None, extra_characters: str = "",
                      log=print) -> dict:
    """Prepare the documents of random-access sources (`{split: source}`, `source[i]` -> a
    document's bytes; e.g. a TFDS data set's splits) into `out`, in this process; returns the
    index. `name` describes them in messages and in the index."""
    _check_spec(tokenizer_spec)
    settings = {"tokenizer": tokenizer_spec, "validation_fraction": None, "text_key": None,
                "inputs": [{"path": f"{name}:{split}", "documents": len(source)}
                           for split, source in sources.items()]}
    units = []
    for split, source in sources.items():
        for start in range(0, len(source), DOCUMENTS_PER_UNIT):
            units.append(DocumentRange(len(units), split, name, source, start,
                                       min(start + DOCUMENTS_PER_UNIT, len(source))))
    return _prepare(units, pathlib.Path(out).expanduser(), settings, 1, tokenizer,
                    extra_characters, log)


def _check_spec(tokenizer_spec: str) -> None:
    if tokenizer_spec != RAW:
        parse_spec(tokenizer_spec)


def _prepare(units: list, out: pathlib.Path, settings: dict, processes: int, tokenizer,
             extra_characters: str, log) -> dict:
    """Write `units` into `out` on `processes` processes (1: in this one), resuming a
    preparation with the same settings; returns the index."""
    raw, spec = settings["tokenizer"] == RAW, settings["tokenizer"]
    fraction, text_key = settings["validation_fraction"], settings["text_key"]
    if extra_characters:
        settings = {**settings, "extra_characters": extra_characters}
    _claim(out, settings)
    pool = (concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context("spawn")) if processes > 1
        else concurrent.futures.ThreadPoolExecutor(1))
    with pool:
        eos = None
        if not raw:
            if load_tokenizer(out) is None:
                tokenizer = tokenizer or _new_tokenizer(spec, units, text_key, fraction,
                                                        extra_characters, pool)
                tokenizer.save(out)
            tokenizer = load_tokenizer(out)
            if tokenizer.vocab_size > 2**32:
                raise DataError(f"a vocabulary of {tokenizer.vocab_size} does not fit uint32")
            eos = end_of_document(tokenizer)
            if eos is None and any(isinstance(u, DocumentRange) or u.jsonl for u in units):
                raise DataError(f"the {spec!r} tokenizer has no end-of-document token")
        todo = [u for u in units if not _done(out, u)]
        log(f"{len(units) - len(todo)} of {len(units)} units already prepared; "
            f"{len(todo)} to go on {processes} process{'es' if processes > 1 else ''}")
        t0 = time.perf_counter()
        futures = [pool.submit(_prepare_unit, u, out, tokenizer, eos, fraction, text_key)
                   for u in todo]
        size = sum(future.result() for future in concurrent.futures.as_completed(futures))
        seconds = time.perf_counter() - t0
    if todo:
        log(f"prepared {size / 1e6:.1f} MB in {seconds:.1f} s ({size / 1e6 / seconds:.1f} MB/s)")
    index = _index(out, units, tokenizer, eos, settings)
    shards.write_json(out / shards.INDEX, index)
    return index


def _claim(out: pathlib.Path, settings: dict) -> None:
    """Start or resume a preparation in `out`: refused (nothing touched) when `out` holds
    something else, or a preparation with other settings."""
    record = out / PROGRESS / "settings.json"
    if record.is_file():
        previous = json.loads(record.read_text())
        if previous != settings:
            changed = sorted(k for k in settings if previous.get(k) != settings[k])
            raise DataError(f"--out {out} holds a preparation with other {', '.join(changed)}: "
                            "use a new --out, or the same settings to resume it")
        return
    progress = out / PROGRESS
    claimed = progress.is_dir() and all(p.name.endswith(".tmp") for p in progress.iterdir())
    if out.exists() and any(p != progress or not claimed for p in out.iterdir()):
        raise DataError(f"--out {out} is not empty and holds no preparation: use a new --out")
    (out / PROGRESS).mkdir(parents=True, exist_ok=True)
    shards.write_json(record, settings)


def _units(inputs: list[pathlib.Path], unit_bytes: int, fraction: float,
           single_document: bool = False) -> list[Unit]:
    units = []
    for path in inputs:
        size = path.stat().st_size
        if size == 0:
            raise DataError(f"input {path} is empty")
        jsonl = not single_document and path.suffix.lower() in JSONL_SUFFIXES
        cut = -1 if jsonl else _cut(path, int(size * (1 - fraction)))
        bounds = [0]
        while bounds[-1] < size:
            bounds.append(_line_start(path, bounds[-1] + unit_bytes))
        bounds[-1] = size
        if not jsonl and cut not in bounds:  # a unit never straddles the validation cut
            bounds = sorted({*bounds, cut})
        for start, end in zip(bounds, bounds[1:], strict=False):
            if end > start:
                units.append(Unit(len(units), str(path), start, end, jsonl, cut))
    return units


def _cut(path: pathlib.Path, at: int) -> int:
    """Where a single-document file's validation tail begins: the first line start at or after
    byte `at`, else (no line starts there) the character start at or before it."""
    cut = _line_start(path, at)
    if cut < path.stat().st_size:
        return cut
    with path.open("rb") as f:
        f.seek(max(at - 3, 0))
        head = f.read(at - max(at - 3, 0) + 1)
    while at > 0 and head and head[-1] & 0xC0 == 0x80:  # a UTF-8 continuation byte
        at, head = at - 1, head[:-1]
    return at


def _line_start(path: pathlib.Path, at: int) -> int:
    """The first line start at or after byte `at` (the file's size when none is)."""
    size = path.stat().st_size
    if at <= 0 or at >= size:
        return min(max(at, 0), size)
    with path.open("rb") as f:
        f.seek(at - 1)
        while True:
            block = f.read(1 << 16)
            if not block:
                return size
            newline = block.find(b"\n")
            if newline >= 0:
                return min(f.tell() - len(block) + newline + 1, size)


def _new_tokenizer(spec: str, units: list, text_key: str, fraction: float | None,
                   extra_characters: str, pool):
    kind, _ = parse_spec(spec)
    if kind == "char":  # every character of every input, and NUL (the end of a document)
        chars = set("\0") | set(extra_characters)
        for found in pool.map(_characters, units, [text_key] * len(units)):
            chars |= found
        return make_tokenizer(spec, "".join(sorted(chars)).encode("utf-8"), "the inputs")
    if kind == "bpe":  # learnt from the first BPE_SAMPLE_BYTES of the training text
        sample, size = [], 0
        for unit in units:
            if size >= BPE_SAMPLE_BYTES:
                break
            train, _ = unit.documents(text_key, fraction)
            sample += train
            size += sum(len(d) for d in train)
        return make_tokenizer(spec, DOCUMENT_SEPARATOR.join(sample), "the inputs")
    return make_tokenizer(spec, b"", "the inputs")


def _characters(unit, text_key: str) -> set[str]:
    train, validation = unit.documents(text_key, None)
    found = set()
    for doc in itertools.chain(train, validation):
        found |= set(_utf8(doc, unit))
    return found


def _read(unit: Unit) -> bytes:
    with open(unit.path, "rb") as f:
        f.seek(unit.start)
        return f.read(unit.end - unit.start)


def _documents(unit: Unit, text_key: str, split_fraction: float | None
               ) -> tuple[list[bytes], list[bytes]]:
    """(train, validation) documents of a unit (all in train when `split_fraction` is None).
    A single-document file's parts come back as one "document" each, ended only at the file's
    end (`Unit.ends_document`)."""
    raw = _read(unit)
    if not unit.jsonl:
        in_validation = split_fraction is not None and unit.start >= unit.cut
        return ([], [raw]) if in_validation else ([raw], [])
    train, validation = [], []
    name = pathlib.Path(unit.path).name
    at = unit.start
    for line in raw.splitlines(keepends=True):
        offset, at = at, at + len(line)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{unit.path} line {_line_number(unit.path, offset)} is not JSON "
                            f"({e.msg})") from None
        text = record.get(text_key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{unit.path} line {_line_number(unit.path, offset)} has no string "
                            f"field {text_key!r} (set --text_key)")
        held_out = split_fraction is not None and _bucket(f"{name}:{offset}") < split_fraction
        (validation if held_out else train).append(text.encode("utf-8"))
    return train, validation


def _line_number(path: str, offset: int) -> int:
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def _bucket(key: str) -> float:
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _utf8(data: bytes, unit, at: int = 0) -> str:
    """`data` (at byte `at` of the unit's text) decoded."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{unit.not_utf8(at + e.start)}; use the byte tokenizer "
                        "(--tokenizer=byte, data.tokenizer='byte')") from None


def _encode(tokenizer, text: bytes, unit):
    """The tokens of `text` (int32 arrays), piece by piece: pieces of about PIECE_BYTES cut at
    line starts, a few at a time, so a unit's tokens are never all held at once."""
    pieces, at = [], 0
    while at < len(text):
        end = text.find(b"\n", at + PIECE_BYTES)
        end = len(text) if end < 0 else end + 1
        pieces.append((at, end))
        at = end
    kind = getattr(tokenizer, "kind", None)
    if kind == "byte":
        for at, end in pieces:
            yield np.frombuffer(text, np.uint8, end - at, at).astype(np.int32)
    elif kind == "char":  # vectorised: code points looked up in the sorted vocabulary
        vocab = np.frombuffer(tokenizer.chars.encode("utf-32-le"), np.uint32)
        for at, end in pieces:
            codes = np.frombuffer(_utf8(text[at:end], unit, at).encode("utf-32-le"), np.uint32)
            ids = np.searchsorted(vocab, codes)
            bad = (ids >= len(vocab)) | (vocab[np.minimum(ids, len(vocab) - 1)] != codes)
            if bad.any():
                raise DataError(f"{unit.where} has the character {chr(codes[bad][0])!r}, "
                                "which is not in the tokenizer's vocabulary")
            yield ids.astype(np.int32)
    else:
        for i in range(0, len(pieces), PIECES_AT_ONCE):
            texts = [_utf8(text[at:end], unit, at) for at, end in pieces[i:i + PIECES_AT_ONCE]]
            for encoding in tokenizer.backend.encode_batch(texts, add_special_tokens=False):
                yield np.asarray(encoding.ids, np.int32)


def _prepare_unit(unit, out: pathlib.Path, tokenizer, eos: int | None,
                  fraction: float | None, text_key: str | None) -> int:
    """Write the unit's shards and its progress record; returns the bytes of text it held."""
    if multiprocessing.parent_process() is not None:  # a worker: one process per core already
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    train, validation = unit.documents(text_key, fraction)
    counts, text_bytes = {}, 0
    for split, documents in (("train", train), ("validation", validation)):
        name = f"{split}-{unit.number:05d}.array_record"
        ends = unit.ends_document(split)
        if tokenizer is None:
            counts[split] = _write_raw(out / name, documents, ends)
            text_bytes += counts[split]["bytes"] - counts[split]["documents"]  # less the ends
            continue
        end = [np.array([eos], np.int32)] if ends and eos is not None else []
        read = [0]  # bytes of the documents, counted as they are read

        def pieces(documents=documents, end=end, read=read):
            for doc in documents:
                read[0] += len(doc)
                yield from _encode(tokenizer, doc, unit)
                yield from end
        dtype = shards.token_dtype(tokenizer.vocab_size)
        tokens = _write_token_records(out / name, pieces(), dtype)
        text_bytes += read[0]
        # the end-of-document token counted as one byte, as the byte tokenizer counts it
        counts[split] = {"file": name, "tokens": tokens,
                         "bytes": read[0] + len(documents) * len(end),
                         "documents": len(documents) if ends else 0}
    shards.write_json(out / PROGRESS / f"{unit.number:05d}.json", {"unit": unit.key(), **counts})
    return text_bytes


def _write_token_records(path: pathlib.Path, pieces, dtype: np.dtype) -> int:
    """The token arrays `pieces`, one stream, as records of CHUNK_TOKENS tokens (the last one
    shorter) of `dtype`; returns the number of tokens."""
    total = 0

    def records():
        nonlocal total
        held, count = [], 0
        for piece in pieces:
            held.append(piece.astype(dtype))
            count += len(piece)
            if count >= shards.CHUNK_TOKENS:
                stream = np.concatenate(held)
                whole = count - count % shards.CHUNK_TOKENS
                for i in range(0, whole, shards.CHUNK_TOKENS):
                    yield stream[i:i + shards.CHUNK_TOKENS].tobytes()
                total += whole
                held, count = [stream[whole:]], count - whole
        if count:
            total += count
            yield np.concatenate(held).tobytes()

    shards.write_records(path, records())
    return total


def _write_raw(path: pathlib.Path, documents: list[bytes], ends_document: bool) -> dict:
    """Documents as records of UTF-8 text of at most RAW_RECORD_BYTES (cut at a line, else a
    character), each led by a flag byte: 1 when the record ends its document."""
    records = []
    for doc in documents:
        pieces = _pieces(doc)
        for i, piece in enumerate(pieces):
            ends = i == len(pieces) - 1 and ends_document
            records.append((b"\1" if ends else b"\0") + piece)
    shards.write_records(path, records)
    return {"file": path.name, "records": len(records),
            "bytes": sum(len(d) for d in documents) + sum(r[0] for r in records),
            "documents": sum(r[0] for r in records), "tokens": 0}


def _pieces(doc: bytes) -> list[bytes]:
    pieces, at = [], 0
    while at < len(doc):
        end = min(at + RAW_RECORD_BYTES, len(doc))
        if end < len(doc):
            newline = doc.rfind(b"\n", at, end)
            end = newline + 1 if newline > at else end
            while end < len(doc) and doc[end] & 0xC0 == 0x80:  # not inside a character
                end -= 1
        pieces.append(doc[at:end])
        at = end
    return pieces


def _done(out: pathlib.Path, unit) -> bool:
    record = out / PROGRESS / f"{unit.number:05d}.json"
    return record.is_file() and json.loads(record.read_text())["unit"] == unit.key()


def _index(out: pathlib.Path, units: list, tokenizer, eos: int | None,
           settings: dict) -> dict:
    keys = ("records", "documents", "bytes") if tokenizer is None else (
        "tokens", "documents", "bytes")
    splits = {s: {"shards": [], **dict.fromkeys(keys, 0)} for s in shards.SPLITS}
    for unit in units:
        done = json.loads((out / PROGRESS / f"{unit.number:05d}.json").read_text())
        for split in shards.SPLITS:
            part = done[split]
            if part[keys[0]]:
                splits[split]["shards"].append(part)
            for key in keys:
                splits[split][key] += part[key]
    for split, info in splits.items():
        if info[keys[0]] < (1 if tokenizer is None else 2):
            raise DataError(f"the inputs give the {split} split {info[keys[0]]} {keys[0]}: "
                            "give more text, or change the validation fraction "
                            "(--validation_fraction, data.validation_fraction)")
    if tokenizer is None:
        return {"format": shards.FORMAT, "kind": "raw_text", "tokenizer": RAW,
                "validation_fraction": settings["validation_fraction"],
                "text_key": settings["text_key"], "splits": splits,
                "inputs": settings["inputs"]}
    return {"format": shards.FORMAT, "kind": "text", "tokenizer": settings["tokenizer"],
            "tokenizer_sha256": shards.tokenizer_sha256(tokenizer),
            "vocab_size": tokenizer.vocab_size,
            "token_dtype": shards.token_dtype(tokenizer.vocab_size).name,
            "end_of_document": None if eos is None else int(eos),
            "chunk_tokens": shards.CHUNK_TOKENS,
            "validation_fraction": settings["validation_fraction"],
            "text_key": settings["text_key"], "splits": splits, "inputs": settings["inputs"]}


# ---------------------------------------------------------------------------------------------
# Images: PNG/JPEG files (labelled by class folder) or MNIST IDX pairs into image records.

IMAGES_PER_UNIT = 4096
IDX_IMAGES, IDX_LABELS = "-images-idx3-ubyte", "-labels-idx1-ubyte"
DIGIT_NAMES = tuple(str(i) for i in range(10))


def is_image_input(path: pathlib.Path) -> bool:
    from genai_jax.data.image_sources import IMAGE_SUFFIXES

    return path.suffix.lower() in IMAGE_SUFFIXES or IDX_IMAGES in path.name or (
        IDX_LABELS in path.name)


def prepare_images(inputs: list[pathlib.Path], out: pathlib.Path, *,
                   validation_fraction: float = 0.1, workers: int = 0, log=print) -> dict:
    """Image files (classes: their folders under the inputs' common folder; held out by a hash
    of the relative path, as `data.name="image_folder"` does) or MNIST IDX pairs (`train-*` and
    `t10k-*` are the splits; one pair is split by position) into image records; returns the
    index."""
    if not 0.0 < validation_fraction < 1.0:
        raise DataError(f"validation_fraction={validation_fraction} must be in (0, 1)")
    out = pathlib.Path(out).expanduser()
    # IDX images are stored as their pixels, image files as the files' bytes (decoded by the
    # data workers of the runs that read them)
    idx = any(IDX_IMAGES in p.name or IDX_LABELS in p.name for p in inputs)
    settings = {"tokenizer": "images", "validation_fraction": validation_fraction,
                "encoding": "pixels" if idx else "file",
                "inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size}
                           for p in inputs]}
    _claim(out, settings)
    if idx:
        kind, splits, shape, mode, names = ("idx", _idx_splits(inputs, validation_fraction),
                                            None, "L", DIGIT_NAMES)
    else:
        kind, (splits, shape, mode, names) = "folder", _folder_splits(inputs,
                                                                      validation_fraction)
    units = []
    for split, items in splits.items():
        for start in range(0, len(items), IMAGES_PER_UNIT):
            units.append((len(units), split, kind, items[start:start + IMAGES_PER_UNIT]))
    todo = [u for u in units if not (out / PROGRESS / f"{u[0]:05d}.json").is_file()]
    log(f"{len(units) - len(todo)} of {len(units)} units already prepared; {len(todo)} to go")
    workers = min(workers or os.cpu_count() or 1, max(len(todo), 1))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for future in [pool.submit(_prepare_image_unit, u, out, shape) for u in todo]:
            future.result()
    index_splits = {s: {"shards": [], "records": 0} for s in shards.SPLITS}
    for number, split, _, _ in units:
        done = json.loads((out / PROGRESS / f"{number:05d}.json").read_text())
        index_splits[split]["shards"].append(done)
        index_splits[split]["records"] += done["records"]
        shape = done["shape"]
    for split, info in index_splits.items():
        if not info["records"]:
            raise DataError(f"the inputs give the {split} split no images: give more, or "
                            "change --validation_fraction")
    index = {"format": shards.FORMAT, "kind": "image", "shape": shape, "mode": mode,
             "encoding": settings["encoding"],
             "num_classes": len(names), "label_names": list(names),
             "validation_fraction": validation_fraction, "splits": index_splits,
             "inputs": settings["inputs"]}
    shards.write_json(out / shards.INDEX, index)
    return index


def _idx_splits(inputs, fraction: float) -> dict:
    """{split: [(IDX images file, labels file, row), ...]} of MNIST-format pairs."""
    from genai_jax.data.image_sources import read_idx

    pairs = {}
    for images in (p for p in inputs if IDX_IMAGES in p.name):
        prefix = images.name.split(IDX_IMAGES)[0]
        labels = [p for p in inputs if p.name.startswith(prefix + IDX_LABELS)]
        if not labels:
            raise DataError(f"{images} has no matching {prefix}{IDX_LABELS} file among the "
                            "inputs")
        n, m = len(read_idx(images)), len(read_idx(labels[0]))
        if n != m:
            raise DataError(f"{images.name} has {n} images but {labels[0].name} has {m} labels")
        pairs[prefix] = [(str(images), str(labels[0]), i) for i in range(n)]
    if not pairs:
        raise DataError("the inputs hold IDX label files but no *-images-idx3-ubyte file")
    if "train" in pairs and "t10k" in pairs:
        return {"train": pairs["train"], "validation": pairs["t10k"]}
    if len(pairs) > 1:
        raise DataError(f"the inputs hold IDX pairs {sorted(pairs)}: expected train-* and "
                        "t10k-*, or one pair to split")
    (whole,) = pairs.values()
    n = int(round(len(whole) * (1 - fraction)))
    return {"train": whole[:n], "validation": whole[n:]}


def _folder_splits(inputs, fraction: float):
    """({split: [(file, label), ...]}, shape, PIL mode, class names) of image files, all of one
    size, classed by their folders under the inputs' common folder."""
    from genai_jax.data.image_sources import scan_image_files

    root = pathlib.Path(os.path.commonpath([os.path.abspath(p.parent) for p in inputs]))
    scan = scan_image_files(inputs, root, fraction, f"the inputs (under {root})")
    splits = {split: list(zip(paths, labels.tolist(), strict=True))
              for split, (paths, labels) in scan.splits.items()}
    return splits, list(scan.shape), scan.mode, scan.classes


def _prepare_image_unit(unit, out: pathlib.Path, shape) -> None:
    number, split, kind, items = unit
    name = f"{split}-{number:05d}.array_record"
    if kind == "idx":  # items: (images file, labels file, row)
        from genai_jax.data.image_sources import read_idx

        images, labels = read_idx(pathlib.Path(items[0][0])), read_idx(pathlib.Path(items[0][1]))
        records = (_image_record(labels[row], images[row].tobytes()) for _, _, row in items)
        shape = [*images.shape[1:], 1]
    else:  # items: (image file, label): the file's bytes, decoded when a batch reads them
        records = (_image_record(label, _checked_image_file(path)) for path, label in items)
    shards.write_records(out / name, records)
    shards.write_json(out / PROGRESS / f"{number:05d}.json",
                {"file": name, "records": len(items), "shape": shape})


def _image_record(label, payload: bytes) -> bytes:
    """The label as 4 little-endian bytes, then the image: its uint8 pixels (IDX) or its
    file's bytes (`image_sources.ImageRecords`)."""
    return np.int32(label).astype("<i4").tobytes() + payload


def _checked_image_file(path: str) -> bytes:
    """The bytes of an image file whose structure PIL verifies (chunk checksums for PNG),
    without decoding its pixels."""
    from PIL import Image

    data = pathlib.Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises several kinds on bad files
        raise DataError(f"{path} is not an image PIL can read ({e})") from None
    return data
