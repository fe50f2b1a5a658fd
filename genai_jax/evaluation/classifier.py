"""The small per-data-set classifier whose features and predictions score generated images.

Trained by the project itself, once per data set, on the training split less the images reserved
for the Fréchet floor (`genai_jax.evaluation.images.split_train`; the held-out split stays the
Fréchet reference), and cached as `.npz` under `$GENAI_JAX_CACHE` (default `~/.cache/genai_jax`)
keyed by a fingerprint of exactly the images and labels it learned from; later runs load it in
milliseconds.
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from genai_jax import paths
from genai_jax.nn.layers import Conv, Dense

VERSION = 2  # bump when the architecture or its training changes: old caches are ignored
FEATURES = 128


class Classifier(nnx.Module):
    """conv 32 -> conv 64 /2 -> conv 64 /2 -> flatten -> dense 128 (the features) -> logits.

    Input uint8-range images `[batch, H, W, C]` (scaled to [0, 1] inside).
    """

    def __init__(self, shape: tuple[int, int, int], num_classes: int, *, rngs: nnx.Rngs):
        height, width, channels = shape
        self.convs = nnx.List([Conv(channels, 32, rngs=rngs),
                               Conv(32, 64, stride=2, rngs=rngs),
                               Conv(64, 64, stride=2, rngs=rngs)])
        flat = -(-height // 4) * -(-width // 4) * 64
        self.hidden = Dense([flat], [FEATURES], axes=("embed", "mlp"),
                            stddev=(1 / flat) ** 0.5, rngs=rngs)
        self.out = Dense([FEATURES], [num_classes], axes=("mlp", "vocab"), stddev=0.01,
                         rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Penultimate activations `[batch, FEATURES]`."""
        h = x.astype(jnp.float32) / 255.0
        for conv in self.convs:
            h = jax.nn.relu(conv(h))
        return jax.nn.relu(self.hidden(h.reshape(h.shape[0], -1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.features(x))


def _fingerprint(x: np.ndarray, labels: np.ndarray, num_classes: int) -> str:
    h = hashlib.sha1(f"v{VERSION} {x.shape} {num_classes}".encode())
    h.update(np.ascontiguousarray(x).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()[:16]


def train_classifier(x: np.ndarray, labels: np.ndarray, num_classes: int, *, steps: int = 1000,
                     batch_size: int = 128, seed: int = 0) -> Classifier:
    """Adam on cross-entropy with small random shifts (±1 pixel at 8x8, ±2 above) as
    augmentation, so it judges shapes rather than exact positions."""
    model = Classifier(x.shape[1:], num_classes, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    tx = optax.adam(optax.cosine_decay_schedule(2e-3, steps))
    shift = 1 if x.shape[1] <= 8 else 2

    @jax.jit
    def step(params, opt_state, xb, yb, rng):
        dx, dy = jax.random.randint(rng, (2,), -shift, shift + 1)
        xb = jnp.roll(xb, (dx, dy), axis=(1, 2))

        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = rng.integers(0, len(x), batch_size)
        params, opt_state, _ = step(params, opt_state, x[idx], labels[idx],
                                    jax.random.PRNGKey(i))
    return nnx.merge(graphdef, params)


def load_or_train(x: np.ndarray, labels: np.ndarray, num_classes: int) -> Classifier:
    """The cached classifier of this training data, training (and caching) it if needed."""
    path = paths.cache_dir() / "classifiers" / f"{_fingerprint(x, labels, num_classes)}.npz"
    template = Classifier(x.shape[1:], num_classes, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(template)
    leaves, treedef = jax.tree.flatten(params)
    if path.exists():
        with np.load(path) as saved:
            return nnx.merge(graphdef, jax.tree.unflatten(
                treedef, [jnp.asarray(saved[f"p{i}"]) for i in range(len(leaves))]))
    model = train_classifier(x, labels, num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")  # concurrent writers (processes of a
    # multi-process run train the same classifier) each write their own file
    np.savez(tmp, **{f"p{i}": np.asarray(v)
                     for i, v in enumerate(jax.tree.leaves(nnx.state(model)))})
    tmp.replace(path)  # atomic: a concurrent run never loads half a file
    return model
