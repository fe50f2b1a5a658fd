"""genai_jax: a JAX/XLA research framework for generative models.

One functional model zoo trained by one trainer, compiled through XLA, with Pallas kernels and
sharded training on a named device mesh. Start with `genai_jax.train.train(config, workdir)` or
`python -m experiments.train --config=experiments/configs/lm_stdlib.py --workdir=DIR`.
"""

__version__ = "0.1.0"
