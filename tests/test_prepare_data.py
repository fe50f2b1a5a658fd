"""Data at scale: `experiments.prepare_data` into ArrayRecord shards, read back through Grain
(`data.name=array_record`), resumable preparation, and bad input as one line."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from genai_jax.data import build, prepare, shards
from genai_jax.errors import DataError
from genai_jax.tokenization import load_tokenizer
from genai_jax.train import read_metrics, train
from tests.conftest import tiny_lm_config
from tests.test_cli import cli, error_line, tree_digest

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards hum softly".split()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A JSONL file of 600 short documents and a text file (one document)."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = random.Random(0)
    docs = [" ".join(rng.choices(WORDS, k=rng.randint(3, 40))) + rng.choice("é.!")
            for _ in range(600)]
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (folder / "play.txt").write_text("\n".join(" ".join(rng.choices(WORDS, k=9))
                                               for _ in range(300)) + "\n")
    return folder, docs


def prepare_inputs(inputs, tmp_path_factory, tokenizer: str):
    """The inputs prepared with `tokenizer` in units of 4 KB on 2 processes: (DIR, index)."""
    folder, _ = inputs
    out = tmp_path_factory.mktemp(tokenizer) / "shards"
    index = prepare.prepare_text(sorted(folder.iterdir()), out, tokenizer, unit_bytes=4000,
                                 workers=2, log=lambda *_: None)
    return out, index


@pytest.fixture(scope="module")
def prepared(inputs, tmp_path_factory):
    return prepare_inputs(inputs, tmp_path_factory, "char")


def split_documents(out, index, split: str) -> list[str]:
    stream = shards.TokenStream(out, index, split)
    tokenizer = load_tokenizer(out)
    text = tokenizer.decode(stream[0:len(stream)])
    return text.split("\0")


def test_every_document_lands_once_in_one_split_ended_by_eos(inputs, prepared):
    folder, docs = inputs
    out, index = prepared
    assert index["token_dtype"] == "uint16" and index["chunk_tokens"] == shards.CHUNK_TOKENS
    assert len(index["splits"]["train"]["shards"]) > 2  # several units, written in parallel
    train, validation = (split_documents(out, index, s) for s in shards.SPLITS)
    play = (folder / "play.txt").read_text()
    # The play is one document: its head trains, its tail (from a line start) validates, and
    # only its real end carries the end-of-document token.
    head = next(d for d in train if "\n" in d)
    tail = next(d for d in validation if "\n" in d)
    assert head + tail == play and play.startswith(head) and head.endswith("\n")
    assert 0.05 < len(tail) / len(play) < 0.15
    jsonl_train = [d for d in train if d and d != head]
    jsonl_validation = [d for d in validation if d and d != tail]
    assert sorted(jsonl_train + jsonl_validation) == sorted(docs)
    assert 0.05 < len(jsonl_validation) / len(docs) < 0.15
    assert index["splits"]["validation"]["documents"] == len(jsonl_validation) + 1
    assert index["splits"]["train"]["tokens"] + index["splits"]["validation"]["tokens"] == sum(
        len(d) + 1 for d in docs) + len(play) + 1


def test_interrupted_preparation_resumes_and_other_settings_are_refused(inputs, prepared,
                                                                        tmp_path):
    folder, _ = inputs
    out, index = prepared
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(out, copy)
    # as if killed after unit 1 was written but before units 0 and 2 were
    for unit in ("00000", "00002"):
        (copy / "progress" / f"{unit}.json").unlink()
    (copy / "train-00000.array_record").unlink()
    (copy / shards.INDEX).unlink()
    kept = (copy / "train-00001.array_record").stat().st_mtime_ns
    lines = []
    again = prepare.prepare_text(sorted(folder.iterdir()), copy, "char", unit_bytes=4000,
                                 workers=2, log=lines.append)
    assert again["splits"] == index["splits"]
    assert (copy / "train-00001.array_record").stat().st_mtime_ns == kept
    assert lines[0].startswith(f"{len(list((out / 'progress').glob('0*.json'))) - 2} of")
    before = tree_digest(copy)
    with pytest.raises(DataError, match="other tokenizer"):
        prepare.prepare_text(sorted(folder.iterdir()), copy, "byte", unit_bytes=4000)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        prepare.prepare_text(sorted(folder.iterdir()), tmp_path / "busy", "char")
    assert tree_digest(copy) == before
    # killed while claiming the directory (its settings not yet renamed in): it starts afresh
    (tmp_path / "claimed" / "progress").mkdir(parents=True)
    (tmp_path / "claimed" / "progress" / "settings.json.tmp").write_text("{")
    fresh = prepare.prepare_text(sorted(folder.iterdir()), tmp_path / "claimed", "char",
                                 unit_bytes=4000, workers=1, log=lambda *_: None)
    assert fresh["splits"] == index["splits"]


def test_training_reads_the_shards_packed_through_workers(prepared, tmp_path):
    out, index = prepared
    config = tiny_lm_config(**{"data.name": "array_record", "data.path": str(out),
                               "data.packing": True, "data.workers": 1, "train.steps": 10,
                               "eval.every": 10, "checkpoint.every": 10})
    pipeline = build(config, "text")
    batch = pipeline.train.batch(3)
    assert set(batch) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
    eos = index["end_of_document"]
    np.testing.assert_array_equal(batch["loss_mask"], batch["inputs"] != eos)
    validation = index["splits"]["validation"]
    # a character is a byte, but "é" is two
    assert pipeline.info["bytes_per_token"] == validation["bytes"] / validation["tokens"] > 1
    run = train(config, tmp_path, progress=False)
    assert run.start_step == 10
    last = read_metrics(tmp_path)[-1]
    assert np.isfinite(last["eval/loss"]) and last["train/data_wait_ms"] >= 0


def test_bad_shards_and_mismatched_tokenizers_are_one_line(prepared, tmp_path):
    out, index = prepared
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    shard = broken / "train-00001.array_record"
    shard.write_bytes(shard.read_bytes()[:-200])
    config = lambda **kw: tiny_lm_config(**{"data.name": "array_record",
                                            "data.path": str(broken), **kw})
    with pytest.raises(DataError, match="shard .*train-00001.array_record cannot be read"):
        build(config(), "text")
    with pytest.raises(DataError, match="tokenised with 'char'.*data.tokenizer='byte'"):
        build(config(**{"data.tokenizer": "byte"}), "text")
    with pytest.raises(DataError, match="too short for windows"):
        build(tiny_lm_config(**{"data.name": "array_record", "data.path": str(out),
                                "model.block_size": index["splits"]["validation"]["tokens"]}),
              "text")


def test_bad_input_to_prepare_data_is_one_line(tmp_path, env):
    proc = cli("prepare_data", f"--input={tmp_path}/nothing*.txt", f"--out={tmp_path}/o",
               env=env)
    assert "matches no file" in error_line(proc)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "also fine"}\nnot json\n')
    proc = cli("prepare_data", f"--input={bad}", f"--out={tmp_path}/o2", env=env)
    assert f"{bad} line 4 is not JSON" in error_line(proc)
    assert not (tmp_path / "o2" / shards.INDEX).exists()


def test_a_mixture_draws_its_sources_in_proportion(tmp_path):
    dirs = []
    for letter in "ab":
        (tmp_path / f"{letter}.txt").write_text((letter * 60 + "\n") * 200)
        dirs.append(tmp_path / letter)
        prepare.prepare_text([tmp_path / f"{letter}.txt"], dirs[-1], "byte", workers=1,
                             log=lambda *_: None)
    config = tiny_lm_config(**{"data.name": "array_record", "data.tokenizer": "byte",
                               "data.mixture": f"{dirs[0]}:3,{dirs[1]}:1",
                               "train.batch_size": 8})
    pipeline = build(config, "text")
    rows = np.concatenate([pipeline.train.batch(s)["inputs"] for s in range(50)])
    from_a = np.mean([(row == ord("a")).any() for row in rows])
    assert from_a == pytest.approx(0.75, abs=0.02)
    again = build(config, "text").train.batch(7)["inputs"]  # a function of (seed, step)
    np.testing.assert_array_equal(again, pipeline.train.batch(7)["inputs"])
    with pytest.raises(DataError, match="not DIR:WEIGHT"):
        build(tiny_lm_config(**{"data.name": "array_record", "data.tokenizer": "byte",
                                "data.mixture": f"{dirs[0]}:0"}), "text")


@pytest.fixture(scope="module")
def raw(inputs, tmp_path_factory):
    return prepare_inputs(inputs, tmp_path_factory, "none")


@pytest.mark.parametrize("tokenizer", ["byte", "gpt2"])
def test_raw_text_is_tokenised_on_the_fly_into_packed_documents(inputs, raw, tokenizer):
    folder, docs = inputs
    out, index = raw
    assert index["kind"] == "raw_text"
    assert index["splits"]["train"]["documents"] + index["splits"]["validation"][
        "documents"] == len(docs) + 1
    config = tiny_lm_config(**{"data.name": "array_record", "data.path": str(out),
                               "data.tokenizer": tokenizer, "data.packing": True,
                               "model.block_size": 48})
    pipeline = build(config, "text")
    tok = pipeline.info["tokenizer"]
    texts = docs + [(folder / "play.txt").read_text()]
    batch = pipeline.train.batch(1)
    for row in range(len(batch["inputs"])):
        segments = batch["segment_ids"][row]
        for segment in np.unique(segments):
            ids = batch["inputs"][row][segments == segment]
            text = tok.decode(ids[ids != index.get("end_of_document", -1)])
            text = text.split("\0")[0].split("<|endoftext|>")[0]
            # every document in a packed window is tokenised from its start
            assert any(t.startswith(text) for t in texts), text
    unpacked = build(tiny_lm_config(**{"data.name": "array_record", "data.path": str(out),
                                       "data.tokenizer": tokenizer}), "text")
    assert set(unpacked.train.batch(0)) == {"inputs", "targets"}
    with pytest.raises(DataError, match="built from the data"):
        build(tiny_lm_config(**{"data.name": "array_record", "data.path": str(out),
                                "data.tokenizer": "char"}), "text")


def test_data_bench_measures_the_pipeline_and_its_memory(prepared, tmp_path, env):
    from experiments.corpus import generate_corpus

    made = generate_corpus(tmp_path / "corpus", 1)
    assert made["bytes"] >= 10**6 and made["documents"] > 100
    first = json.loads((tmp_path / "corpus" / "part-00000.jsonl").read_text().splitlines()[0])
    assert isinstance(first["text"], str)
    out, _ = prepared
    proc = cli("data_bench", "--config=experiments/configs/lm_char.py",
               "--config.data.name=array_record", f"--config.data.path={out}",
               "--config.data.tokenizer=char", "--config.data.workers=1", "--steps=40",
               env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["tokens_per_s"] > 0 and result["peak_rss_mb"] > 50 and result["workers"] == 1


def test_a_run_on_raw_text_evaluates_on_its_held_out_windows(raw, tmp_path, env):
    out, _ = raw
    config = tiny_lm_config(**{"data.name": "array_record", "data.path": str(out),
                               "data.tokenizer": "byte", "train.steps": 10, "eval.every": 10,
                               "checkpoint.every": 10})
    train(config, tmp_path, progress=False)
    proc = cli("evaluate", f"--workdir={tmp_path}", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["validation_windows"] == 2 * 4 and np.isfinite(result["bits_per_byte"])


def test_mnist_idx_and_image_folders_become_image_records(tmp_path):
    from PIL import Image

    from genai_jax.data.images import load_images
    from tests.conftest import SHARED_DATA, image_data_config

    mnist = SHARED_DATA / "mnist"
    index = prepare.prepare_images(sorted(mnist.glob("*ubyte*")), tmp_path / "mnist",
                                   log=lambda *_: None)
    assert index["shape"] == [28, 28, 1] and index["num_classes"] == 10
    prepared = load_images(image_data_config("array_record", path=str(tmp_path / "mnist")))
    direct = load_images(image_data_config("mnist_idx", path=str(mnist)))
    for split in ("train", "validation"):  # 9,000 / 1,000, the same pixels and labels
        a, b = getattr(prepared, split), getattr(direct, split)
        assert len(a) == len(b) == {"train": 9000, "validation": 1000}[split]
        rows = np.arange(0, len(a), 97)
        for key in ("x", "label"):
            np.testing.assert_array_equal(a.get(rows)[key], b.get(rows)[key])
    folder = tmp_path / "pictures"
    rng = np.random.default_rng(0)
    for i in range(40):
        (folder / ("cat" if i % 2 else "dog")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)).save(
            folder / ("cat" if i % 2 else "dog") / f"{i}.png")
    index = prepare.prepare_images(sorted(folder.rglob("*.png")), tmp_path / "folder",
                                   validation_fraction=0.25, log=lambda *_: None)
    # image files are stored as they are (label, then the file's bytes), decoded when read
    assert (index["encoding"], index["mode"], index["shape"]) == ("file", "RGB", [6, 5, 3])
    records = shards.ShardReader([str(tmp_path / "folder" / s["file"])
                                  for s in index["splits"]["train"]["shards"]])
    files = {p.read_bytes() for p in folder.rglob("*.png")}
    assert all(records[i][4:] in files for i in range(len(records)))
    prepared = load_images(image_data_config("array_record", path=str(tmp_path / "folder")))
    direct = load_images(image_data_config("image_folder", path=str(folder),
                                           validation_fraction=0.25))
    assert prepared.label_names == direct.label_names == ("cat", "dog")
    for split in ("train", "validation"):
        a, b = getattr(prepared, split), getattr(direct, split)
        rows = np.arange(len(b))
        for key in ("x", "label"):
            np.testing.assert_array_equal(a.get(rows)[key], b.get(rows)[key])
    cut = folder / "cat" / "1.png"
    cut.write_bytes(cut.read_bytes()[:-30])  # its header reads; its data does not verify
    with pytest.raises(DataError, match="1.png is not an image PIL can read"):
        prepare.prepare_images(sorted(folder.rglob("*.png")), tmp_path / "cut",
                               log=lambda *_: None)


def test_image_augmentation_is_opt_in_per_example_and_read_by_workers():
    from genai_jax.data.images import Augment, image_batches
    from genai_jax.data.loader import Rows

    x = np.arange(16 * 8 * 8, dtype=np.uint8).reshape(16, 8, 8, 1)
    source = Rows({"x": x, "label": np.arange(16, dtype=np.int32)})
    plain = image_batches(source, 8, seed=0).batch(0)
    assert any(np.array_equal(plain["x"][0], img) for img in x)  # no augmentation by default
    cropped = image_batches(source, 8, seed=0, augment=Augment(crop_padding=2)).batch(0)
    np.testing.assert_array_equal(cropped["label"], plain["label"])
    moved = 0
    for got, label in zip(cropped["x"], cropped["label"], strict=True):
        padded = np.pad(x[label], ((2, 2), (2, 2), (0, 0)))
        windows = [padded[i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
        assert any(np.array_equal(got, w) for w in windows)  # a crop of its own image
        moved += not np.array_equal(got, x[label])
    assert moved >= 4
    flipped = image_batches(source, 8, seed=0, augment=Augment(flip=True)).batch(0)
    assert all(np.array_equal(f, x[label]) or np.array_equal(f, x[label][:, ::-1])
               for f, label in zip(flipped["x"], flipped["label"], strict=True))
    augmented = image_batches(source, 8, seed=0, augment=Augment(crop_padding=2, flip=True))
    expected = np.stack([augmented.batch(s)["x"] for s in (2, 3)])
    (read,) = list(augmented.iterator(2, 4, steps_per_call=2, workers=1))
    np.testing.assert_array_equal(read["x"], expected)  # the same, drawn in a worker


def test_windows_of_a_batch_read_together_equal_windows_read_one_by_one(prepared):
    """A batch's windows are read in one call (offsets drawn together; one gather from an
    in-memory stream, a record read each from shards) and equal the examples read alone; the
    offsets are uniform over the stream."""
    from genai_jax.data.lm_batches import WindowExamples, uniform_ints, windows

    draws = uniform_ints(7, np.arange(200_000), 50)
    counts = np.bincount(draws, minlength=50)
    assert draws.min() == 0 and draws.max() == 49
    assert ((counts - 4000) ** 2 / 4000).sum() < 100  # chi-square, 49 dof: p < 1e-5 above
    assert not np.array_equal(uniform_ints(8, np.arange(100), 50), draws[:100])
    np.testing.assert_array_equal(uniform_ints(np.int64(7), np.arange(100), 50), draws[:100])
    out, index = prepared
    stream = shards.TokenStream(out, index, "train")
    in_memory = stream[0:len(stream)]
    for tokens in (stream, in_memory):
        for end in (None, index["end_of_document"]):
            examples = WindowExamples(tokens, 24, seed=5, end_of_document=end)
            together = examples.rows(range(40, 56))
            alone = [examples[i] for i in range(40, 56)]
            assert set(together) == set(alone[0])
            for key, value in together.items():
                np.testing.assert_array_equal(value, np.stack([a[key] for a in alone]))
    for end in (None, index["end_of_document"]):  # shards and memory: the same windows
        from_shards, from_memory = (windows(tokens, 16, 24, seed=5, end_of_document=end).batch(3)
                                    for tokens in (stream, in_memory))
        for key, value in from_shards.items():
            np.testing.assert_array_equal(value, from_memory[key])
