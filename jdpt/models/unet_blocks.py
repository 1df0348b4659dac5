"""The building blocks of :mod:`jdpt.models.unet`: diffusers' ``Attention``, ``BasicTransformerBlock``,
``Transformer2DModel``, ``ResnetBlock2D``, ``Downsample2D`` and the down/mid/up blocks, with the
diffusers attribute names (so weights map by name) and the stable attention layer names documented
in :mod:`jdpt.models.unet`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from jdpt.models.attention import AttentionPlan, LayerPlans, attention, resolve_plan, sow_probs
from jdpt.models.layers import activation, conv2d, dense, gelu, group_norm, layer_norm
from jdpt.models.vae import Upsample

if TYPE_CHECKING:
    from jdpt.models.unet import UNet2DConditionConfig, UNetEncoderConfig

Array = jax.Array
Plans = LayerPlans | AttentionPlan | None


class Attention(nnx.Module):
    """diffusers ``Attention`` of a ``BasicTransformerBlock``: bias-free q/k/v, biased ``to_out.0``.

    ``x [B, T, dim]`` attends to itself, or to ``context [B, S, context_dim]`` when given.
    """

    def __init__(self, dim: int, heads: int, context_dim: int, layer_name: str, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.layer_name = layer_name
        self.heads = heads
        self.to_q = dense(dim, dim, ("embed", "heads"), use_bias=False, **kw)
        self.to_k = dense(context_dim, dim, (None, "heads"), use_bias=False, **kw)
        self.to_v = dense(context_dim, dim, (None, "heads"), use_bias=False, **kw)
        self.to_out = nnx.List([dense(dim, dim, ("heads", "embed"), **kw)])

    def __call__(self, x: Array, context: Array | None = None, *, plans: Plans = None) -> Array:
        context = x if context is None else context

        def split(y: Array) -> Array:
            return y.reshape(*y.shape[:2], self.heads, -1)

        out, probs = attention(
            split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context)),
            plan=resolve_plan(plans, self.layer_name),
        )
        sow_probs(self, probs)
        return self.to_out[0](out.reshape(*x.shape))


class GEGLUFeedForward(nnx.Module):
    """diffusers ``FeedForward(activation_fn="geglu")``: ``proj_out(h * gelu(gate))`` with
    ``h, gate = split(proj_in(x))``, hidden width ``4 * dim``."""

    torch_names = {"proj_in": "net.0.proj", "proj_out": "net.2"}

    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.proj_in = dense(dim, 8 * dim, ("embed", "mlp"), **kw)
        self.proj_out = dense(4 * dim, dim, ("mlp", "embed"), **kw)

    def __call__(self, x: Array) -> Array:
        h, gate = jnp.split(self.proj_in(x), 2, axis=-1)
        return self.proj_out(h * gelu(gate))


class BasicTransformerBlock(nnx.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward on ``x [B, T, dim]``."""

    def __init__(self, dim: int, heads: int, context_dim: int, name: str, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.norm1 = layer_norm(dim, eps=1e-5, **kw)
        self.attn1 = Attention(dim, heads, dim, f"{name}.self", **kw)
        self.norm2 = layer_norm(dim, eps=1e-5, **kw)
        self.attn2 = Attention(dim, heads, context_dim, f"{name}.cross", **kw)
        self.norm3 = layer_norm(dim, eps=1e-5, **kw)
        self.ff = GEGLUFeedForward(dim, **kw)

    def __call__(self, x: Array, context: Array, plans: Plans) -> Array:
        x = x + self.attn1(self.norm1(x), plans=plans)
        x = x + self.attn2(self.norm2(x), context, plans=plans)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """diffusers ``Transformer2DModel`` on continuous inputs: ``x [B, H, W, C] -> [B, H, W, C]``.

    Group norm, ``proj_in`` (1x1 conv, or linear when ``use_linear_projection``), the transformer
    blocks over the ``H * W`` positions, ``proj_out``, plus the input as a residual. ``names`` are
    the layer names of the transformer blocks (see the module docstring).
    """

    def __init__(self, channels: int, heads: int, names: Sequence[str], config: UNetEncoderConfig, *,
                 rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.norm = group_norm(channels, config.norm_num_groups, eps=1e-6, **kw)
        if config.use_linear_projection:
            self.proj_in = dense(channels, channels, ("conv_in", "embed"), **kw)
            self.proj_out = dense(channels, channels, ("embed", "conv_out"), **kw)
        else:
            self.proj_in = conv2d(channels, channels, 1, **kw)
            self.proj_out = conv2d(channels, channels, 1, **kw)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(channels, heads, config.cross_attention_dim, name, **kw) for name in names
        ])

    def __call__(self, x: Array, context: Array, plans: Plans) -> Array:
        b, h, w, c = x.shape
        # Channels last: a 1x1 conv and a linear layer act alike, before or after flattening.
        tokens = self.proj_in(self.norm(x)).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            tokens = block(tokens, context, plans)
        return x + self.proj_out(tokens.reshape(b, h, w, c))


