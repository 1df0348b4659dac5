"""The KL autoencoder of latent diffusion (SD, SDXL, SD3, Flux): diffusers ``AutoencoderKL``.

Images and latents are NHWC: ``x: [B, H, W, in_channels]`` encodes to a diagonal Gaussian over
``z: [B, H / f, W / f, latent_channels]`` with ``f = 2 ** (len(block_out_channels) - 1)``, and
``decode(z)`` gives ``[B, H, W, out_channels]``. Attribute names follow the diffusers module tree
(``encoder.down_blocks.0.resnets.1.conv1``, ``decoder.mid_block.attentions.0.to_q``, ...) so the
weights map onto diffusers state dicts by name (see :mod:`jdpt.weights.diffusers`).

The mid-block self-attention of encoder and decoder goes through :func:`jdpt.models.attention.
attention`; its layer names are ``"encoder.mid_block.attentions.0"`` and
``"decoder.mid_block.attentions.0"``. Activations run in the parameters' dtype (bf16 weights give
bf16 activations); group-norm statistics and the softmax run in fp32.

Reference: Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", 2022.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jdpt.models.attention import AttentionPlan, LayerPlans, attention, resolve_plan, sow_probs
from jdpt.models.config import ModelConfig
from jdpt.models.layers import activation, conv2d, dense, group_norm

Array = jax.Array
Plans = LayerPlans | AttentionPlan | None

_EPS = 1e-6  # every norm of the diffusers VAE uses this epsilon


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig(ModelConfig):
    """diffusers ``AutoencoderKL`` config (field names and defaults are diffusers').

    Latent convention (what pipelines feed the denoiser): ``(z - shift_factor) * scaling_factor``
    (SD: no shift; Flux/SD3: a shift); when ``latents_mean``/``latents_std`` are set they take the
    place of the shift, per channel: ``(z - mean) * scaling_factor / std`` (SDXL pipelines).
    ``force_upcast`` is kept for round trips; jdpt runs in the dtype of the parameters.
    """

    reference_class: ClassVar[str] = "AutoencoderKL"
    library: ClassVar[str] = "diffusers"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each spatial axis."""
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError(
                "block_out_channels is empty; give one channel count per block, "
                "e.g. (128, 256, 512, 512)"
            )
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            raise ValueError(
                f"down_block_types {self.down_block_types} is not supported; jdpt's AutoencoderKL "
                "has only 'DownEncoderBlock2D' (the type of every released SD/SDXL/SD3/Flux VAE)"
            )
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            raise ValueError(
                f"up_block_types {self.up_block_types} is not supported; jdpt's AutoencoderKL has "
                "only 'UpDecoderBlock2D' (the type of every released SD/SDXL/SD3/Flux VAE)"
            )
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"{len(self.down_block_types)} down_block_types and {len(self.up_block_types)} "
                f"up_block_types for {n} block_out_channels {self.block_out_channels}; give one "
                "block type of each kind per entry of block_out_channels"
            )
        groups = self.norm_num_groups
        bad = [c for c in self.block_out_channels if groups <= 0 or c <= 0 or c % groups]
        if bad:
            raise ValueError(
                f"block_out_channels {self.block_out_channels} must be positive multiples of "
                f"norm_num_groups={self.norm_num_groups} (bad: {bad}); change either"
            )
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block={self.layers_per_block}; it must be at least 1")
        if min(self.in_channels, self.out_channels, self.latent_channels) < 1:
            raise ValueError(
                f"in_channels={self.in_channels}, out_channels={self.out_channels} and "
                f"latent_channels={self.latent_channels} must all be at least 1"
            )
        activation(self.act_fn, field="act_fn")
        if not self.scaling_factor > 0:
            raise ValueError(
                f"scaling_factor={self.scaling_factor} must be positive (latents are divided by it)"
            )
        stats = (self.latents_mean, self.latents_std)
        if any(s is not None for s in stats) and any(
            s is None or len(s) != self.latent_channels for s in stats
        ):
            raise ValueError(
                f"latents_mean {self.latents_mean} and latents_std {self.latents_std} must both be "
                f"None or both hold latent_channels={self.latent_channels} values"
            )


