"""Run an exported image sampler (`genai_jax.serving.export_images`) without the model code.

    generator = ImageGenerator.load("export_dir")
    images = generator.generate([generator.label_index("3")] * 4, seed=0)  # uint8 [4, H, W, C]
    png_bytes = generator.png(images[0])

This module imports jax, numpy, PIL and `genai_jax.serving.artifacts` only: no flax, no
`genai_jax.models` or `genai_jax.nn`. The images equal `experiments.sample`'s for the same seed
and labels (`--seed`, `--label`) up to float rounding in a differently fused program (see
tests/test_serving_images.py).
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Iterable, Mapping, Sequence

import jax
import numpy as np
from PIL import Image

from genai_jax.serving import artifacts

FUNCTION = artifacts.IMAGE_FUNCTION


class ImageGenerator:
    """An export's `generate`, compiled once per batch size, with its weights on the device.

    Attributes from the manifest's `image` section: `kind` ("image" | "points"), `shape` (of one
    example), `num_classes`, `conditional`, `label_names` (or None) and `sampler` (its compiled-in
    settings).
    """

    def __init__(self, directory: str | pathlib.Path, manifest: Mapping):
        directory = pathlib.Path(directory)
        if "image" not in manifest or FUNCTION not in manifest.get("functions", {}):
            raise artifacts.ExportError(f"{directory} is not an image family's export (its "
                                        f"manifest has no 'image' section or '{FUNCTION}')")
        image = manifest["image"]
        self.directory, self.manifest = directory, dict(manifest)
        self.kind, self.shape = image["kind"], tuple(image["shape"])
        self.num_classes, self.conditional = image["num_classes"], image["conditional"]
        self.label_names = image.get("label_names")
        self.sampler = image.get("sampler", {})
        exported = artifacts.load_function(directory, manifest["functions"][FUNCTION])
        here = artifacts.platform()
        if here not in exported.platforms:
            raise artifacts.ExportError(
                f"{directory} was exported for {list(exported.platforms)}, not for this "
                f"process's {here!r}: export again with --platforms={here}")
        self._weights = jax.device_put(artifacts.load_weights(directory))
        self._generate = jax.jit(exported.call)

    @classmethod
    def load(cls, directory: str | pathlib.Path) -> ImageGenerator:
        return cls(directory, artifacts.read_manifest(directory))

    def label_index(self, prompt: str) -> int:
        """The class a prompt names: its index ("3") or its label name ("cat"); 0 for an
        unconditional model, which ignores labels."""
        if not self.conditional:
            return 0
        text = str(prompt).strip()
        names = self.label_names or []
        if text in names:
            return names.index(text)
        if text.lstrip("-").isdigit():
            index = int(text)
            if 0 <= index < self.num_classes:
                return index
            raise ValueError(f"class {index} is out of range: this model draws classes "
                             f"0..{self.num_classes - 1}")
        known = f"one of {names}" if names else f"a class index 0..{self.num_classes - 1}"
        raise ValueError(f"unknown label {text!r}: the prompt must be {known}")

    def generate(self, labels: Sequence[int], seed: int) -> np.ndarray:
        """`len(labels)` samples from `jax.random.PRNGKey(seed)`: uint8 `[n, H, W, C]` images
        (float32 `[n, dim]` for points). Unconditional models ignore the labels."""
        labels = np.asarray(labels, np.int32).reshape(-1)
        if labels.size == 0:
            raise ValueError("generate needs at least one label (one per sample)")
        if not self.conditional:
            labels = np.zeros_like(labels)
        elif labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"labels {labels.tolist()} out of range 0..{self.num_classes - 1}")
        key = jax.random.PRNGKey(seed)
        return np.asarray(self._generate(self._weights, key, labels))

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Compile (and run once) for each batch size, so that requests of those sizes do not
        wait for the compiler."""
        for n in batch_sizes:
            self.generate([0] * int(n), seed=0)

    def png(self, image: np.ndarray) -> bytes:
        """One generated uint8 `[H, W, C]` image (C = 1 or 3) as PNG bytes."""
        if self.kind != "image":
            raise ValueError("this export generates 2-D points, not images")
        image = np.asarray(image, np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "PNG")
        return buffer.getvalue()


__all__ = ["ImageGenerator"]
