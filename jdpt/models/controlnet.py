"""ControlNet for the SD 1.x/2.x/SDXL UNet: a Flax NNX port of diffusers' ``ControlNetModel``.

A trainable copy of the UNet's input half (``conv_in``, time and SDXL added embeddings, down
blocks, mid block; the classes of :mod:`jdpt.models.unet`) reads the noisy latent plus the control
image. The image ``controlnet_cond [B, H * f, W * f, conditioning_channels]`` (``f = 2 **
(len(conditioning_embedding_out_channels) - 1)``, 8 for the released models: the VAE's factor)
goes through a small conv encoder whose last conv is zero-initialised, and is added after
``conv_in``. A zero-initialised 1x1 conv turns every skip state into a residual
(``controlnet_down_blocks``) and the mid-block output into the mid residual
(``controlnet_mid_block``); :class:`jdpt.models.unet.UNet2DConditionModel` adds them through
``down_block_additional_residuals`` / ``mid_block_additional_residual``. At initialisation every
residual is exactly zero, so the UNet's output is unchanged.

Attention layers have the UNet's names (``down.{i}.attn.{j}.self``, ``mid.attn.{j}.cross``, ...);
plans given to the ControlNet address its own copy of these layers.

Reference: Zhang et al., "Adding Conditional Control to Text-to-Image Diffusion Models", 2023.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jdpt.models.layers import conv2d
from jdpt.models.unet import Plans, UNet2DConditionModel, UNetEncoder, UNetEncoderConfig

Array = jax.Array

_COPIED = ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block")


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(UNetEncoderConfig):
    """diffusers ``ControlNetModel`` config: the UNet's encoder keys (see
    :class:`jdpt.models.unet.UNetEncoderConfig`) plus the control-image encoder. Unlike the UNet,
    diffusers' ControlNet accepts ``num_attention_heads`` (it then takes precedence over
    ``attention_head_dim``) and only an int ``layers_per_block``.

    ``global_pool_conditions`` averages every residual over H and W (``[B, 1, 1, C]``; the
    "shuffle" ControlNets).
    """

    reference_class: ClassVar[str] = "ControlNetModel"
    fixed_keys: ClassVar[dict[str, Any]] = {
        **UNetEncoderConfig.fixed_keys, "controlnet_conditioning_channel_order": "rgb",
    }

    conditioning_channels: int = 3
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.layers_per_block, int):
            raise ValueError(
                f"layers_per_block={self.layers_per_block!r}: diffusers' ControlNetModel takes one int "
                "for every block"
            )
        if not self.conditioning_embedding_out_channels or min(self.conditioning_embedding_out_channels) < 1:
            raise ValueError(
                f"conditioning_embedding_out_channels={self.conditioning_embedding_out_channels!r} must "
                "hold at least one positive channel count, e.g. (16, 32, 96, 256)"
            )

    @property
    def conditioning_factor(self) -> int:
        """Control-image pixels per latent pixel along each spatial axis."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


def _zero_conv(cin: int, cout: int, kernel_size: int, *, padding: int = 0, **kw) -> nnx.Conv:
    """A conv whose kernel and bias start at exactly zero (ControlNet's zero convolutions)."""
    conv = conv2d(cin, cout, kernel_size, padding=padding, **kw)
    for p in (conv.kernel, conv.bias):
        p.set_value(jnp.zeros_like(p.get_value()))
    return conv


