"""Backend selection and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import available_backends, flash_attention, flash_decode, resolve_backend
from pallas_kernels.backends import current_platform

ON_CPU = jax.default_backend() == "cpu"


@pytest.mark.skipif(not ON_CPU, reason="checks the CPU defaults")
def test_cpu_defaults():
    assert resolve_backend(None) == "interpret"
    assert available_backends() == ("interpret", "tpu_interpret")


@pytest.mark.skipif(not ON_CPU, reason="needs a platform without GPU/TPU")
@pytest.mark.parametrize("backend", ["triton", "tpu"])
def test_backend_that_cannot_run_here_raises(backend):
    with pytest.raises(ValueError) as info:
        resolve_backend(backend)
    message = str(info.value)
    assert backend in message and current_platform() in message and "interpret" in message
    x = jnp.zeros((1, 8, 1, 32))
    with pytest.raises(ValueError, match=backend):
        flash_attention(x, x, x, backend=backend)
    with pytest.raises(ValueError, match=backend):
        flash_decode(x, x, x, jnp.array([8]), backend=backend)


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*interpret"):
        resolve_backend("cuda")


def test_reference_matches_jax_dot_product_attention():
    # The reference is the yardstick of every kernel test: check it against JAX's own.
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 24, 4, 16))
    k = jax.random.normal(kk, (2, 24, 2, 16))
    v = jax.random.normal(kv, (2, 24, 2, 16))
    from pallas_kernels import reference

    for causal in (False, True):
        want = jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
        np.testing.assert_allclose(reference.attention(q, k, v, causal=causal), want,
                                   atol=1e-5, rtol=1e-5)
