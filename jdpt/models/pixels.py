"""Pixel space as a latent space: an exact, parameter-free stand-in for a VAE.

Small models trained from scratch (the Shapes world) denoise pixels directly. ``PixelCodec``
gives them the interface the pipelines use for a VAE (``encode_latents`` / ``decode_latents`` /
``downsample_factor``): images in ``[-1, 1]`` are folded space-to-depth by ``factor``, so a
``[B, 32, 32, 3]`` image becomes a ``[B, 16, 16, 12]`` latent with ``factor=2``. The map is a
permutation of the pixels, so decode(encode(x)) == x exactly.
"""

from __future__ import annotations

import jax
from flax import struct


@struct.dataclass
class PixelCodec:
    """Space-to-depth codec; a pytree without leaves, so jitted functions can take it."""

    factor: int = struct.field(pytree_node=False, default=1)
    channels: int = struct.field(pytree_node=False, default=3)

    def __post_init__(self):
        if not isinstance(self.factor, int) or self.factor < 1:
            raise ValueError(f"PixelCodec factor must be a positive integer; got {self.factor!r}")

    @property
    def downsample_factor(self) -> int:
        return self.factor

    @property
    def latent_channels(self) -> int:
        return self.channels * self.factor**2

    def encode_latents(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """``[B, H, W, C]`` images in [-1, 1] -> ``[B, H/f, W/f, C f^2]`` (channels ordered C, dy, dx).

        ``key`` is accepted for interface parity with ``AutoencoderKL`` and unused: the map is
        deterministic."""
        b, h, w, c = x.shape
        f = self.factor
        if c != self.channels or h % f or w % f:
            raise ValueError(
                f"PixelCodec(factor={f}, channels={self.channels}) needs [B, H, W, {self.channels}] "
                f"images with H and W multiples of {f}; got {tuple(x.shape)}"
            )
        x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 5, 2, 4)
        return x.reshape(b, h // f, w // f, c * f * f)

    def decode_latents(self, z: jax.Array) -> jax.Array:
        """Inverse of :meth:`encode_latents`: ``[B, h, w, C f^2]`` -> ``[B, h f, w f, C]``."""
        b, h, w, cf = z.shape
        f = self.factor
        if cf != self.latent_channels:
            raise ValueError(
                f"PixelCodec(factor={f}, channels={self.channels}) decodes latents with "
                f"{self.latent_channels} channels; got {tuple(z.shape)}"
            )
        z = z.reshape(b, h, w, self.channels, f, f).transpose(0, 1, 4, 2, 5, 3)
        return z.reshape(b, h * f, w * f, self.channels)
