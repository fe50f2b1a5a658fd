"""Generated 2-D toy distributions for fast sanity checks of GANs (mode coverage) and diffusion.

  - "ring8": 8 Gaussians (std 0.02) evenly spaced on a circle of radius 2, labelled by mode;
  - "moons": scikit-learn's two interleaving half circles (noise 0.05), labelled by moon,
    centred and scaled to about [-2, 2];
  - "swiss_roll": scikit-learn's Swiss roll seen from above (x, z), noise 0.25, scaled to
    about [-2, 2], unlabelled.
Points are float32 `[n, 2]`; a split is a pure function of (name, n, seed).
"""

from __future__ import annotations

import numpy as np

TOYS = ("ring8", "moons", "swiss_roll")
RING_MODES, RING_RADIUS, RING_STD = 8, 2.0, 0.02


def ring_centers() -> np.ndarray:
    angles = 2 * np.pi * np.arange(RING_MODES) / RING_MODES
    return RING_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def generate(name: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """`(points float32 [n, 2], labels int32 [n], num_classes)` of toy `name`."""
    from sklearn import datasets

    rng = np.random.default_rng(seed)
    if name == "ring8":
        labels = rng.integers(0, RING_MODES, n)
        points = ring_centers()[labels] + RING_STD * rng.standard_normal((n, 2))
        num_classes = RING_MODES
    elif name == "moons":
        points, labels = datasets.make_moons(n, noise=0.05, random_state=seed)
        points = (points - [0.5, 0.25]) * 1.6
        num_classes = 2
    elif name == "swiss_roll":
        xyz, _ = datasets.make_swiss_roll(n, noise=0.25, random_state=seed)
        points, labels, num_classes = xyz[:, [0, 2]] / 6.0, np.zeros(n), 0
    else:
        raise ValueError(f"unknown toy distribution {name!r}; one of {TOYS}")
    return points.astype(np.float32), labels.astype(np.int32), num_classes


def mode_coverage(points: np.ndarray, *, min_fraction: float = 0.01) -> dict[str, float]:
    """How well samples cover the ring's 8 modes (the VEEGAN/Unrolled-GAN protocol): a sample
    is *high quality* within 3 std of its nearest mode, and a mode is *covered* when at least
    `min_fraction` of all samples are high-quality samples of it."""
    dist = np.linalg.norm(points[:, None, :2] - ring_centers()[None], axis=-1)
    nearest, good = dist.argmin(1), dist.min(1) <= 3 * RING_STD
    per_mode = np.bincount(nearest[good], minlength=RING_MODES) / len(points)
    return {"modes_covered": float((per_mode >= min_fraction).sum()),
            "high_quality_fraction": float(good.mean())}