class ResnetBlock2D(nnx.Module):
    """diffusers ``ResnetBlock2D`` with time embedding: ``x [B, H, W, Cin], temb [B, T] -> [B, H, W, Cout]``.

    ``(shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))) + proj(act(temb)))))) / output_scale``.
    """

    def __init__(self, cin: int, cout: int, config: UNetEncoderConfig, *, output_scale: float = 1.0,
                 rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        groups, eps = config.norm_num_groups, config.norm_eps
        self.act = activation(config.act_fn)
        self.output_scale = output_scale
        self.norm1 = group_norm(cin, groups, eps=eps, **kw)
        self.conv1 = conv2d(cin, cout, 3, padding=1, **kw)
        self.time_emb_proj = dense(config.time_embed_dim, cout, ("embed", "conv_out"), **kw)
        self.norm2 = group_norm(cout, groups, eps=eps, **kw)
        self.conv2 = conv2d(cout, cout, 3, padding=1, **kw)
        self.conv_shortcut = conv2d(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: Array, temb: Array) -> Array:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time_emb_proj(self.act(temb))[:, None, None, :]
        h = self.conv2(self.act(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return (skip + h) / self.output_scale


class Downsample2D(nnx.Module):
    """Stride-2 3x3 conv with one pixel of zero padding on every side: halves even H and W."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, param_dtype):
        self.conv = conv2d(channels, channels, 3, stride=2, padding=1, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        return self.conv(x)


def _attentions(channels: int, heads: int, depth: int, count: int, prefix: str, config: UNetEncoderConfig,
                kw: dict) -> nnx.List:
    """``count`` transformers of ``depth`` blocks; block ``t`` of transformer ``a`` is ``{prefix}.{a * depth + t}``."""
    return nnx.List([
        Transformer2DModel(channels, heads, [f"{prefix}.{a * depth + t}" for t in range(depth)], config, **kw)
        for a in range(count)
    ])


class DownBlock2D(nnx.Module):
    """Down block ``i``: diffusers ``CrossAttnDownBlock2D`` or ``DownBlock2D`` (as
    ``config.down_block_types[i]`` says): resnets, each followed by a transformer in the
    cross-attention type, then a 2x downsampler in every block but the last."""

    def __init__(self, config: UNetEncoderConfig, i: int, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        chans = config.block_out_channels
        cin, cout, n = chans[max(i - 1, 0)], chans[i], config.layers[i]
        self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, config, **kw) for j in range(n)])
        cross = config.down_block_types[i] == "CrossAttnDownBlock2D"
        self.attentions = _attentions(cout, config.heads[i], config.transformer_layers[i], n if cross else 0,
                                      f"down.{i}.attn", config, kw)
        self.downsamplers = nnx.List([Downsample2D(cout, **kw)] if i < len(chans) - 1 else [])

    def __call__(self, x: Array, temb: Array, context: Array, plans: Plans) -> tuple[Array, list[Array]]:
        """Returns the block output and the skip states (after each resnet/transformer, and the
        downsampler), all ``[B, h, w, C]``."""
        states = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[j](x, context, plans)
            states.append(x)
        for down in self.downsamplers:
            x = down(x)
            states.append(x)
        return x, states


class UNetMidBlock2DCrossAttn(nnx.Module):
    """resnet, transformer, resnet at the lowest resolution (resnets scaled by ``mid_block_scale_factor``)."""

    def __init__(self, config: UNetEncoderConfig, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        c, scale = config.block_out_channels[-1], config.mid_block_scale_factor
        self.resnets = nnx.List([ResnetBlock2D(c, c, config, output_scale=scale, **kw) for _ in range(2)])
        self.attentions = _attentions(c, config.heads[-1], config.transformer_layers[-1], 1, "mid.attn", config, kw)

    def __call__(self, x: Array, temb: Array, context: Array, plans: Plans) -> Array:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, plans)
        return self.resnets[1](x, temb)


class UpBlock2D(nnx.Module):
    """Up block ``i``: diffusers ``CrossAttnUpBlock2D`` or ``UpBlock2D`` (as
    ``config.up_block_types[i]`` says). Each resnet takes the running state concatenated with one
    skip state (the last first) and, in the cross-attention type, is followed by a transformer;
    every block but the last ends with a 2x nearest upsampler and a conv."""

    def __init__(self, config: UNet2DConditionConfig, i: int, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        n_blocks = len(config.block_out_channels)
        chans = config.block_out_channels[::-1]
        k = n_blocks - 1 - i  # the matching down block
        prev, cout, skip_in = chans[max(i - 1, 0)], chans[i], chans[min(i + 1, n_blocks - 1)]
        n = config.layers[k] + 1
        self.resnets = nnx.List([
            ResnetBlock2D((prev if j == 0 else cout) + (skip_in if j == n - 1 else cout), cout, config, **kw)
            for j in range(n)
        ])
        cross = config.up_block_types[i] == "CrossAttnUpBlock2D"
        self.attentions = _attentions(cout, config.heads[k], config.transformer_layers[k], n if cross else 0,
                                      f"up.{i}.attn", config, kw)
        self.upsamplers = nnx.List([Upsample(cout, **kw)] if i < n_blocks - 1 else [])

    def __call__(self, x: Array, skips: Sequence[Array], temb: Array, context: Array, plans: Plans) -> Array:
        for j, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips[-1 - j]], axis=-1), temb)
            if self.attentions:
                x = self.attentions[j](x, context, plans)
        for up in self.upsamplers:
            x = up(x)
        return x
