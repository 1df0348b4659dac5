"""Timestep, pooled-text and rotary position embeddings (diffusers conventions)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jdpt.models.layers import dense


def timestep_embedding(
    t: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal embedding of (possibly fractional) timesteps, as diffusers' ``Timesteps``.

    Args:
        t: ``[N]`` timesteps.
    Returns:
        ``[N, dim]`` fp32: ``[sin, cos]`` halves (``[cos, sin]`` when ``flip_sin_to_cos``).
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class MLPEmbedding(nnx.Module):
    """``linear_1 -> act -> linear_2``: diffusers ``TimestepEmbedding`` and
    ``PixArtAlphaTextProjection`` (same parameter names and computation)."""

    def __init__(self, in_dim: int, dim: int, *, act=jax.nn.silu, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.linear_1 = dense(in_dim, dim, (None, "mlp"), rngs=rngs, param_dtype=param_dtype)
        self.linear_2 = dense(dim, dim, ("mlp", "embed"), rngs=rngs, param_dtype=param_dtype)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


def rope_frequencies(ids: jax.Array, axes_dims: Sequence[int], theta: float) -> tuple[jax.Array, jax.Array]:
    """Multi-axis rotary tables (Flux ``FluxPosEmbed``).

    Args:
        ids: ``[S, n_axes]`` positions per axis.
        axes_dims: rotary dimensions per axis (even, summing to the head dim).
    Returns:
        ``(cos, sin)``, each ``[S, sum(axes_dims)]`` fp32, every frequency repeated twice
        (interleaved pairs).
    """
    pos = ids.astype(jnp.float32)
    cos, sin = [], []
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))  # [d/2]
        angles = pos[:, i : i + 1] * freqs[None, :]  # [S, d/2]
        cos.append(jnp.repeat(jnp.cos(angles), 2, axis=-1))
        sin.append(jnp.repeat(jnp.sin(angles), 2, axis=-1))
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of ``x [B, S, H, D]`` by the tables ``[S, D]``.

    Computed in fp32, returned in ``x``'s dtype.
    """
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)