class ControlNetConditioningEmbedding(nnx.Module):
    """Control image ``[B, H * f, W * f, Cc]`` -> ``[B, H, W, channels]``: a 3x3 conv, then per
    step a 3x3 conv and a stride-2 3x3 conv (SiLU after each), then a zero-initialised 3x3 conv."""

    def __init__(self, cin: int, block_out_channels: tuple[int, ...], channels: int, *, rngs: nnx.Rngs,
                 param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        chans = block_out_channels
        self.conv_in = conv2d(cin, chans[0], 3, padding=1, **kw)
        self.blocks = nnx.List([
            conv for a, b in zip(chans[:-1], chans[1:])
            for conv in (conv2d(a, a, 3, padding=1, **kw), conv2d(a, b, 3, stride=2, padding=1, **kw))
        ])
        self.conv_out = _zero_conv(chans[-1], channels, 3, padding=1, **kw)

    def __call__(self, x: Array) -> Array:
        x = jax.nn.silu(self.conv_in(x))
        for conv in self.blocks:
            x = jax.nn.silu(conv(x))
        return self.conv_out(x)


class ControlNetModel(UNetEncoder):
    """diffusers ``ControlNetModel`` in Flax NNX (NHWC): residuals for the UNet from a control image."""

    config_class = ControlNetConfig

    def __init__(self, config: ControlNetConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        config.validate()
        self.config = config
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self._init_encoder(config, kw)
        self._init_control(kw)

    def _init_control(self, kw: dict) -> None:
        """The ControlNet's own layers: the condition encoder and the zero convs."""
        cfg = self.config
        chans = cfg.block_out_channels
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            cfg.conditioning_channels, cfg.conditioning_embedding_out_channels, chans[0], **kw
        )
        f = cfg.downsample_factor
        skip_channels = [shape[-1] for shape in self.residual_shapes(1, f, f)[0]]
        self.controlnet_down_blocks = nnx.List([_zero_conv(c, c, 1, **kw) for c in skip_channels])
        self.controlnet_mid_block = _zero_conv(chans[-1], chans[-1], 1, **kw)

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *,
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
        conditioning_channels: int = 3,
        rngs: nnx.Rngs,
    ) -> ControlNetModel:
        """A new ControlNet whose encoder is a copy of ``unet``'s (diffusers ``from_unet`` with
        ``load_weights_from_unet=True``).

        ``conv_in``, the time (and added) embedding, the down blocks and the mid block are copies of
        the UNet's (same values and dtype); the condition encoder is initialised from ``rngs``, the
        zero convs with zeros, so every residual is zero until the ControlNet is trained.
        """
        shared = {f.name: getattr(unet.config, f.name) for f in dataclasses.fields(UNetEncoderConfig)}
        config = ControlNetConfig(
            **shared,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            conditioning_channels=conditioning_channels,
        )
        config.validate()
        dtype = unet.conv_in.kernel.get_value().dtype
        # Shapes only for the encoder (no random init to throw away), then the copies.
        controlnet = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), param_dtype=dtype))
        for name in _COPIED:
            setattr(controlnet, name, nnx.clone(getattr(unet, name)))
        controlnet._init_control(dict(rngs=rngs, param_dtype=dtype))
        return controlnet

    def __call__(
        self,
        sample: Array,
        timestep: Array | float,
        encoder_hidden_states: Array,
        controlnet_cond: Array,
        *,
        conditioning_scale: float | Array = 1.0,
        guess_mode: bool = False,
        added_cond_kwargs: Mapping[str, Array] | None = None,
        plans: Plans = None,
    ) -> tuple[tuple[Array, ...], Array]:
        """Residuals for the UNet's skip states and mid block.

        Args:
            sample, timestep, encoder_hidden_states, added_cond_kwargs: as for the UNet
                (:meth:`jdpt.models.unet.UNet2DConditionModel.__call__`).
            controlnet_cond: ``[B, H * f, W * f, conditioning_channels]`` control image (RGB), with
                ``f = config.conditioning_factor``.
            conditioning_scale: multiplies every residual.
            guess_mode: scale the residuals from 0.1 (first skip state) to 1.0 (mid block)
                geometrically, times ``conditioning_scale`` (ignored with ``global_pool_conditions``).
            plans: attention plans by layer name (the UNet's names).

        Returns:
            ``(down_block_res_samples, mid_block_res_sample)``, shaped as
            ``residual_shapes(B, H, W)`` says (``[B, 1, 1, C]`` with ``global_pool_conditions``).
        """
        cfg = self.config
        self._check_inputs(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        b, h, w, _ = sample.shape
        f, c = cfg.conditioning_factor, cfg.conditioning_channels
        want = (b, h * f, w * f, c)
        if tuple(controlnet_cond.shape) != want:
            raise ValueError(
                f"controlnet_cond must be [B, H * {f}, W * {f}, conditioning_channels={c}] = {want} for a "
                f"{h}x{w} sample (f = 2 ** (len(conditioning_embedding_out_channels) - 1)); got "
                f"{tuple(controlnet_cond.shape)}. Resize the control image to {h * f}x{w * f}, channels last."
            )
        emb = self._embed(sample, timestep, added_cond_kwargs)
        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)
        x, skips = self._down(x, emb, encoder_hidden_states, plans)
        x = self.mid_block(x, emb, encoder_hidden_states, plans)
        outs = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)] + [self.controlnet_mid_block(x)]
        n = len(outs)
        if guess_mode and not cfg.global_pool_conditions:
            scales = [conditioning_scale * 10.0 ** (k / (n - 1) - 1.0) for k in range(n)]
        else:
            scales = [conditioning_scale] * n
        outs = [o * jnp.asarray(s, o.dtype) for o, s in zip(outs, scales)]
        if cfg.global_pool_conditions:
            outs = [o.mean(axis=(1, 2), keepdims=True) for o in outs]
        return tuple(outs[:-1]), outs[-1]
