"""Data: tokenizers, text sources (local file, embedded stdlib corpus, TFDS catalog), batches."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from genai_jax.data import DataError, Tokenizer, load_text, sequential_batches
from genai_jax.data.lm_batches import windows
from tests.conftest import tiny_lm_config


def test_tokenizers_round_trip():
    text = "héllo, wörld\n"
    byte = Tokenizer.from_text("byte", text.encode())
    assert byte.vocab_size == 256 and byte.decode(byte.encode(text)) == text
    char = Tokenizer.from_text("char", text.encode())
    assert char.vocab_size == len(set(text))
    assert char.decode(char.encode(text)) == text
    with pytest.raises(DataError, match="not in this model's"):
        char.encode("xyz", "the prompt")


def test_char_tokenizer_rejects_non_utf8():
    with pytest.raises(DataError, match="not UTF-8 .*data.tokenizer='byte'"):
        Tokenizer.from_text("char", b"ok \xff\xfe bad")


def test_text_file_split_is_90_10_at_a_line_and_cached(text_file):
    """The first 90% of the file's bytes (to the next line start) train, the rest (ended by
    the end-of-document token) validates; tokenised once into the cache, read from there."""
    cfg = tiny_lm_config(**{"data.path": str(text_file)}).data
    data = load_text(cfg)
    raw = text_file.read_bytes()
    cut = raw.find(b"\n", int(0.9 * len(raw)) - 1) + 1
    assert 0 < cut < len(raw)
    np.testing.assert_array_equal(data.train[:], data.tokenizer.encode(raw[:cut]))
    np.testing.assert_array_equal(data.validation[:], np.append(
        data.tokenizer.encode(raw[cut:]), data.tokenizer.encode(b"\0")))
    assert data.bytes_per_token == 1.0  # char tokens of ASCII text, the end byte counted
    again = load_text(cfg)
    assert again.directory == data.directory
    np.testing.assert_array_equal(again.train[:], data.train[:])
    # another file (same size, other content): another preparation
    text_file.with_name("other.txt").write_bytes(raw[::-1])
    other = load_text(tiny_lm_config(**{"data.path": str(text_file.with_name("other.txt"))})
                      .data)
    assert other.directory != data.directory


def test_a_file_of_one_line_splits_at_a_character(tmp_path):
    path = tmp_path / "one_line.txt"
    path.write_text("é" * 1000)  # two bytes a character: 90% of the bytes falls inside one
    data = load_text(tiny_lm_config(**{"data.path": str(path)}).data)
    assert data.tokenizer.decode(data.train[:]) == "é" * 900


def test_a_text_file_is_one_document_whatever_its_suffix_and_bad_input_leaves_no_cache(
        tmp_path):
    from genai_jax import paths

    notes = tmp_path / "notes.json"  # not JSONL: one document of text
    notes.write_text("".join(f"line {i} is not json\n" for i in range(100)))
    data = load_text(tiny_lm_config(**{"data.path": str(notes)}).data)
    assert data.tokenizer.decode(data.train[:]).startswith("line 0 is not json\nline 1")
    # canaries' characters are in a char vocabulary built for them ("my PIN is 1 2 3")
    canaries = load_text(tiny_lm_config(**{"data.path": str(notes), "data.canaries": 1}).data)
    assert canaries.tokenizer.decode(canaries.tokenizer.encode("my PIN is 1 2 3")) == (
        "my PIN is 1 2 3")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" * 50 + b"\xff\xfe\n")
    with pytest.raises(DataError, match="bad.txt is not UTF-8 text"):
        load_text(tiny_lm_config(**{"data.path": str(bad)}).data)
    # the failed preparation is gone (the cache is shared with other test workers: look for it)
    claims = (paths.cache_dir() / "tokens").glob("*/progress/settings.json")
    assert not [c for c in claims if str(bad.resolve()) in c.read_text()]
    assert [c for c in (paths.cache_dir() / "tokens").glob("*/progress/settings.json")
            if str(notes.resolve()) in c.read_text()]  # a good one stays


def test_batches_are_a_function_of_seed_and_step(text_file):
    tokens = load_text(tiny_lm_config(**{"data.path": str(text_file)}).data).train
    a, b = windows(tokens, 8, 16, seed=3), windows(tokens, 8, 16, seed=3)
    np.testing.assert_array_equal(a.batch(5)["inputs"], b.batch(5)["inputs"])
    assert not np.array_equal(a.batch(5)["inputs"], a.batch(6)["inputs"])
    batch = a.batch(5)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    # each host's rows, stacked, are the global batch
    parts = [a.batch(5, process_index=i, process_count=4)["inputs"] for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), batch["inputs"])


def test_packed_windows_read_in_one_span_follow_the_rule_window_by_window():
    """The batched packed windows (one read per window) equal the rule applied to each offset
    alone: move to the first document start in [offset, offset + block), if any."""
    from genai_jax.data.lm_batches import WindowExamples, packed_window, uniform_ints

    def one(tokens, offset, block):
        ends = np.flatnonzero(tokens[max(offset - 1, 0):offset + block - 1] == 0)
        if offset and len(ends):
            offset = min(max(offset - 1, 0) + int(ends[0]) + 1, len(tokens) - block - 1)
        return packed_window(tokens, offset, block, 0)

    rng = np.random.default_rng(0)
    for trial in range(100):  # short streams too: a span longer than the stream
        block = int(rng.integers(2, 20))
        tokens = rng.integers(0, 5, int(rng.integers(block + 1, 200)))  # 0 ends a document
        got = WindowExamples(tokens, block, seed=trial, end_of_document=0).rows(range(32))
        offsets = uniform_ints(trial, range(32), len(tokens) - block)
        for row, offset in enumerate(offsets.tolist()):
            for key, value in one(tokens, offset, block).items():
                np.testing.assert_array_equal(got[key][row], value)


def test_sequential_batches_cover_the_split_in_order():
    tokens = np.arange(1000)
    batches = sequential_batches(tokens, batch_size=3, block_size=10)
    assert len(batches) == (999 // 10) // 3
    np.testing.assert_array_equal(batches[0]["inputs"][1], np.arange(10, 20))
    np.testing.assert_array_equal(batches[0]["targets"][0], np.arange(1, 11))


def test_stdlib_corpus_is_built_once_and_split_by_file(tmp_path):
    from genai_jax.data.stdlib_code import split_of, stdlib_files

    cfg = tiny_lm_config(**{"data.name": "stdlib_code", "data.tokenizer": "byte",
                            "data.data_dir": str(tmp_path)}).data
    data = load_text(cfg)
    files = stdlib_files()
    expected = {s: sum(f.stat().st_size for rel, f in files if split_of(rel) == s)
                for s in ("train", "validation")}
    n_docs = {s: sum(split_of(rel) == s for rel, _ in files) for s in expected}
    # every document ends with one end-of-document byte
    assert len(data.train) == expected["train"] + n_docs["train"]
    assert len(data.validation) == expected["validation"] + n_docs["validation"]
    assert 0.02 < len(data.validation) / len(data.train) < 0.12
    assert list((tmp_path / "stdlib_code").iterdir())  # prepared into the TFDS data dir
    again = load_text(cfg)  # read back from the prepared array_record files
    np.testing.assert_array_equal(again.validation[:], data.validation[:])


@pytest.mark.parametrize("name,eval_split", [("tiny_shakespeare", "validation"),
                                             ("lm1b", "test")])
def test_tfds_catalog_dataset_with_mock_data(name, eval_split, tmp_path):
    cfg = tiny_lm_config(**{"data.name": name, "data.tokenizer": "char",
                            "data.eval_split": eval_split, "data.data_dir": str(tmp_path)}).data
    with tfds.testing.mock_data(num_examples=4):
        data = load_text(cfg)
    # mock examples are random strings; 4 documents, each ended by the end-of-document token
    assert len(data.train) > 4 and len(data.validation) > 4
    assert (data.train[:] == data.tokenizer.start_token).sum() >= 4
    assert "\0" in data.tokenizer.chars


def test_unknown_dataset_and_missing_split(tmp_path):
    cfg = tiny_lm_config(**{"data.name": "no_such_dataset_xyz",
                            "data.data_dir": str(tmp_path)}).data
    with pytest.raises(DataError, match="neither 'stdlib_code', 'text_file' nor a TFDS"):
        load_text(cfg)
    cfg = tiny_lm_config(**{"data.name": "stdlib_code", "data.eval_split": "dev",
                            "data.data_dir": str(tmp_path)}).data
    with pytest.raises(DataError, match="no split 'dev'.*'train', 'validation'"):
        load_text(cfg)


def test_empty_and_missing_text_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        load_text(tiny_lm_config(**{"data.path": str(empty)}).data)
    with pytest.raises(DataError, match="is not a file"):
        load_text(tiny_lm_config(**{"data.path": str(tmp_path / "nope.txt")}).data)


def test_pipeline_reads_ahead_the_batches_of_each_step():
    """What the trainer reads through Grain (threads or worker processes, any number of hosts)
    is `batch(step)`, stacked `steps_per_call` at a time."""
    batches = windows(np.arange(5000) % 251, 8, 16, seed=3)
    expected = [np.stack([batches.batch(s)["inputs"] for s in (i, i + 1)]) for i in (4, 6, 8)]
    for workers, prefetch in ((0, 0), (0, 2), (2, 1)):
        got = [x["inputs"] for x in batches.iterator(4, 10, steps_per_call=2, workers=workers,
                                                     prefetch=prefetch)]
        np.testing.assert_array_equal(np.stack(got), np.stack(expected))
    halves = [np.stack([x["inputs"] for x in batches.iterator(4, 10, steps_per_call=2,
                                                              process_index=i, process_count=2)])
              for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves, axis=2), np.stack(expected))


def test_packed_windows_start_documents_and_never_cross_them():
    rng = np.random.default_rng(0)
    eos = 0
    # documents shorter than a window, so that every window has a document start to move to
    docs = [rng.integers(1, 50, rng.integers(3, 22)) for _ in range(300)]
    stream = np.concatenate([np.append(d, eos) for d in docs])
    batch = windows(stream, 16, 24, seed=1, end_of_document=eos).batch(2)
    starts = set(np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])]))
    for row in range(16):
        inputs, seg, pos, mask = (batch[k][row] for k in ("inputs", "segment_ids", "positions",
                                                          "loss_mask"))
        assert seg[0] == 1 and pos[0] == 0 and np.all(np.diff(seg) >= 0)
        # a new segment begins right after each end of document, with position 0
        new = np.flatnonzero(np.diff(seg)) + 1
        np.testing.assert_array_equal(new, np.flatnonzero(inputs[:-1] == eos) + 1)
        assert np.all(pos[new] == 0) and np.all(np.diff(pos)[np.diff(seg) == 0] == 1)
        np.testing.assert_array_equal(mask, inputs != eos)
        # the window starts where a document does
        offset = next(o for o in starts if np.array_equal(stream[o:o + 24], inputs))
        assert offset in starts
