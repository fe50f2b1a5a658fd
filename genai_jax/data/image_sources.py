"""Where image data comes from: each source is read by index into `{"x", "label"}` arrays.

`config.data.name`:
  - "digits": the embedded default, scikit-learn's bundled 8x8 digits (1,797 images, 10
    classes), built once into a TFDS data dir by `Digits` and read back as an array_record data
    source; every 10th image is the test split. Pixels 0..16 are rescaled to 0..255.
  - "mnist_idx": MNIST-format IDX files in the folder `data.path` (`*-images-idx3-ubyte[.gz]`
    with `*-labels-idx1-ubyte[.gz]`). With `train-*` and `t10k-*` files those are the splits;
    with one pair, its first `1 - validation_fraction` images train and the rest are held out
    (MNIST's 10k test file: 9,000 / 1,000).
    Memory-mapped (`MappedRows`) by each process that reads them; a gzipped
    file is decompressed once into the cache.
  - "image_folder": PNG/JPEG files under `data.path`, all of one size; images in class
    subfolders are labelled by the sorted subfolder names. An image is held out when a hash of
    its relative path falls in the last `validation_fraction` of the buckets.
  - "array_record": the image records `experiments.prepare_data` wrote to the folder
    `data.path` (from image files or MNIST IDX), read by Grain as batches need them.
  - "ring8", "moons", "swiss_roll": generated 2-D toy distributions (`genai_jax.data.toys`).
  - any other name: a TFDS catalog image data set (mnist, fashion_mnist, cifar10, celeb_a, ...)
    read with `tfds.data_source`, features `data.image_key` and `data.label_key`.

A loader returns `(train, validation, label_names)`: the classes' names by index (the digits'
"0".."9", the class folders, the TFDS `ClassLabel` names), empty for unlabelled data.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from genai_jax import paths
from genai_jax.data import shards
from genai_jax.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DIGIT_NAMES = tuple(str(i) for i in range(10))


@dataclasses.dataclass(frozen=True)
class ArraySource:
    """An in-memory split: `x` uint8 `[n, H, W, C]` (or float32 `[n, dim]`), `label` int32."""

    x: np.ndarray
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def get(self, indices: np.ndarray) -> dict:
        return {"x": self.x[indices], "label": self.label[indices]}

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "label": self.label[index]}


class TfdsSource:
    """A TFDS data source split read lazily by index (for catalog sets too big to hold)."""

    def __init__(self, source, image_key: str, label_key: str | None):
        self._source, self._image_key, self._label_key = source, image_key, label_key

    def __len__(self) -> int:
        return len(self._source)

    def get(self, indices: np.ndarray) -> dict:
        return stacked(self, indices)

    def __getitem__(self, index: int) -> dict:
        row = self._source[index]
        return {"x": np.asarray(row[self._image_key], np.uint8),
                "label": np.int32(row[self._label_key] if self._label_key else 0)}


class Digits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's bundled 8x8 handwritten digits as uint8 images; every 10th is test."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10)}),
            supervised_keys=("image", "label"), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the images ship with scikit-learn
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        index = np.arange(len(images))
        return {"train": self._generate_examples(images, digits.target, index[index % 10 != 0]),
                "test": self._generate_examples(images, digits.target, index[index % 10 == 0])}

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}


def digits(data_cfg) -> tuple[ArraySource, ArraySource, tuple[str, ...]]:
    builder = Digits(data_dir=paths.embedded_data_dir(data_cfg), file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare()
    splits = []
    for split in ("train", "test"):
        source = TfdsSource(builder.as_data_source(split=split), "image", "label")
        splits.append(ArraySource(**source.get(np.arange(len(source)))))
    return splits[0], splits[1], DIGIT_NAMES


def _data_dir(data_cfg) -> str | None:
    return os.path.expanduser(data_cfg.data_dir) if data_cfg.data_dir else None


def read_idx(path: pathlib.Path) -> MappedRows:
    """An IDX file's array of its declared shape, memory-mapped (read as rows are used, never
    held whole); a gzipped file is decompressed once into the cache and mapped there."""
    source = path
    if path.suffix == ".gz":
        path = _gunzipped(path)
    with open(path, "rb") as f:
        raw = f.read(4 + 4 * 255)  # the header: at most 255 dimensions
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(f"{source} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    header, size = 4 + 4 * ndim, int(np.prod(shape))
    held = path.stat().st_size - header
    if held != size:
        raise DataError(f"{source} declares shape {shape} but holds {held} values")
    return MappedRows(str(path), header, shape)


def _gunzipped(path: pathlib.Path) -> pathlib.Path:
    """The decompressed copy of the gzipped file `path` in the cache (made on first use)."""
    import shutil

    from genai_jax.data import cache

    def write(out: pathlib.Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f"{path.stem}.tmp"
        try:
            with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (OSError, EOFError) as e:
            raise DataError(f"{path} is not a whole gzip file ({e})") from None
        tmp.rename(out / path.stem)
        shards.write_json(out / shards.INDEX, {"format": shards.FORMAT, "kind": "gunzipped",
                                                "source": str(path.resolve())})

    return cache.prepared({"gunzip": cache.file_identity(path)}, None, write) / path.stem


class MappedRows:
    """Rows `[start, stop)` of an uncompressed IDX file's uint8 array, memory-mapped by each
    process that reads them (a data worker maps the file again rather than receiving a copy):
    `rows[i]` / `rows[indices]` -> numpy, `rows[a:b]` -> MappedRows; `channel` appends an axis
    of 1 (grey images `[H, W]` -> `[H, W, 1]`)."""

    def __init__(self, path: str, offset: int, shape: tuple, start: int = 0,
                 stop: int | None = None, channel: bool = False):
        self.path, self.offset, self.whole = path, offset, tuple(shape)
        self.start, self.stop = start, self.whole[0] if stop is None else stop
        self.channel, self._map = channel, None

    def __getstate__(self):
        return {**self.__dict__, "_map": None}

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple:
        return (len(self), *self.whole[1:], *((1,) if self.channel else ()))

    def with_channel(self) -> MappedRows:
        return MappedRows(self.path, self.offset, self.whole, self.start, self.stop, True)

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise ValueError("mapped rows are sliced contiguously")
            return MappedRows(self.path, self.offset, self.whole, self.start + start,
                              self.start + max(stop, start), self.channel)
        if self._map is None:
            self._map = np.memmap(self.path, np.uint8, mode="r", offset=self.offset,
                                  shape=self.whole)
        rows = np.array(self._map[self.start:self.stop][index])
        return rows[..., None] if self.channel else rows

    def __array__(self, dtype=None, copy=None):
        """Every row (small arrays: labels; tests)."""
        rows = self[np.arange(len(self))]
        return rows if dtype is None else rows.astype(dtype)


def mnist_idx(data_cfg) -> tuple[ArraySource, ArraySource, tuple[str, ...]]:
    folder = _folder(data_cfg, "mnist_idx")
    pairs = {}
    for images in sorted(folder.glob("*-images-idx3-ubyte*")):
        prefix = images.name.split("-images-")[0]
        labels = [p for p in folder.glob(f"{prefix}-labels-idx1-ubyte*")]
        if not labels:
            raise DataError(f"{images} has no matching {prefix}-labels-idx1-ubyte file")
        x, y = read_idx(images), read_idx(labels[0])
        if len(x) != len(y):
            raise DataError(f"{images.name} has {len(x)} images but {labels[0].name} has "
                            f"{len(y)} labels")
        pairs[prefix] = ArraySource(x.with_channel(), np.asarray(y, np.int32))
    if not pairs:
        raise DataError(f"data.path {str(folder)!r} holds no *-images-idx3-ubyte[.gz] files")
    if "train" in pairs and "t10k" in pairs:
        return pairs["train"], pairs["t10k"], DIGIT_NAMES
    if len(pairs) > 1:
        raise DataError(f"data.path {str(folder)!r} holds IDX files {sorted(pairs)}: expected "
                        "train-* and t10k-*, or one pair to split")
    (whole,) = pairs.values()
    n = int(round(len(whole) * (1 - data_cfg.validation_fraction)))
    return (ArraySource(whole.x[:n], whole.label[:n]), ArraySource(whole.x[n:], whole.label[n:]),
            DIGIT_NAMES)


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """A split of image files, decoded when read (in the data workers when there are some):
    `x` uint8 `[H, W, C]` in PIL `mode` ("L" or "RGB"), `label` int32 (known without decoding)."""

    paths: tuple[str, ...]
    label: np.ndarray
    mode: str

    def __len__(self) -> int:
        return len(self.paths)

    def get(self, indices: np.ndarray) -> dict:
        return stacked(self, indices)

    def __getitem__(self, index: int) -> dict:
        return {"x": decode_image(self.paths[index], self.mode), "label": self.label[index]}


def stacked(source, indices) -> dict:
    """`{"x", "label"}` of examples `indices` of a source read one by one, stacked."""
    rows = [source[int(i)] for i in indices]
    return {k: np.stack([r[k] for r in rows]) for k in ("x", "label")}


def decode_image(file, mode: str, where: str = "") -> np.ndarray:
    """uint8 `[H, W, C]` pixels of a PNG/JPEG (a path, or its bytes: `where` names them in an
    error) in PIL `mode`."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(file) if isinstance(file, bytes) else file) as image:
            pixels = np.asarray(image.convert(mode), np.uint8)
    except OSError as e:  # PIL's error for a cut or foreign file
        raise DataError(f"{where or file} cannot be decoded ({e})") from None
    return pixels.reshape(*pixels.shape[:2], -1)


