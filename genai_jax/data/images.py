"""Image (and 2-D point) data sets and their batches: `{"x", "label"}` by (seed, step).

A batch is `{"x": uint8 [batch, H, W, C] | float32 [batch, 2], "label": int32 [batch]}`:
pixels stay uint8 until the model scales them (`genai_jax.models.images.to_model`), so
every family documents its own pixel range. Evaluation batches also carry `"index": int32
[batch]`, each example's position in the held-out split, so that a family can give every
held-out example random draws of its own (the VAE's binarisation and latent noise), the same
however the split is batched. Sources: `genai_jax.data.image_sources`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from genai_jax.data import image_sources, toys
from genai_jax.data.loader import Batches, epochs
from genai_jax.errors import DataError


@dataclasses.dataclass(frozen=True)
class ImageData:
    """The two splits of an image data set and what a model needs to know about them."""

    train: image_sources.ArraySource | image_sources.TfdsSource
    validation: image_sources.ArraySource | image_sources.TfdsSource
    kind: str  # "image" or "points"
    shape: tuple[int, ...]  # of one example: (H, W, C) or (2,)
    num_classes: int  # 0: unlabelled
    name: str  # data.name
    description: str  # e.g. "data set 'mnist_idx' at ../shared/data/mnist", for messages
    label_names: tuple[str, ...] | None = None  # the classes' names by index, where known

    @property
    def info(self) -> dict:
        return {"kind": self.kind, "shape": self.shape, "num_classes": self.num_classes,
                "label_names": self.label_names, "data": self}


def load_images(data_cfg, seed: int = 0) -> ImageData:
    """The train and held-out splits named by `data_cfg` (see `image_sources`)."""
    name = data_cfg.name
    if name in toys.TOYS:
        x, label, num_classes = toys.generate(name, data_cfg.num_points, seed)
        n_val = max(1, int(len(x) * data_cfg.validation_fraction))
        vx, vlabel, _ = toys.generate(name, n_val, seed + 1)
        train, validation = image_sources.ArraySource(x, label), image_sources.ArraySource(
            vx, vlabel)
        return ImageData(train, validation, "points", (2,), num_classes, name, f"toy {name!r}")
    loader = {"digits": image_sources.digits, "mnist_idx": image_sources.mnist_idx,
              "image_folder": image_sources.image_folder,
              "array_record": image_sources.array_record}.get(name, image_sources.tfds_catalog)
    train, validation, names = loader(data_cfg)
    first = train.get(np.arange(1))["x"]
    if first.ndim != 4:
        raise DataError(f"data set {name!r} holds arrays of shape {first.shape[1:]}, not "
                        "images [height, width, channels]")
    where = f"data set {name!r}" + (f" at {data_cfg.path}" if data_cfg.path else "")
    return ImageData(train, validation, "image", tuple(first.shape[1:]), len(names), name,
                     where, names or None)


def image_batches(source, batch_size: int, seed: int, augment: Augment | None = None
                  ) -> Batches:
    """Batches of `source` epoch by epoch, each epoch in a fresh seeded order (Grain's global
    shuffle), so every example is seen once per epoch and a batch is a pure function of
    (seed, step); `augment`ed per example with Grain's generator for (seed, index) (in the data
    workers when there are some)."""
    examples = epochs(source, seed)
    if augment is not None:
        examples = examples.seed(seed + 3).random_map(augment)
    return Batches(examples, batch_size)


@dataclasses.dataclass(frozen=True)
class Augment:
    """Opt-in training augmentation: a random crop of the image padded by `crop_padding`
    pixels of zeros on each side (`data.random_crop`), and a horizontal flip half the time
    (`data.random_flip`; off by default: it is wrong for digits and text)."""

    crop_padding: int = 0
    flip: bool = False

    def __call__(self, example: dict, rng: np.random.Generator) -> dict:
        x = example["x"]
        if self.crop_padding:
            pad, (h, w) = self.crop_padding, x.shape[:2]
            padded = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
            i, j = rng.integers(0, 2 * pad + 1, 2)
            x = padded[i:i + h, j:j + w]
        if self.flip and rng.random() < 0.5:
            x = x[:, ::-1]
        return {**example, "x": np.ascontiguousarray(x)}


def eval_batches(source, batch_size: int, max_batches: int) -> list[dict]:
    """Consecutive full batches from the start of the held-out split (at most `max_batches`;
    0 = all), with each example's `index` in it; the tail that does not fill a batch is left
    out."""
    n_batches = len(source) // batch_size
    if max_batches:
        n_batches = min(n_batches, max_batches)
    if n_batches == 0:
        raise DataError(f"the held-out split ({len(source)} examples) is smaller than one "
                        f"evaluation batch of {batch_size}: lower eval.batch_size")
    return [{**source.get(rows), "index": rows.astype(np.int32)}
            for rows in (np.arange(i * batch_size, (i + 1) * batch_size)
                         for i in range(n_batches))]
