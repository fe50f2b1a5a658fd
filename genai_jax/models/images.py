"""What the image families (VAE, GAN, diffusion) share: pixel scaling, pictures, and the
`Family` glue around a family's `generate` function.

Data contract (`genai_jax.data.images`): a batch is `{"x": ..., "label": int32 [batch]}` where
`x` is `uint8 [batch, height, width, channels]` for images and `float32 [batch, dim]` for the
2-D toy distributions; `data_info` has `kind` ("image" | "points"), `shape` (of one example),
`num_classes` (0 when the data has no labels), `label_names` (the classes' names by index, or
None) and `data` (the `ImageData`, for evaluation).

Pixel scaling (`to_model`, `to_uint8`, `binarize`) is `genai_jax.data.pixels`'s, re-exported here
so that a family reads `images.to_model(x)`.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from genai_jax import parallel
from genai_jax.config_checks import ConfigError
from genai_jax.data.pixels import binarize, to_model, to_uint8  # noqa: F401 (re-exported)
from genai_jax.evaluation.images import SampleEvaluator
from genai_jax.models.family import Family

# (params, rng, labels int32 [n]) -> generated x in model range: [n, H, W, C] or [n, dim]
Generate = Callable[[object, jax.Array, jax.Array], jax.Array]
# (params, rng, directory, step) -> {name: path} of extra pictures it wrote
Extras = Callable[[object, jax.Array, pathlib.Path, int], dict[str, str]]


def check_conditional(config, data_info: dict) -> None:
    """A conditional model needs labelled data."""
    if config.model.conditional and not data_info["num_classes"]:
        raise ConfigError(f"model.conditional=True needs class labels, and data.name="
                          f"{config.data.name!r} has none: set --config.model.conditional=False "
                          "or use labelled data")


def grid(images: np.ndarray, nrow: int, pad: int = 1) -> np.ndarray:
    """uint8 `[n, H, W, C]` tiled into one `[rows*(H+pad)+pad, nrow*(W+pad)+pad, C]` picture,
    row-major, on a white background; small images are enlarged (nearest) to be visible."""
    n, h, w, c = images.shape
    zoom = max(1, 32 // max(h, w))
    if zoom > 1:
        images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
        h, w = h * zoom, w * zoom
    rows = -(-n // nrow)
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, nrow)
        out[pad + r * (h + pad):pad + r * (h + pad) + h,
            pad + q * (w + pad):pad + q * (w + pad) + w] = img
    return out


def save_png(picture: np.ndarray, path: str | pathlib.Path) -> str:
    """Write a uint8 `[H, W, C]` (C = 1 or 3) picture as PNG; returns the path. Only process 0
    writes (every process computes the pictures: they may need all processes' devices)."""
    from PIL import Image

    path = pathlib.Path(path)
    if jax.process_index() != 0:
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(path)
    return str(path)


def scatter(points: np.ndarray, size: int = 256, extent: float | None = None) -> np.ndarray:
    """2-D points drawn as a uint8 `[size, size, 1]` density picture (dark = many points)."""
    points = np.asarray(points, np.float32)[:, :2]
    extent = extent or float(np.percentile(np.abs(points), 99.5)) * 1.1 + 1e-6
    counts, _, _ = np.histogram2d(points[:, 1], points[:, 0], bins=size,
                                  range=[[-extent, extent], [-extent, extent]])
    density = np.log1p(counts[::-1]) / max(np.log1p(counts.max()), 1e-6)
    return (255 * (1.0 - density))[..., None].astype(np.uint8)


def picture(x: np.ndarray, kind: str, nrow: int) -> np.ndarray:
    """Generated `x` (model range) as one picture: an image grid, or a scatter of points."""
    return grid(to_uint8(x), nrow) if kind == "image" else scatter(x)


def default_labels(n: int, num_classes: int) -> np.ndarray:
    """Class `i % num_classes` for sample i (each grid column one class), zeros without labels."""
    return (np.arange(n) % num_classes if num_classes else np.zeros(n)).astype(np.int32)


def make_family(config, data_info: dict, *, init, train_step, eval_step, generate: Generate,
                export_params=lambda state: state.eval_params, summarize_eval=None,
                extras: Extras | None = None) -> Family:
    """The `Family` of an image model from its pure parts.

    `generate(params, rng, labels)` makes `len(labels)` samples in model range from
    `params = export_params(state)` (jit-compiled here, once per sample count; the same function
    `genai_jax.serving.export_images` exports); `sample` cycles given labels to `num_samples`
    when both are given. Sampling, the PNG files and the sample-based evaluation metrics
    (`genai_jax.evaluation.images`) are the same for every image family and live here.
    `extras(params, ...)` writes family-specific pictures at every evaluation and by
    `experiments.sample`.
    """
    kind, num_classes = data_info["kind"], data_info["num_classes"]
    generate_jit = jax.jit(generate)
    nrow = num_classes or 10

    def sample(state, rng: jax.Array, num_samples: int | None = None,
               labels=None, **_) -> dict:
        n = num_samples or config.sample.num_samples
        if labels is None:
            labels = default_labels(n, num_classes)
        elif num_samples:  # the given classes, cycled to `num_samples` images
            labels = np.resize(np.asarray(labels), num_samples)
        labels = np.asarray(labels, np.int32)
        params = export_params(state)
        return {"x": parallel.fetch(generate_jit(params, rng, jnp.asarray(labels))),
                "label": labels, "params": params, "rng": rng}

    def save_samples(outputs: dict, directory: str, step: int) -> str:
        directory = pathlib.Path(directory)
        paths = {"samples": save_png(picture(outputs["x"], kind, nrow),
                                     directory / f"step_{step:08d}.png")}
        if extras is not None:
            paths.update(extras(outputs["params"], outputs["rng"], directory, step))
        return "\n".join(f"{name}: {path}" for name, path in paths.items())

    evaluator = functools.cache(lambda: SampleEvaluator(data_info, seed=config.seed))

    def sample_eval(state, rng: jax.Array, directory: str, step: int) -> dict[str, float]:
        outputs = sample(state, rng, num_samples=config.eval.num_samples)
        save_samples({**outputs, "x": outputs["x"][:config.sample.num_samples]}, directory, step)
        return evaluator()(outputs["x"], outputs["label"] if config.model.conditional else None)

    return Family(init=init, train_step=train_step, eval_step=eval_step, sample=sample,
                  save_samples=save_samples, summarize_eval=summarize_eval or (lambda m: m),
                  sample_eval=sample_eval if config.eval.num_samples else None,
                  export_params=export_params, generate=generate,
                  tokens_per_example=1, throughput_unit="examples")
