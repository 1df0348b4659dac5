"""Samplers: pure functions over a ``denoise(x, sigma) -> prediction`` callable, one jitted loop."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

Denoise = Callable[[jax.Array, jax.Array], jax.Array]


def euler_flow(denoise: Denoise, x: jax.Array, sigmas: jax.Array) -> jax.Array:
    """Integrate the flow ODE ``dx/dsigma = v(x, sigma)`` with Euler steps (diffusers'
    ``FlowMatchEulerDiscreteScheduler.step``): ``x <- x + (sigma_next - sigma) * v``.

    Args:
        denoise: velocity model ``(x, sigma) -> v``, ``sigma`` a scalar array in [0, 1].
        x: initial noise (any shape).
        sigmas: ``[N + 1]`` decreasing noise levels ending at 0 (``flow_sigmas``).
    Returns:
        The sample at ``sigmas[-1]``, in ``x``'s dtype (steps accumulate in fp32).
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def step(x32, pair):
        sigma, sigma_next = pair
        v = denoise(x32.astype(x.dtype), sigma)
        return x32 + (sigma_next - sigma) * v.astype(jnp.float32), None

    out, _ = jax.lax.scan(step, x.astype(jnp.float32), (sigmas[:-1], sigmas[1:]))
    return out.astype(x.dtype)
