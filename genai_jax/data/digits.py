"""TFDS builder for the embedded default image data set: scikit-learn's bundled 8x8 digits
(`data.name="digits"`, read by `genai_jax.data.image_sources.digits`). Its own module so that
reading images (the data workers) does not import TFDS."""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds


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
