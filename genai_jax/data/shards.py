"""Our ArrayRecord shards of tokenised text (`experiments.prepare_data` writes them; the data
config `data.name="array_record"`, `data.path=DIR` reads them), read record by record
(`ShardReader`, the array_record library's reader) in the Grain pipeline without ever holding a
split in memory.

A prepared directory holds, per split ("train", "validation"), shards `SPLIT-NNNNN.array_record`
whose records are consecutive chunks of `chunk_tokens` tokens (little-endian `token_dtype`:
uint16 when the vocabulary fits, else uint32) of the split's token stream, in which every
document ends with the end-of-document token; the tokenizer's files; and `index.json`:

    {"format": "genai_jax.array_record/1", "kind": "text", "tokenizer": SPEC,
     "tokenizer_sha256": ..., "vocab_size": V, "token_dtype": "uint16", "end_of_document": ID,
     "chunk_tokens": 4096, "validation_fraction": F, "text_key": "text",
     "splits": {"train": {"shards": [{"file", "tokens", "documents", "bytes"}, ...],
                          "tokens": N, "documents": D, "bytes": B}, "validation": {...}},
     "inputs": [{"path", "bytes"}, ...]}
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import tempfile

import numpy as np

from genai_jax.errors import DataError

INDEX = "index.json"
FORMAT = "genai_jax.array_record/1"
CHUNK_TOKENS = 4096
SPLITS = ("train", "validation")
# Random access wants one record per group and no compression to undo for each read.
WRITER_OPTIONS = "group_size:1,uncompressed"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def tokenizer_sha256(tokenizer) -> str:
    """A fingerprint of a tokenizer: the SHA-256 of the files it saves."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(pathlib.Path(tmp))
        digest = hashlib.sha256()
        for f in sorted(pathlib.Path(tmp).rglob("*")):
            if f.is_file():
                digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def write_records(path: pathlib.Path, records) -> int:
    """Write the byte strings `records` to the ArrayRecord file `path`, which appears (by a
    rename) only once complete; returns how many there were."""
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path.with_name(path.name + ".tmp")
    writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
    count = 0
    for record in records:
        writer.write(record)
        count += 1
    writer.close()
    tmp.rename(path)
    return count


