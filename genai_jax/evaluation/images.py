"""Sample-based metrics shared by every image family, so families compare on one scale.

Images (a classifier trained by the project on the data set's training split, less the floor's
images; see `genai_jax.evaluation.classifier`):
  - `fid_classifier`: Fréchet distance between Gaussians fitted to the classifier's penultimate
    features (128-d) of generated images and of the held-out images, FID's formula with in-domain
    features instead of Inception's (which cannot be downloaded here, and judge digits poorly);
  - `fid_floor`: the same distance from as many real images as there are samples, which the
    classifier never saw, to the same held-out features: what a perfect generator (fresh draws
    of the data distribution) is expected to get at this sample count, since the Fréchet
    estimate is biased upward for finite samples. Read `fid_classifier` against it.

The three sets of real images are disjoint. The held-out split is the Fréchet reference (and
scores the classifier). The training split is divided once, by a fixed permutation (seed 0, so
every run of a data set shares one cached classifier): `floor_pool_size(n)` images, at most
`FLOOR_IMAGES` (the largest `eval.num_samples` of the configs) and at most two thirds of the
split, are reserved for the floor; the classifier learns from the rest (MNIST's 9,000: 8,000;
the 1,617 training digits: 617, which still score 97-98% on the held-out digits). Floor images
must be unseen because the classifier's features of its own training images are distributed
differently from those of new images (on the digits their distance to the held-out features
was lower, 105 against 118 at 800 images), and a generator's samples are new images. Asked to
score more samples than the pool holds, the evaluator reports no `fid_floor` rather than one at
another sample count.
  - `classifier_accuracy`: for class-conditional samples, how often the classifier recognises the
    asked class;
  - `classifier_score`: the Inception-score analogue exp(E_x KL(p(y|x) || p(y))), from 1 to
    the number of classes (confident and diverse predictions score high);
  - `classifier_heldout_accuracy`: the classifier's own accuracy on the held-out split.
2-D points: `frechet_points` (the same distance on raw coordinates against held-out points) and,
on "ring8", `modes_covered` / `high_quality_fraction` (`genai_jax.data.toys.mode_coverage`).
"""

from __future__ import annotations

import functools
import warnings

import jax
import numpy as np
import scipy.linalg
from absl import logging

from genai_jax.data import toys
from genai_jax.data.pixels import to_uint8
from genai_jax.evaluation import classifier as classifier_lib

FLOOR_IMAGES = 1000


def floor_pool_size(num_train: int) -> int:
    """Training images reserved for `fid_floor` (never shown to the classifier)."""
    return min(FLOOR_IMAGES, num_train * 2 // 3)


def split_train(num_train: int) -> tuple[np.ndarray, np.ndarray]:
    """(classifier's indices, floor pool's indices) of the training split, disjoint, fixed."""
    order = np.random.default_rng(0).permutation(num_train)
    reserved = floor_pool_size(num_train)
    return np.sort(order[reserved:]), order[:reserved]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to rows of a, b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():  # singular products (few samples) are fine here
        warnings.simplefilter("ignore")
        root = scipy.linalg.sqrtm(s_a @ s_b).real  # numerical noise: tiny imaginary parts
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2.0 * root))


class SampleEvaluator:
    """`evaluator(x, labels) -> metrics` for generated `x` in model range ([-1, 1] images, raw
    points) and, for conditional samples, the asked `labels` (else None)."""

    def __init__(self, data_info: dict, *, seed: int = 0, max_reference: int = 10_000):
        self.data = data_info["data"]
        self.seed = seed
        self.max_reference = max_reference

    @functools.cached_property
    def _reference(self) -> dict:
        """Held-out examples, at most `max_reference` of them."""
        rng = np.random.default_rng(self.seed)
        source = self.data.validation
        n = min(len(source), self.max_reference)
        return source.get(np.sort(rng.choice(len(source), n, replace=False)))

    @functools.cached_property
    def _train_split(self) -> tuple[np.ndarray, np.ndarray]:
        return split_train(len(self.data.train))

    @functools.cached_property
    def _classifier(self):
        seen = self.data.train.get(self._train_split[0])
        model = classifier_lib.load_or_train(seen["x"], seen["label"], self.data.num_classes)
        return model, jax.jit(lambda x: model.features(x)), jax.jit(lambda f: model.out(f))

    def _features_and_probs(self, x_uint8: np.ndarray, batch: int = 500):
        _, features, head = self._classifier
        feats = np.concatenate([np.asarray(features(x_uint8[i:i + batch]))
                                for i in range(0, len(x_uint8), batch)])
        probs = np.asarray(jax.nn.softmax(head(feats), axis=-1))
        return feats, probs

    @functools.cached_property
    def _real(self) -> dict:
        ref = self._reference
        val_f, val_p = self._features_and_probs(ref["x"])
        floor_f, _ = self._features_and_probs(self.data.train.get(self._train_split[1])["x"])
        return {"features": val_f, "floor_features": floor_f, "heldout_accuracy":
                float((val_p.argmax(-1) == ref["label"]).mean())}

    def __call__(self, x: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
        if self.data.kind == "points":
            return self._points(np.asarray(x))
        if not self.data.num_classes:
            return {}  # no labels, no classifier: nothing in-domain to score with
        feats, probs = self._features_and_probs(to_uint8(x))
        real = self._real
        marginal = probs.mean(0, keepdims=True)
        kl = np.sum(probs * (np.log(probs + 1e-12) - np.log(marginal + 1e-12)), axis=-1)
        metrics = {
            "fid_classifier": frechet_distance(feats, real["features"]),
            "classifier_score": float(np.exp(kl.mean())),
            "classifier_heldout_accuracy": real["heldout_accuracy"],
        }
        pool = real["floor_features"]
        if len(x) <= len(pool):
            metrics["fid_floor"] = frechet_distance(pool[:len(x)], real["features"])
        else:
            logging.warning("no eval/fid_floor: %d samples, and only %d training images are "
                            "reserved unseen by the classifier", len(x), len(pool))
        if labels is not None:
            metrics["classifier_accuracy"] = float((probs.argmax(-1) == labels).mean())
        return metrics

    def _points(self, x: np.ndarray) -> dict[str, float]:
        metrics = {"frechet_points": frechet_distance(x, self._reference["x"])}
        if self.data.name == "ring8":
            metrics.update(toys.mode_coverage(x))
        return metrics
