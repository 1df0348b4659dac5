"""The Shapes-world model's adapter: how the objectives see a :class:`~jdpt.world.model.WorldModel`.

Like the model families' adapters (:mod:`jdpt.models.adapters`) it is a
:data:`jdpt.objectives.denoiser.Denoiser` plus the clean-latent map. The world model carries its
own text tower and pixel codec, so ``cond`` holds token ids and the model itself is the "VAE".
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from jdpt.models.flux import unpack_latents
from jdpt.world.model import WorldModel
from jdpt.world.unet_model import UNetWorldModel

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class WorldAdapter:
    """``cond = {"input_ids": [B, L]}`` (the world tokenizer's ids); ``x_t`` packed pixel tokens
    ``[B, N, C]`` at sigma ``t`` ``[B]``; the prediction is the flow velocity (a ``"sample"``
    model's is derived from its x0, :func:`jdpt.diffusion.schedules.flow_velocity`)."""

    prediction: ClassVar[str] = "velocity"

    def __call__(self, model: WorldModel, x_t: Array, t: Array, cond: dict) -> Array:
        context, pooled = model.encode_prompts(cond["input_ids"])
        return model(x_t, t, context, pooled)

    def latents(self, model: WorldModel, images: Array, key: Array | None = None) -> Array:
        """uint8 scenes ``[B, H, W, 3]`` -> the clean packed tokens ``x0`` ``[B, N, C]``."""
        return model.latents(images)

    def images(self, model: WorldModel, x0: Array) -> Array:
        """Packed tokens ``[B, N, C]`` -> float images ``[B, H, W, 3]`` in [-1, 1]."""
        return model.config.codec().decode_latents(unpack_latents(x0, *model.latent_size))

    def latent_shape(self, model: WorldModel) -> tuple[int, int]:
        h, w = model.latent_size
        return h * w // 4, model.config.flux_config().in_channels


world_velocity = WorldAdapter()


def world_latents(model: WorldModel, images: Array) -> Array:
    """uint8 scenes ``[B, H, W, 3]`` -> the clean packed latents ``x0`` ``[B, N, C]`` the world
    model denoises (the same map as pretraining: :meth:`WorldModel.latents`)."""
    return model.latents(images)


@dataclasses.dataclass(frozen=True)
class UNetWorldAdapter:
    """The UNet world model (:class:`~jdpt.world.unet_model.UNetWorldModel`) as an eps-prediction
    DDPM: ``cond = {"input_ids": [B, L]}``, ``x_t`` pixel latents ``[B, h, w, C]`` at integer
    steps ``t`` ``[B]``."""

    prediction: ClassVar[str] = "epsilon"

    def __call__(self, model: UNetWorldModel, x_t: Array, t: Array, cond: dict) -> Array:
        context, _ = model.encode_prompts(cond["input_ids"])
        return model(x_t, t, context)

    def latents(self, model: UNetWorldModel, images: Array, key: Array | None = None) -> Array:
        return model.latents(images)

    def images(self, model: UNetWorldModel, x0: Array) -> Array:
        return model.config.codec().decode_latents(x0)

    def latent_shape(self, model: UNetWorldModel) -> tuple[int, int, int]:
        size = model.config.shapes.image_size // model.config.pixel_factor
        return size, size, model.config.codec().latent_channels


unet_world_eps = UNetWorldAdapter()


def adapter_for(model: WorldModel | UNetWorldModel) -> WorldAdapter | UNetWorldAdapter:
    """The adapter of a Shapes-world model."""
    if isinstance(model, UNetWorldModel):
        return unet_world_eps
    if isinstance(model, WorldModel):
        return world_velocity
    raise ValueError(f"adapter_for takes a Shapes-world model (WorldModel, UNetWorldModel); got {type(model).__name__}")
