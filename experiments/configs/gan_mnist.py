"""A class-conditional GAN on MNIST (the 10k test file: 9,000 train / 1,000 held out), 2 CPU cores.

    python -m experiments.train --config=experiments/configs/gan_mnist.py \\
        --config.data.path=../shared/data/mnist --workdir=runs/gan_mnist

Expect: not yet measured.
"""

from genai_jax.config import base_config


def get_config():
    config = base_config("gan")
    config.data.update(name="mnist_idx", path="", validation_fraction=0.1)
    config.model.update(conditional=True, z_dim=64, g_channels=32, d_channels=32,
                        loss="hinge", regularization="spectral_norm",
                        g_learning_rate=2e-4, d_learning_rate=2e-4, b1=0.5, b2=0.99)
    config.train.update(steps=4000, batch_size=64, ema_decay=0.999, log_every=100,
                        steps_per_call=20)
    config.eval.update(every=1000, steps=4, num_samples=1000)
    config.checkpoint.every = 1000
    config.sample.num_samples = 100
    return config
