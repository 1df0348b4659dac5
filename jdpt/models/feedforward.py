"""Transformer feed-forward block, parameter-compatible with diffusers' ``FeedForward``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jdpt.models.layers import activation, dense


class FeedForward(nnx.Module):
    """``proj_out(act(proj_in(x)))`` for ``x [..., dim]`` (diffusers keys ``net.0.proj``, ``net.2``)."""

    torch_names = {"proj_in": "net.0.proj", "proj_out": "net.2"}

    def __init__(self, dim: int, dim_out: int | None = None, *, mult: float = 4.0,
                 activation_fn: str = "gelu-approximate", bias: bool = True, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        inner = int(dim * mult)
        self.act = activation(activation_fn)
        self.proj_in = dense(dim, inner, ("embed", "mlp"), use_bias=bias, rngs=rngs, param_dtype=param_dtype)
        self.proj_out = dense(inner, dim_out or dim, ("mlp", "embed"), use_bias=bias, rngs=rngs,
                              param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(self.act(self.proj_in(x)))
