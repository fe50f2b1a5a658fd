"""Forward-mode and second-order differentiation of the kernels, refused with one line.

Each kernel's derivative is a `jax.custom_vjp` whose backward pass is Pallas kernels, which is
first-order reverse mode only. JAX cannot push a tangent through a `custom_vjp`, and
differentiating the Pallas kernels themselves (what Hessian-vector products and gradients of
gradients do) fails deep inside Pallas with an unrelated assertion. Both stop instead with one
TypeError that names the kernel and the XLA path to use (genai_jax's default, on which forward
mode works).
"""

from __future__ import annotations

from collections.abc import Callable

import jax


def refusal(kernel: str, alternative: str) -> str:
    """The one-line message for `kernel`, pointing at `alternative`."""
    return (f"{kernel} has no forward-mode or second-order derivative (jax.jvp, jax.jacfwd, "
            "Hessian-vector products, gradients of gradients): its Pallas kernels define "
            f"first-order reverse mode only; use {alternative} for these")


def reverse_mode_only(message: str, kernels: Callable, *args):
    """`kernels(*args)`, the Pallas calls of a `custom_vjp`'s forward or backward rule, raising
    `message` if they are differentiated.

    Plain reverse mode only ever evaluates these rules, so the wrapper costs nothing there;
    a derivative of the rules themselves is one of a higher order (or forward over reverse).
    """
    call = jax.custom_jvp(kernels)

    def refuse(primals, tangents):
        raise TypeError(message)

    call.defjvp(refuse)
    return call(*args)


def call_custom_vjp(message: str, fn: Callable, *args):
    """`fn(*args)` for a `custom_vjp` fn, with JAX's error for a tangent pushed through it
    replaced by `message`.

    The error surfaces here when the tangent is computed eagerly (`jax.jvp` or `jax.jacfwd`
    of an un-jitted function); inside `jax.jit` JAX raises it later, when lowering, with its
    own line "can't apply forward-mode autodiff (jvp) to a custom_vjp function.".
    """
    try:
        return fn(*args)
    except TypeError as e:
        if "forward-mode autodiff" in str(e):
            raise TypeError(message) from None
        raise