@dataclasses.dataclass(frozen=True)
class ImageFolderScan:
    """Image files found under `root`, read by their headers only: each split's files and
    labels, the example shape and the PIL mode they decode to, the class names."""

    splits: dict[str, tuple[list[str], np.ndarray]]
    shape: tuple[int, int, int]
    mode: str
    classes: tuple[str, ...]


def scan_image_files(files: list[pathlib.Path], root: pathlib.Path, validation_fraction: float,
                     where: str) -> ImageFolderScan:
    """Classes are the sorted folders of `files` under `root` (none: unlabelled); all images
    must have one size; an image is held out when a hash of its path under `root` falls in the
    last `validation_fraction` of the buckets. `where` names the files in messages."""
    from PIL import Image

    # Paths as given, not resolved: a symlinked image belongs where its link is.
    relative = [pathlib.PurePath(os.path.relpath(os.path.abspath(f), os.path.abspath(root)))
                .as_posix() for f in files]
    folders = [r.rpartition("/")[0] for r in relative]
    classes = sorted(set(folders) - {""})
    if classes and "" in folders:
        raise DataError(f"{where} mixes images in class subfolders with images at its top "
                        "level: put every image in a class folder, or none")
    sizes, modes = [], set()
    for f in files:
        try:
            with Image.open(f) as image:  # reads the header only
                sizes.append(image.size)
                modes.add(image.mode)
        except OSError as e:
            raise DataError(f"{f} is not an image PIL can read ({e})") from None
        if sizes[-1] != sizes[0]:
            raise DataError(f"images in {where} differ in size: {f.name} is "
                            f"{sizes[-1][::-1]}, {files[0].name} is {sizes[0][::-1]}")
    mode = "L" if modes <= {"L", "1", "I;16"} else "RGB"
    label = np.array([classes.index(d) if classes else 0 for d in folders], np.int32)
    held_out = np.array([_bucket(r) < validation_fraction for r in relative])
    if held_out.all() or not held_out.any():
        raise DataError(f"{where} has too few images ({len(files)}) to hold out "
                        f"validation_fraction={validation_fraction}")
    splits = {split: ([str(f) for f, h in zip(files, held_out, strict=True) if h == held],
                      label[held_out == held])
              for split, held in (("train", False), ("validation", True))}
    width, height = sizes[0]
    return ImageFolderScan(splits, (height, width, 1 if mode == "L" else 3), mode,
                           tuple(classes))


