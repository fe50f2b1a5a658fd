"""Image data: every source (embedded digits, IDX files, image folders, TFDS catalog, 2-D toys),
batches by (seed, step), and the classifier-based sample metrics."""

from __future__ import annotations

import gzip
import json
import pathlib
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds

from genai_jax import paths
from genai_jax.data import DataError, image_sources, toys
from genai_jax.data.image_sources import read_idx
from genai_jax.data.images import eval_batches, image_batches, load_images
from genai_jax.data.loader import Rows
from genai_jax.evaluation.images import SampleEvaluator, frechet_distance, split_train
from tests.conftest import SHARED_DATA, image_data_config


@pytest.fixture(scope="module")
def digits():
    return load_images(image_data_config("digits"))


def test_digits_is_embedded_and_split_by_index(digits):
    assert (len(digits.train), len(digits.validation)) == (1617, 180)
    assert digits.shape == (8, 8, 1) and digits.num_classes == 10 and digits.kind == "image"
    x = digits.train.get(np.arange(len(digits.train)))["x"]
    assert x.dtype == np.uint8 and x.max() == 255 and x.min() == 0
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(digits.validation.get(np.arange(3))["label"],
                                  load_digits().target[[0, 10, 20]])


def test_embedded_data_is_built_into_the_cache_not_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GENAI_JAX_CACHE", str(tmp_path / "cache"))
    (tmp_path / "home").mkdir()
    data = load_images(image_data_config("digits"))
    assert len(data.train) == 1617
    assert (tmp_path / "cache" / "tensorflow_datasets" / "digits").is_dir()
    assert not any((tmp_path / "home").iterdir())