@struct.dataclass
class DiagonalGaussian:
    """The posterior ``q(z | x) = N(mean, exp(logvar))``, per latent element.

    Attributes:
        mean: ``[B, h, w, latent_channels]``.
        logvar: ``[B, h, w, latent_channels]``, clamped to ``[-30, 20]`` as in diffusers.
    """

    mean: Array
    logvar: Array

    @classmethod
    def from_moments(cls, moments: Array) -> DiagonalGaussian:
        """Split ``moments: [B, h, w, 2 * C]`` into mean (first C channels) and log-variance."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> Array:
        return jnp.exp(self.logvar)

    def sample(self, key: Array) -> Array:
        """``mean + std * eps`` with ``eps = jax.random.normal(key, mean.shape, mean.dtype)``."""
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> Array:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Array:
        """``KL(self || other)`` summed over ``[h, w, C]``, shape ``[B]``; ``None`` is N(0, I)."""
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (
                jnp.square(self.mean - other.mean) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * jnp.sum(terms, axis=(1, 2, 3))


class ResnetBlock(nnx.Module):
    """diffusers ``ResnetBlock2D`` without time embedding: ``[B, H, W, Cin] -> [B, H, W, Cout]``."""

    def __init__(self, cin: int, cout: int, groups: int, act: str, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.norm1 = group_norm(cin, groups, eps=_EPS, **kw)
        self.conv1 = conv2d(cin, cout, 3, padding=1, **kw)
        self.norm2 = group_norm(cout, groups, eps=_EPS, **kw)
        self.conv2 = conv2d(cout, cout, 3, padding=1, **kw)
        self.conv_shortcut = conv2d(cin, cout, 1, **kw) if cin != cout else None
        self.act = activation(act)

    def __call__(self, x: Array) -> Array:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.act(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nnx.Module):
    """Stride-2 3x3 conv after zero padding one row/column at the bottom/right: halves H and W."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, param_dtype):
        pad = [(0, 1), (0, 1)]
        self.conv = conv2d(channels, channels, 3, stride=2, padding=pad, rngs=rngs,
                           param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv: doubles H and W."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs, param_dtype):
        self.conv = conv2d(channels, channels, 3, padding=1, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class SpatialSelfAttention(nnx.Module):
    """Single-head self-attention over the H*W positions with a group-normed input and residual.

    ``x: [B, H, W, C] -> x + to_out(attention(to_q(n), to_k(n), to_v(n)))`` with
    ``n = group_norm(x)``; the head dimension is ``C``.
    """

    def __init__(self, channels: int, groups: int, layer_name: str, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.layer_name = layer_name
        self.group_norm = group_norm(channels, groups, eps=_EPS, **kw)
        self.to_q = dense(channels, channels, ("embed", "heads"), **kw)
        self.to_k = dense(channels, channels, ("embed", "heads"), **kw)
        self.to_v = dense(channels, channels, ("embed", "heads"), **kw)
        self.to_out = nnx.List([dense(channels, channels, ("heads", "embed"), **kw)])

    def __call__(self, x: Array, *, plans: Plans = None) -> Array:
        b, h, w, c = x.shape
        n = self.group_norm(x).reshape(b, h * w, 1, c)
        out, probs = attention(
            self.to_q(n), self.to_k(n), self.to_v(n), plan=resolve_plan(plans, self.layer_name)
        )
        sow_probs(self, probs)
        return x + self.to_out[0](out).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """diffusers ``UNetMidBlock2D`` of the VAE: resnet, (optional) self-attention, resnet."""

    def __init__(self, config: AutoencoderKLConfig, prefix: str, *, rngs: nnx.Rngs, param_dtype):
        c, g = config.block_out_channels[-1], config.norm_num_groups
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.resnets = nnx.List([ResnetBlock(c, c, g, config.act_fn, **kw) for _ in range(2)])
        self.attentions = nnx.List(
            [SpatialSelfAttention(c, g, f"{prefix}.attentions.0", **kw)]
            if config.mid_block_add_attention
            else []
        )

    def __call__(self, x: Array, *, plans: Plans = None) -> Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x, plans=plans)
        return self.resnets[1](x)


class DownEncoderBlock(nnx.Module):
    """diffusers ``DownEncoderBlock2D``: resnets, then an optional 2x downsampler."""

    def __init__(self, cin: int, cout: int, num_layers: int, add_downsample: bool,
                 config: AutoencoderKLConfig, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        g, act = config.norm_num_groups, config.act_fn
        self.resnets = nnx.List(
            [ResnetBlock(cin if i == 0 else cout, cout, g, act, **kw) for i in range(num_layers)]
        )
        self.downsamplers = nnx.List([Downsample(cout, **kw)] if add_downsample else [])

    def __call__(self, x: Array) -> Array:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpDecoderBlock(nnx.Module):
    """diffusers ``UpDecoderBlock2D``: resnets, then an optional 2x upsampler."""

    def __init__(self, cin: int, cout: int, num_layers: int, add_upsample: bool,
                 config: AutoencoderKLConfig, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        g, act = config.norm_num_groups, config.act_fn
        self.resnets = nnx.List(
            [ResnetBlock(cin if i == 0 else cout, cout, g, act, **kw) for i in range(num_layers)]
        )
        self.upsamplers = nnx.List([Upsample(cout, **kw)] if add_upsample else [])

    def __call__(self, x: Array) -> Array:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nnx.Module):
    """``[B, H, W, in_channels] -> [B, H / f, W / f, 2 * latent_channels]`` (mean, log-variance)."""

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        chans = config.block_out_channels
        self.conv_in = conv2d(config.in_channels, chans[0], 3, padding=1, **kw)
        self.down_blocks = nnx.List(
            [
                DownEncoderBlock(chans[max(i - 1, 0)], c, config.layers_per_block,
                                 i < len(chans) - 1, config, **kw)
                for i, c in enumerate(chans)
            ]
        )
        self.mid_block = MidBlock(config, "encoder.mid_block", **kw)
        self.conv_norm_out = group_norm(chans[-1], config.norm_num_groups, eps=_EPS, **kw)
        self.conv_out = conv2d(chans[-1], 2 * config.latent_channels, 3, padding=1, **kw)

    def __call__(self, x: Array, *, plans: Plans = None) -> Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x, plans=plans)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """``[B, h, w, latent_channels] -> [B, h * f, w * f, out_channels]``."""

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, param_dtype):
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        chans = config.block_out_channels[::-1]
        self.conv_in = conv2d(config.latent_channels, chans[0], 3, padding=1, **kw)
        self.mid_block = MidBlock(config, "decoder.mid_block", **kw)
        self.up_blocks = nnx.List(
            [
                UpDecoderBlock(chans[max(i - 1, 0)], c, config.layers_per_block + 1,
                               i < len(chans) - 1, config, **kw)
                for i, c in enumerate(chans)
            ]
        )
        self.conv_norm_out = group_norm(chans[-1], config.norm_num_groups, eps=_EPS, **kw)
        self.conv_out = conv2d(chans[-1], config.out_channels, 3, padding=1, **kw)

    def __call__(self, z: Array, *, plans: Plans = None) -> Array:
        x = self.mid_block(self.conv_in(z), plans=plans)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """diffusers ``AutoencoderKL`` in Flax NNX (NHWC).

    ``encode(x) -> DiagonalGaussian``, ``decode(z) -> image``; ``encode_latents`` /
    ``decode_latents`` add the pipelines' latent scaling and shift.
    """

    config_class = AutoencoderKLConfig

    def __init__(self, config: AutoencoderKLConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        config.validate()
        self.config = config
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        c = config.latent_channels
        self.quant_conv = conv2d(2 * c, 2 * c, 1, **kw) if config.use_quant_conv else None
        self.post_quant_conv = conv2d(c, c, 1, **kw) if config.use_post_quant_conv else None

    def encode(self, x: Array, *, plans: Plans = None) -> DiagonalGaussian:
        """The posterior over latents of images ``x: [B, H, W, in_channels]``.

        ``H`` and ``W`` must be multiples of ``config.downsample_factor``; the posterior's arrays
        are ``[B, H / f, W / f, latent_channels]`` in the parameters' dtype.
        """
        self._check(x, "x", self.config.in_channels, "in_channels", self.config.downsample_factor)
        moments = self.encoder(x.astype(self._dtype(self.encoder)), plans=plans)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: Array, *, plans: Plans = None) -> Array:
        """Images ``[B, h*f, w*f, out_channels]`` of raw (unscaled) latents ``z: [B, h, w, C]``."""
        self._check(z, "z", self.config.latent_channels, "latent_channels", 1)
        z = z.astype(self._dtype(self.decoder))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z, plans=plans)

    def __call__(
        self, sample: Array, *, sample_posterior: bool = False, key: Array | None = None,
        plans: Plans = None,
    ) -> Array:
        """Reconstruct ``sample: [B, H, W, in_channels]`` through the posterior's mode, or a sample
        of it when ``sample_posterior`` (then ``key`` is required)."""
        if sample_posterior and key is None:
            raise ValueError(
                "sample_posterior=True needs a PRNG key: pass key=jax.random.key(seed)"
            )
        posterior = self.encode(sample, plans=plans)
        z = posterior.sample(key) if sample_posterior else posterior.mode()
        return self.decode(z, plans=plans)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each spatial axis."""
        return self.config.downsample_factor

    def encode_latents(self, x: Array, key: Array | None = None, *, plans: Plans = None) -> Array:
        """Denoiser-space latents of images ``x``: ``(z - shift) * scaling_factor / std``.

        ``z`` is a posterior sample drawn with ``key``, or its mode when ``key`` is None; ``shift``
        and ``std`` are ``latents_mean``/``latents_std`` when set, else ``shift_factor`` (0 when
        None) and 1.
        """
        posterior = self.encode(x, plans=plans)
        z = posterior.mode() if key is None else posterior.sample(key)
        shift, std = self._latent_stats(z.dtype)
        return (z - shift) * self.config.scaling_factor / std

    def decode_latents(self, latents: Array, *, plans: Plans = None) -> Array:
        """Images of denoiser-space latents: ``decode(latents * std / scaling_factor + shift)``."""
        shift, std = self._latent_stats(latents.dtype)
        return self.decode(latents * std / self.config.scaling_factor + shift, plans=plans)

    def _latent_stats(self, dtype) -> tuple[Array, Array]:
        cfg = self.config
        if cfg.latents_mean is not None:
            return jnp.asarray(cfg.latents_mean, dtype), jnp.asarray(cfg.latents_std, dtype)
        shift = 0.0 if cfg.shift_factor is None else cfg.shift_factor
        return jnp.asarray(shift, dtype), jnp.asarray(1.0, dtype)

    @staticmethod
    def _dtype(coder: Encoder | Decoder):
        """The activation dtype: that of the parameters (bf16 weights run in bf16)."""
        return coder.conv_in.kernel.get_value().dtype

    @staticmethod
    def _check(x: Array, name: str, channels: int, field: str, factor: int) -> None:
        shape = tuple(x.shape)
        if len(shape) != 4:
            raise ValueError(
                f"{name} must be NHWC [B, H, W, {channels}]; got rank {len(shape)} shape {shape}. "
                + (f"Add a batch axis: {name}[None]." if len(shape) == 3
                   else f"Reshape it to [B, H, W, {channels}].")
            )
        if shape[-1] != channels:
            hint = (
                f" It looks NCHW: transpose it with {name}.transpose(0, 2, 3, 1)."
                if shape[1] == channels
                else f" Pass {channels}-channel input or use a model with {field}={shape[-1]}."
            )
            raise ValueError(
                f"{name} must have {field}={channels} channels last, [B, H, W, {channels}]; got "
                f"shape {shape}.{hint}"
            )
        if shape[1] % factor or shape[2] % factor:
            up_h, up_w = (-(-s // factor) * factor for s in shape[1:3])
            raise ValueError(
                f"{name} spatial size {shape[1]}x{shape[2]} is not divisible by the VAE's "
                f"downsampling factor {factor} (2 ** (len(block_out_channels) - 1)); pad it (e.g. "
                f"to {up_h}x{up_w}) or crop it to multiples of {factor}"
            )