def image_folder(data_cfg) -> tuple[ImageFiles, ImageFiles, tuple[str, ...]]:
    folder = _folder(data_cfg, "image_folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"data.path {str(folder)!r} holds no PNG or JPEG images")
    scan = scan_image_files(files, folder, data_cfg.validation_fraction,
                            f"data.path {str(folder)!r}")
    train, validation = (ImageFiles(tuple(paths), labels, scan.mode)
                         for paths, labels in scan.splits.values())
    return train, validation, scan.classes


def _bucket(name: str) -> float:
    """A stable pseudo-random number in [0, 1) for a file name."""
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 10_000 / 10_000


def _folder(data_cfg, name: str) -> pathlib.Path:
    if not data_cfg.path:
        raise DataError(f"data.name={name!r} needs data.path: pass --config.data.path=FOLDER")
    folder = pathlib.Path(data_cfg.path).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.path {data_cfg.path!r} is not a folder")
    return folder


class ImageRecords(shards.Records):
    """The images of one split of a prepared image directory: `records[i]` ->
    `{"x": uint8 [H, W, C], "label": int32}` (a record is the label as 4 little-endian bytes,
    then the image: its pixels, or with `"encoding": "file"` in the index its PNG/JPEG file,
    decoded here, i.e. in the data workers); `get(indices)` stacks them."""

    def __init__(self, directory: str | pathlib.Path, index: dict, split: str):
        super().__init__(directory, index, split)
        self.shape = tuple(index["shape"])
        self.mode = index.get("mode", "L")
        self.encoded = index.get("encoding", "pixels") == "file"

    def __getitem__(self, index: int) -> dict:
        raw = self._raw(index)
        if self.encoded:
            pixels = decode_image(raw[4:], self.mode,
                                  f"image record {index} of {self.directory}")
        else:
            pixels = np.frombuffer(raw, np.uint8, offset=4)
        if pixels.size != int(np.prod(self.shape)):
            raise DataError(f"a record of {self.directory} holds {pixels.size} pixel values, "
                            f"not an image of {self.shape}: prepare the data again")
        return {"x": pixels.reshape(self.shape), "label": _record_label(raw)}

    def get(self, indices) -> dict:
        return stacked(self, indices)

    @functools.cached_property
    def label(self) -> np.ndarray:
        """Every record's label, read without decoding an image (federated `label_skew`)."""
        return np.array([_record_label(self._raw(i)) for i in range(len(self))], np.int32)


def _record_label(raw: bytes) -> np.int32:
    return np.frombuffer(raw, "<i4", count=1)[0].astype(np.int32)


def array_record(data_cfg) -> tuple:
    """The image records `experiments.prepare_data` wrote to `data.path`, read as needed."""
    directory = _folder(data_cfg, "array_record")
    index = shards.read_index(directory)
    if index["kind"] != "image":
        raise DataError(f"{directory} holds {index['kind']} data, not images")
    splits = [ImageRecords(directory, index, s) for s in shards.SPLITS]
    for split in splits:
        split.check()
    return splits[0], splits[1], tuple(index["label_names"])


def tfds_catalog(data_cfg) -> tuple[TfdsSource, TfdsSource, tuple[str, ...]]:
    name, data_dir = data_cfg.name, _data_dir(data_cfg)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"data.name={name!r} is neither an embedded data set ('digits', 'ring8', "
                        "'moons', 'swiss_roll'), 'mnist_idx', 'image_folder', nor a TFDS catalog "
                        "data set") from None
    features = builder.info.features
    if data_cfg.image_key not in features:
        raise DataError(f"data set {name!r} has no feature {data_cfg.image_key!r}; it has "
                        f"{sorted(features)} (set data.image_key)")
    label_key = data_cfg.label_key if data_cfg.label_key in features else None
    names = tuple(features[label_key].names) if label_key else ()
    splits = []
    for split in (data_cfg.train_split, data_cfg.eval_split):
        known = builder.info.splits
        if known and split not in known:
            raise DataError(f"data set {name!r} has no split {split!r}; it has {sorted(known)} "
                            "(set data.train_split / data.eval_split)")
        try:
            source = tfds.data_source(name, split=split, data_dir=data_dir)
        except OSError as e:
            raise DataError(f"could not download data set {name!r} ({type(e).__name__}): "
                            "prepare it once on a machine online and point data.data_dir at "
                            "it") from None
        if len(source) == 0:
            raise DataError(f"the {split} split of data set {name!r} is empty")
        splits.append(TfdsSource(source, data_cfg.image_key, label_key))
    return splits[0], splits[1], names