def write_json(path: pathlib.Path, value) -> None:
    """`value` as JSON at `path`, which appears (by a rename) only once complete."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.rename(path)


def read_index(directory: str | pathlib.Path) -> dict:
    path = pathlib.Path(directory).expanduser() / INDEX
    if not path.is_file():
        raise DataError(f"{directory} has no {INDEX}: prepare it with `python -m "
                        "experiments.prepare_data --input=GLOB --out=DIR`")
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not JSON ({e.msg}): prepare the data again") from None
    if index.get("format") != FORMAT:
        raise DataError(f"{path} is not a genai_jax ArrayRecord index ({FORMAT})")
    return index


class TokenStream:
    """The token stream of one split, read by slices (`stream[a:b]` -> numpy) from its shards;
    picklable (Grain worker processes open their own readers)."""

    def __init__(self, directory: str | pathlib.Path, index: dict, split: str):
        self.directory = pathlib.Path(directory).expanduser()
        self.split, self.chunk = split, index["chunk_tokens"]
        self.dtype = np.dtype(index["token_dtype"])
        shards = index["splits"][split]["shards"]
        self.paths = [str(self.directory / s["file"]) for s in shards]
        tokens = np.array([s["tokens"] for s in shards], np.int64)
        # Where each shard's tokens and records start in the split's stream and record list.
        self._token_start = np.concatenate([[0], np.cumsum(tokens)])
        self._record_start = np.concatenate([[0], np.cumsum(-(-tokens // self.chunk))])
        self._source = None

    def __len__(self) -> int:
        return int(self._token_start[-1])

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def _records(self):
        if self._source is None:
            self._source = ShardReader(self.paths)
        return self._source

    def _chunk(self, shard: int, chunk: int) -> np.ndarray:
        return self._read(self._records(), shard, chunk)

    def _read(self, records: ShardReader, shard: int, record: int) -> np.ndarray:
        raw = records.read(shard, record)
        if len(raw) % self.dtype.itemsize:
            raise DataError(f"shard {records.paths[shard]} holds a record of {len(raw)} bytes, "
                            f"not whole {self.dtype} tokens: prepare the data again")
        return np.frombuffer(raw, self.dtype)

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("a token stream is read by contiguous slices")
        parts = []
        while start < stop:
            shard = int(np.searchsorted(self._token_start, start, side="right")) - 1
            within = start - int(self._token_start[shard])
            chunk, at = divmod(within, self.chunk)
            take = min(stop - start, self.chunk - at,
                       int(self._token_start[shard + 1]) - start)
            parts.append(self._chunk(shard, chunk)[at:at + take])
            start += take
        if not parts:
            return np.zeros(0, self.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """`[len(starts), length]`: the slices `[start, start + length)` of the stream, found
        together; a slice inside one record (nearly all, for short windows) is one read."""
        starts = np.asarray(starts, np.int64)
        shard = np.searchsorted(self._token_start, starts, side="right") - 1
        chunk, at = np.divmod(starts - self._token_start[shard], self.chunk)
        inside = (at + length <= self.chunk) & (starts + length <= self._token_start[shard + 1])
        out = np.empty((len(starts), length), self.dtype)
        records = self._records()
        for i, (s, c, a, one) in enumerate(zip(shard.tolist(), chunk.tolist(), at.tolist(),
                                               inside.tolist(), strict=True)):
            if one:
                piece = self._read(records, s, c)[a:a + length]
                if len(piece) < length:
                    raise DataError(f"shard {self.paths[s]} holds a record shorter than the "
                                    "index says: prepare the data again")
                out[i] = piece
            else:
                out[i] = self[int(starts[i]):int(starts[i]) + length]
        return out

    def check(self) -> None:
        """Open every shard and read its first and last records: a missing, cut or foreign file
        is one DataError now, not a failure in a worker mid-run."""
        for shard, path in enumerate(self.paths):
            records = ShardReader([path])
            expected = int(self._record_start[shard + 1] - self._record_start[shard])
            if len(records) != expected:
                raise DataError(f"shard {path} holds {len(records)} records, and the index "
                                f"says {expected}: prepare the data again")
            for record in {0, expected - 1} if expected else ():
                self._read(records, 0, record)


class ShardReader:
    """The records of several ArrayRecord files (opened together by the array_record library's
    reader) read as one sequence by index, or by file and position (`read`).

    A record is read with the reader's range read (`read(i, i + 1)`, ~5 us for a 8 KB record
    here), not its list read (`read([i])`, what Grain's `ArrayRecordDataSource` does: ~50 us, a
    thread pool's dispatch per call), which made the read most of the cost of a short window."""

    OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # random access, in the caller's thread

    def __init__(self, paths: list[str]):
        from array_record.python.array_record_module import ArrayRecordReader

        self.paths, self._readers = paths, []
        for path in paths:
            if not pathlib.Path(path).is_file():
                raise DataError(f"shard {path} is missing: prepare the data again")
            try:
                reader = ArrayRecordReader(path, self.OPTIONS)
            except Exception as e:  # noqa: BLE001 - the reader raises several kinds on bad files
                raise _unreadable(path, e) from None
            if not reader.ok():  # a cut or foreign file opens, with no records and not ok
                raise _unreadable(path, RuntimeError("not a whole ArrayRecord file"))
            self._readers.append(reader)
        self._start = np.cumsum([0] + [r.num_records() for r in self._readers])

    def __len__(self) -> int:
        return int(self._start[-1])

    def __getitem__(self, index: int) -> bytes:
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        shard = int(np.searchsorted(self._start, index, side="right")) - 1
        return self.read(shard, index - int(self._start[shard]))

    def read(self, shard: int, position: int) -> bytes:
        """Record `position` of file `shard`."""
        try:
            return self._readers[shard].read(position, position + 1)[0]
        except Exception as e:  # noqa: BLE001 - the reader raises several kinds on bad files
            raise _unreadable(self.paths[shard], e) from None


def _unreadable(path: str, error: Exception) -> DataError:
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DataError(f"shard {path} cannot be read ({reason[:160]}): prepare the data again")


class Records:
    """The records of one split's shards, read by index; picklable (each worker process opens
    its own readers)."""

    def __init__(self, directory: str | pathlib.Path, index: dict, split: str):
        self.directory = pathlib.Path(directory).expanduser()
        shards = index["splits"][split]["shards"]
        self.paths = [str(self.directory / s["file"]) for s in shards]
        self._counts = [s["records"] for s in shards]
        self._source = None

    def __len__(self) -> int:
        return sum(self._counts)

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def _raw(self, index: int) -> bytes:
        if self._source is None:
            self._source = ShardReader(self.paths)
        return self._source[int(index)]

    def check(self) -> None:
        """Open every shard and compare its record count with the index's."""
        for path, expected in zip(self.paths, self._counts, strict=True):
            records = ShardReader([path])
            if len(records) != expected:
                raise DataError(f"shard {path} holds {len(records)} records, and the index "
                                f"says {expected}: prepare the data again")


class TextRecords(Records):
    """The raw text records of one split of a `prepare_data --tokenizer=none` directory:
    `records[i]` -> (UTF-8 bytes, whether the record ends its document)."""

    def __getitem__(self, index: int) -> tuple[bytes, bool]:
        raw = self._raw(index)
        return raw[1:], raw[:1] == b"\1"
