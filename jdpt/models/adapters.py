"""Model adapters: how the post-training objectives see each model family.

An objective never calls a model directly. It calls an adapter, a
:data:`~jdpt.objectives.denoiser.Denoiser` ``adapter(model, x_t, t, cond) -> prediction`` in the
family's own convention, and maps images to the clean latents ``x0`` it denoises with
``adapter.latents(vae, images)`` (``adapter.images(vae, x0)`` maps back, for rewards on pixels).
``cond`` holds the real conditioning, named as diffusers' pipelines name it (the outputs of
:mod:`jdpt.diffusion.prompts`), every array with the batch dimension first:

============  =====================================================  =========================
family        cond                                                   x_t, t, prediction
============  =====================================================  =========================
Flux          ``prompt_embeds [B, L, 4096]`` (T5),                    packed tokens
              ``pooled_prompt_embeds [B, 768]`` (CLIP),               ``[B, N, 4C]``, sigma in
              ``guidance [B]`` (guidance-distilled models; default    [0, 1], velocity
              :attr:`FluxAdapter.guidance`)                           ``eps - x0``
SD3 / SD3.5   ``prompt_embeds [B, L, 4096]`` (CLIP-L + CLIP-G + T5),  NHWC latents, sigma in
              ``pooled_prompt_embeds [B, 2048]``                      [0, 1], velocity
SD 1.x / 2.x  ``prompt_embeds [B, 77, D]``                            NHWC latents, integer
SDXL          ``prompt_embeds [B, 77, 2048]``,                        DDPM steps, the
              ``pooled_prompt_embeds [B, 1280]``, ``time_ids [B, 6]``  scheduler's prediction
============  =====================================================  =========================

Latents are the VAE's denoiser-space latents (``AutoencoderKL.encode_latents``: scaling and shift
factors applied; the posterior's mode, or a sample with ``key``). The adapters are frozen
dataclasses (static configuration, hashable), so objectives holding them stay static under jit.
The Shapes world's adapter (``jdpt.world.adapter``) is one more of these.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jdpt.models.flux import FluxTransformer, image_ids, pack_latents, unpack_latents
from jdpt.models.sd3 import SD3Transformer
from jdpt.models.unet import UNet2DConditionModel

Array = jax.Array
PREDICTIONS = ("velocity", "epsilon", "v_prediction", "sample")


def _require(cond: Any, keys: tuple[str, ...], family: str) -> None:
    missing = [k for k in keys if not (isinstance(cond, dict) and k in cond)]
    if missing:
        have = sorted(cond) if isinstance(cond, dict) else type(cond).__name__
        raise ValueError(f"the {family} adapter's cond needs {list(keys)}; it lacks {missing} (has {have}). "
                         "Make them with jdpt.diffusion.prompts (encode_*_prompt)")


def _check_model(model: nnx.Module, cls: type, family: str) -> None:
    if not isinstance(model, cls):
        raise ValueError(f"the {family} adapter runs a {cls.__name__}; got a {type(model).__name__}")


@dataclasses.dataclass(frozen=True)
class FluxAdapter:
    """Flux (:class:`~jdpt.models.flux.FluxTransformer`): packed latent tokens, sigma, velocity.

    Attributes:
        latent_size: ``(h, w)`` of the unpacked VAE latents (a 1024x1024 image: ``(128, 128)``);
            it fixes the image tokens' RoPE positions.
        guidance: the guidance-embedding value of guidance-distilled models (FLUX.1-dev) where
            ``cond`` has no ``"guidance"``: 3.5, the default of diffusers' Flux training scripts
            (``train_dreambooth_lora_flux.py --guidance_scale``). Ignored by models without it.
    """

    latent_size: tuple[int, int]
    guidance: float = 3.5
    prediction: ClassVar[str] = "velocity"

    def __call__(self, model: FluxTransformer, x_t: Array, t: Array, cond: dict) -> Array:
        """Velocity ``[B, N, 4C]`` of packed tokens ``x_t`` at sigma ``t`` ``[B]``."""
        _check_model(model, FluxTransformer, "Flux")
        _require(cond, ("prompt_embeds", "pooled_prompt_embeds"), "Flux")
        context = cond["prompt_embeds"]
        guidance = None
        if model.config.guidance_embeds:
            guidance = cond.get("guidance", jnp.full((x_t.shape[0],), self.guidance, jnp.float32))
        txt_ids = jnp.zeros((context.shape[1], 3), jnp.float32)
        return model(x_t, context.astype(x_t.dtype), cond["pooled_prompt_embeds"].astype(x_t.dtype), t,
                     image_ids(*self.latent_size), txt_ids, guidance)

    def latents(self, vae, images: Array, key: Array | None = None) -> Array:
        """Images ``[B, H, W, 3]`` in [-1, 1] -> clean packed tokens ``x0`` ``[B, N, 4C]``."""
        return pack_latents(vae.encode_latents(images, key))

    def images(self, vae, x0: Array) -> Array:
        """Packed tokens ``[B, N, 4C]`` -> images ``[B, H, W, 3]`` in about [-1, 1]."""
        return vae.decode_latents(unpack_latents(x0, *self.latent_size))

    def latent_shape(self, model: FluxTransformer) -> tuple[int, int]:
        """``(N, 4C)``: one sample's packed tokens."""
        h, w = self.latent_size
        return h * w // 4, model.config.in_channels


