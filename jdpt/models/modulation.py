"""Adaptive layer norms (adaLN): a conditioning vector sets per-sample shift, scale and gates.

Parameter names and chunk orders follow diffusers' ``AdaLayerNormZero``,
``AdaLayerNormZeroSingle`` and ``AdaLayerNormContinuous``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jdpt.models.layers import dense, layer_norm


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x [B, L, D] * (1 + scale[:, None]) + shift[:, None]``."""
    return x * (1 + scale[:, None]) + shift[:, None]


class AdaLayerNormZero(nnx.Module):
    """LayerNorm modulated by ``emb [B, D]``; returns the normed input and the MLP/gate terms.

    ``__call__(x, emb) -> (x_mod, gate_msa, shift_mlp, scale_mlp, gate_mlp)``.
    """

    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.linear = dense(dim, 6 * dim, ("embed", "mlp"), rngs=rngs, param_dtype=param_dtype)
        self.norm = layer_norm(dim, eps=1e-6, affine=False, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, emb: jax.Array):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            self.linear(jax.nn.silu(emb)), 6, axis=-1
        )
        return _modulate(self.norm(x), shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroSingle(nnx.Module):
    """``__call__(x, emb) -> (x_mod, gate)`` with chunks (shift, scale, gate)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.linear = dense(dim, 3 * dim, ("embed", "mlp"), rngs=rngs, param_dtype=param_dtype)
        self.norm = layer_norm(dim, eps=1e-6, affine=False, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, emb: jax.Array):
        shift, scale, gate = jnp.split(self.linear(jax.nn.silu(emb)), 3, axis=-1)
        return _modulate(self.norm(x), shift, scale), gate


class AdaLayerNormContinuous(nnx.Module):
    """Final-layer adaLN: chunks are (scale, shift) - the reverse of the Zero variants."""

    def __init__(self, dim: int, cond_dim: int, *, eps: float = 1e-6, affine: bool = False,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.linear = dense(cond_dim, 2 * dim, ("embed", "mlp"), rngs=rngs, param_dtype=param_dtype)
        self.norm = layer_norm(dim, eps=eps, affine=affine, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.linear(jax.nn.silu(cond).astype(x.dtype)), 2, axis=-1)
        return _modulate(self.norm(x), shift, scale)
