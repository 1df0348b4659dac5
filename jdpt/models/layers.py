"""Parameterised layers shared by every model, each carrying logical sharding axis names.

Every parameter gets logical axis names (``out_sharding`` metadata, applied lazily:
``eager_sharding=False``), so models can be built anywhere, on a laptop without a mesh, and later
placed on any mesh through one rules table (``nnx.get_partition_spec`` + ``jdpt`` rules).

Logical axes: ``embed`` (model width), ``heads`` (attention projections, heads x head_dim),
``mlp`` (feed-forward hidden), ``vocab`` (token tables), ``conv_in``/``conv_out`` (convolution
channels), ``None`` (replicated).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]


def _meta(axes: Axes) -> dict:
    return {"out_sharding": axes, "eager_sharding": False}


def dense(
    in_features: int,
    out_features: int,
    axes: Axes,
    *,
    rngs: nnx.Rngs,
    use_bias: bool = True,
    param_dtype=jnp.float32,
) -> nnx.Linear:
    """``nnx.Linear`` whose kernel ``[in, out]`` carries logical ``axes`` (bias: ``axes[1]``)."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        param_dtype=param_dtype,
        rngs=rngs,
        kernel_metadata=_meta(axes),
        bias_metadata=_meta((axes[1],)),
    )


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    rngs: nnx.Rngs,
    stride: int = 1,
    padding: int | Sequence[tuple[int, int]] = 0,
    use_bias: bool = True,
    param_dtype=jnp.float32,
) -> nnx.Conv:
    """NHWC ``nnx.Conv`` with PyTorch ``Conv2d`` padding semantics (symmetric ``padding``)."""
    pad = ((padding, padding),) * 2 if isinstance(padding, int) else tuple(tuple(p) for p in padding)
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=pad,
        use_bias=use_bias,
        param_dtype=param_dtype,
        rngs=rngs,
        kernel_metadata=_meta((None, None, "conv_in", "conv_out")),
        bias_metadata=_meta(("conv_out",)),
    )


def layer_norm(
    dim: int, *, eps: float, affine: bool = True, use_bias: bool | None = None, rngs: nnx.Rngs,
    param_dtype=jnp.float32,
) -> nnx.LayerNorm:
    """PyTorch ``LayerNorm`` (two-pass variance, fp32 statistics)."""
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        use_scale=affine,
        use_bias=affine if use_bias is None else use_bias,
        use_fast_variance=False,
        param_dtype=param_dtype,
        rngs=rngs,
        scale_metadata=_meta(("embed",)),
        bias_metadata=_meta(("embed",)),
    )


def group_norm(
    channels: int, groups: int, *, eps: float, affine: bool = True, rngs: nnx.Rngs,
    param_dtype=jnp.float32,
) -> nnx.GroupNorm:
    """PyTorch ``GroupNorm`` over NHWC (or [B, L, C]) inputs, fp32 statistics."""
    return nnx.GroupNorm(
        channels,
        num_groups=groups,
        epsilon=eps,
        use_scale=affine,
        use_bias=affine,
        use_fast_variance=False,
        param_dtype=param_dtype,
        rngs=rngs,
        scale_metadata=_meta(("conv_out",)),
        bias_metadata=_meta(("conv_out",)),
    )


def rms_norm(
    dim: int, *, eps: float, affine: bool = True, rngs: nnx.Rngs, param_dtype=jnp.float32
) -> nnx.RMSNorm:
    """PyTorch ``RMSNorm`` (fp32 mean of squares)."""
    return nnx.RMSNorm(
        dim,
        epsilon=eps,
        use_scale=affine,
        use_fast_variance=False,
        param_dtype=param_dtype,
        rngs=rngs,
        scale_metadata=_meta((None,)),
    )


def embed(
    num: int, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32, axes: Axes = ("vocab", "embed")
) -> nnx.Embed:
    """``nnx.Embed`` whose table ``[num, dim]`` carries logical ``axes`` (a token table by default).

    Lookups return the table's dtype at call time (``nnx.Embed`` would fix it at construction,
    so a model built in fp32 and loaded with bf16 weights would embed in fp32).
    """
    table = nnx.Embed(num, dim, param_dtype=param_dtype, rngs=rngs, embedding_metadata=_meta(axes))
    table.dtype = None
    return table


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """A raw parameter with logical axes (for weights that are not inside a standard layer)."""
    return nnx.Param(value, **_meta(axes))


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def gelu(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": gelu,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "gelu-approximate": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
}


def activation(name: str, *, field: str = "activation"):
    """The activation called ``name`` in diffusers/transformers configs (``field``: the config
    key, for the error message)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"{field}={name!r} is not supported; use one of {sorted(ACTIVATIONS)}") from None