def _write_idx(path, array: np.ndarray):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        d.to_bytes(4, "big") for d in array.shape)
    with (gzip.open if path.suffix == ".gz" else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_folder_one_pair_splits_9_to_1(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (50, 6, 5), np.uint8)
    y = np.arange(50) % 10
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y)
    np.testing.assert_array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), x)
    data = load_images(image_data_config("mnist_idx", path=str(tmp_path)))
    assert (len(data.train), len(data.validation), data.shape) == (45, 5, (6, 5, 1))
    np.testing.assert_array_equal(data.validation.get(np.arange(5))["x"][..., 0], x[45:])
    # train-* and t10k-* pairs are the two splits as they are
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", x[:20])
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y[:20])
    data = load_images(image_data_config("mnist_idx", path=str(tmp_path)))
    assert (len(data.train), len(data.validation)) == (20, 50)
    # a file is memory-mapped, not read whole (a gzipped one decompressed once into the
    # cache), in each process that reads it: a worker receives the file's name, not its rows
    plain = tmp_path / "plain-images-idx3-ubyte"
    _write_idx(plain, x)
    mapped = read_idx(plain)
    assert isinstance(mapped, image_sources.MappedRows) and mapped.path == str(plain)
    np.testing.assert_array_equal(mapped, x)
    unzipped = read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    assert pathlib.Path(unzipped.path).is_relative_to(paths.cache_dir())
    split = data.validation
    assert isinstance(split.x, image_sources.MappedRows)
    assert x[0].tobytes() not in pickle.dumps(split)  # no pixels in what a worker receives
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(split)).get(np.arange(5))["x"],
                                  split.get(np.arange(5))["x"])
    (tmp_path / "cut-images-idx3-ubyte.gz").write_bytes(
        (tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes()[:-20])
    with pytest.raises(DataError, match="cut-images-idx3-ubyte.gz is not a whole gzip file"):
        read_idx(tmp_path / "cut-images-idx3-ubyte.gz")
    plain.write_bytes(plain.read_bytes()[:-7])
    with pytest.raises(DataError, match="declares shape .50, 6, 5. but holds 1493 values"):
        read_idx(plain)


@pytest.mark.skipif(not (SHARED_DATA / "mnist").exists(), reason="no ../shared/data/mnist")
def test_shared_mnist_file_is_9000_train_1000_held_out():
    data = load_images(image_data_config("mnist_idx", path=str(SHARED_DATA / "mnist")))
    assert (len(data.train), len(data.validation), data.shape) == (9000, 1000, (28, 28, 1))


def test_image_folder_labels_by_subfolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(30):
            Image.fromarray(rng.integers(0, 256, (4, 6, 3), np.uint8)).save(
                tmp_path / cls / f"{i}.png")
    data = load_images(image_data_config("image_folder", path=str(tmp_path),
                                         validation_fraction=0.2))
    assert data.shape == (4, 6, 3) and data.num_classes == 2
    assert len(data.train) + len(data.validation) == 60 and 0 < len(data.validation) < 30
    labels = data.train.get(np.arange(len(data.train)))["label"]
    assert set(labels) == {0, 1}


def test_image_files_are_decoded_when_read_and_by_the_data_workers(tmp_path, monkeypatch, env):
    """An image folder is scanned by headers; its pixels are decoded when a batch reads them:
    by the worker processes when there are some (this process's decoder is broken here)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = rng.integers(0, 256, (24, 4, 6, 3), np.uint8)
    for i, picture in enumerate(pictures):
        Image.fromarray(picture).save(tmp_path / f"{i:02d}.png")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"  # a linked image is read too
    (tmp_path / f"{len(pictures) - 1:02d}.png").rename(outside)
    (tmp_path / f"{len(pictures) - 1:02d}.png").symlink_to(outside)
    data = load_images(image_data_config("image_folder", path=str(tmp_path),
                                         validation_fraction=0.2))
    assert len(data.train) + len(data.validation) == len(pictures)
    assert isinstance(data.train, image_sources.ImageFiles)
    names = [int(pathlib.Path(p).stem) for p in data.train.paths]
    np.testing.assert_array_equal(data.train.get(np.arange(3))["x"], pictures[names[:3]])
    batches = image_batches(data.train, 4, seed=0)
    expected = [batches.batch(s)["x"] for s in range(4)]

    def broken(*_):
        raise AssertionError("decoded in the training process")

    monkeypatch.setattr(image_sources, "decode_image", broken)
    got = [b["x"][0] for b in batches.iterator(0, 4, workers=2, prefetch=1)]
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))
    with pytest.raises(AssertionError, match="training process"):
        batches.batch(0)
    monkeypatch.undo()
    from tests.test_cli import cli

    proc = cli("data_bench", "--config=experiments/configs/vae_digits.py",  # images/s
               "--config.data.name=image_folder", f"--config.data.path={tmp_path}",
               "--config.data.validation_fraction=0.2", "--config.eval.batch_size=2",
               "--config.train.batch_size=4", "--steps=30", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["examples_per_s"] > 0
    (tmp_path / f"{names[0]:02d}.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"{names[0]:02d}.png cannot be decoded"):
        data.train[0]


def test_image_folder_errors_are_one_line(tmp_path):
    from PIL import Image

    with pytest.raises(DataError, match="holds no PNG or JPEG images"):
        load_images(image_data_config("image_folder", path=str(tmp_path)))
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="differ in size: b.png"):
        load_images(image_data_config("image_folder", path=str(tmp_path)))


def test_tfds_catalog_by_name_with_mock_data():
    with tfds.testing.mock_data(num_examples=40):
        data = load_images(image_data_config("mnist"))
        assert data.shape == (28, 28, 1) and data.num_classes == 10
        batch = image_batches(data.train, 8, seed=0).batch(3)
        assert batch["x"].shape == (8, 28, 28, 1) and batch["x"].dtype == np.uint8
    with pytest.raises(DataError, match="neither an embedded data set"):
        load_images(image_data_config("no_such_images"))


def test_batches_are_epochs_of_a_seeded_permutation(digits):
    source = digits.train
    a, b = image_batches(source, 100, seed=1), image_batches(source, 100, seed=1)
    np.testing.assert_array_equal(a.batch(7)["x"], b.batch(7)["x"])
    # each epoch is a permutation of the split, a different one each epoch
    index = image_batches(Rows({"i": np.arange(len(source))}), 100, seed=1).examples
    n = len(source)
    first, second = ([int(index[e * n + i]["i"]) for i in range(n)] for e in (0, 1))
    assert sorted(first) == sorted(second) == list(range(n)) and first != second
    halves = [a.batch(7, i, 2)["label"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), a.batch(7)["label"])
    assert len(eval_batches(digits.validation, 64, 0)) == 2  # 180 -> two full batches


def test_toys_and_mode_coverage():
    points, labels, k = toys.generate("ring8", 4000, seed=0)
    assert k == 8 and points.shape == (4000, 2)
    full = toys.mode_coverage(points)
    assert full["modes_covered"] == 8 and full["high_quality_fraction"] > 0.95
    collapsed = toys.mode_coverage(points[labels == 3])
    assert collapsed["modes_covered"] == 1
    spread = toys.mode_coverage(np.random.default_rng(0).normal(0, 2, (4000, 2)))
    assert spread["high_quality_fraction"] < 0.1
    for name in ("moons", "swiss_roll"):
        pts, _, _ = toys.generate(name, 500, seed=0)
        assert pts.shape == (500, 2) and np.abs(pts).max() < 4


def test_frechet_distance_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 3)) @ rng.normal(size=(3, 3))
    b = rng.normal(size=(300, 3)) * [1.0, 2.0, 0.5] + 1.0
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((S_a S_b)^1/2) = sum of sqrt of the eigenvalues of S_a^1/2 S_b S_a^1/2
    w, v = np.linalg.eigh(s_a)
    root_a = v @ np.diag(np.sqrt(w)) @ v.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s_a) + np.trace(s_b)
                - 2 * trace_root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_sample_metrics_tell_real_digits_from_noise(digits):
    evaluator = SampleEvaluator(digits.info)
    held_out = digits.validation.get(np.arange(len(digits.validation)))
    real = evaluator(held_out["x"] / 127.5 - 1.0, held_out["label"])
    noise = evaluator(np.random.default_rng(0).uniform(-1, 1, held_out["x"].shape),
                      held_out["label"])
    assert real["classifier_heldout_accuracy"] > 0.9
    assert real["classifier_accuracy"] == real["classifier_heldout_accuracy"]
    assert real["fid_classifier"] < 1e-6 < real["fid_floor"] < noise["fid_classifier"]
    assert noise["classifier_accuracy"] < 0.3
    assert real["classifier_score"] > 5 > noise["classifier_score"]


def test_fid_floor_is_what_unseen_real_images_score(digits):
    """The floor's images are real, unseen by the classifier, as many as the samples: another
    draw of unseen real images scores about the floor (the two differ by sampling noise only)."""
    seen, pool = split_train(len(digits.train))
    assert (len(seen), len(pool)) == (617, 1000) and not set(seen) & set(pool)
    assert sorted([*seen, *pool]) == list(range(len(digits.train)))
    assert all((a == b).all() for a, b in zip(split_train(1617), (seen, pool), strict=True))
    evaluator = SampleEvaluator(digits.info)
    as_samples = lambda rows: (rows["x"] / 127.5 - 1.0, rows["label"])
    n = 300
    unseen = evaluator(*as_samples(digits.train.get(pool[n:2 * n])))
    seen_by_classifier = evaluator(*as_samples(digits.train.get(seen[:n])))
    # the pool's first n images, whatever is scored (measured: 124.5; unseen 125.9, seen 120.8)
    assert unseen["fid_floor"] == seen_by_classifier["fid_floor"]
    assert unseen["fid_classifier"] == pytest.approx(unseen["fid_floor"], rel=0.1)
    too_many = evaluator(*as_samples(digits.train.get(np.arange(len(pool) + 1))))
    assert "fid_floor" not in too_many and "fid_classifier" in too_many