class _LatentImages:
    """The clean-latent map of models denoising the VAE's NHWC latents as they are."""

    latent_size: tuple[int, int]

    def latents(self, vae, images: Array, key: Array | None = None) -> Array:
        """Images ``[B, H, W, 3]`` in [-1, 1] -> clean latents ``[B, h, w, C]``."""
        return vae.encode_latents(images, key)

    def images(self, vae, x0: Array) -> Array:
        """Latents ``[B, h, w, C]`` -> images ``[B, H, W, 3]`` in about [-1, 1]."""
        return vae.decode_latents(x0)

    def latent_shape(self, model) -> tuple[int, int, int]:
        return (*self.latent_size, model.config.in_channels)


@dataclasses.dataclass(frozen=True)
class SD3Adapter(_LatentImages):
    """SD3 / SD3.5 (:class:`~jdpt.models.sd3.SD3Transformer`): NHWC latents, sigma, velocity.
    The transformer takes ``timestep = sigma * num_train_timesteps`` as diffusers' pipeline passes it.

    Attributes:
        latent_size: ``(h, w)`` of the VAE latents.
        num_train_timesteps: the scheduler's (1000).
    """

    latent_size: tuple[int, int]
    num_train_timesteps: int = 1000
    prediction: ClassVar[str] = "velocity"

    def __call__(self, model: SD3Transformer, x_t: Array, t: Array, cond: dict) -> Array:
        """Velocity ``[B, h, w, C]`` of latents ``x_t`` at sigma ``t`` ``[B]``."""
        _check_model(model, SD3Transformer, "SD3")
        _require(cond, ("prompt_embeds", "pooled_prompt_embeds"), "SD3")
        timestep = t.astype(jnp.float32) * self.num_train_timesteps
        return model(x_t, cond["prompt_embeds"].astype(x_t.dtype), cond["pooled_prompt_embeds"].astype(x_t.dtype),
                     timestep)


@dataclasses.dataclass(frozen=True)
class UNetAdapter(_LatentImages):
    """SD 1.x / 2.x and SDXL (:class:`~jdpt.models.unet.UNet2DConditionModel`): NHWC latents,
    integer DDPM timesteps, the scheduler's prediction (``"epsilon"`` for SD 1.x and SDXL base,
    ``"v_prediction"`` for SD 2.x-768). SDXL models (``addition_embed_type="text_time"``) also
    take ``pooled_prompt_embeds`` and ``time_ids`` (:func:`jdpt.diffusion.prompts.sdxl_time_ids`).

    Attributes:
        latent_size: ``(h, w)`` of the VAE latents.
        prediction: the model's output (pair objectives with ``ForwardProcess.ddpm(schedule)``
            of the same prediction type).
    """

    latent_size: tuple[int, int]
    prediction: str = "epsilon"

    def __post_init__(self):
        if self.prediction not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"UNetAdapter prediction={self.prediction!r}: choose 'epsilon', 'v_prediction' "
                             "or 'sample' (the scheduler's prediction_type)")

    def __call__(self, model: UNet2DConditionModel, x_t: Array, t: Array, cond: dict) -> Array:
        """The model's prediction ``[B, h, w, C]`` of latents ``x_t`` at integer steps ``t`` ``[B]``."""
        _check_model(model, UNet2DConditionModel, "UNet")
        sdxl = model.config.addition_embed_type == "text_time"
        _require(cond, ("prompt_embeds", "pooled_prompt_embeds", "time_ids") if sdxl else ("prompt_embeds",),
                 "SDXL UNet" if sdxl else "UNet")
        added = None
        if sdxl:
            added = {"text_embeds": cond["pooled_prompt_embeds"].astype(x_t.dtype),
                     "time_ids": cond["time_ids"].astype(x_t.dtype)}
        return model(x_t, t, cond["prompt_embeds"].astype(x_t.dtype), added_cond_kwargs=added)
