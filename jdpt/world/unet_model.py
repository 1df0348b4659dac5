"""The Shapes world's UNet model: a tiny CLIP text tower + a tiny SD-style UNet, eps-prediction DDPM.

The UNet-family methods (Diffusion-DPO on eps models, DDPO on DDIM trajectories, PAG on "mid",
Attend-and-Excite on cross-attention) run on it. Both halves are the library's real architectures
(``CLIPTextModel``, ``UNet2DConditionModel``, the SD 1.x block layout) at toy sizes, denoising in
pixel space: ``PixelCodec`` folds ``pixel_factor`` x ``pixel_factor`` pixel blocks into channels,
so a 32x32 scene is an 8x8x48 "latent" (the Flux world model's latent at the same factor). Sampling is
DDIM with the same code path as SD (``jdpt.diffusion.sd_pipeline.sd_generate``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdpt.diffusion.schedules import DDPMSchedule
from jdpt.diffusion.sd_pipeline import sd_generate
from jdpt.models.clip import CLIPTextConfig, CLIPTextModel
from jdpt.models.pixels import PixelCodec
from jdpt.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jdpt.world.model import config_fields, empty_prompt, text_tower_config
from jdpt.world.scenes import PROMPT_TOKENS, ShapesConfig, tokenize


@dataclasses.dataclass(frozen=True)
class UNetWorldConfig:
    """Sizes of the Shapes-world UNet model (the text width is the UNet's cross-attention width).

    Attributes:
        shapes: the world (image size, grid, vocabulary).
        width: hidden size of the text tower.
        heads: attention heads of the text tower and of every UNet attention.
        text_layers: CLIP text transformer layers.
        block_out_channels: UNet channels per resolution (each level but the last halves the
            size); every level has cross-attention.
        layers_per_block: resnets per down block (up blocks have one more, as in SD).
        pixel_factor: pixels per latent pixel along each axis (``PixelCodec``).
        beta_schedule: the DDPM noise schedule (cosine suits small images: Nichol & Dhariwal 2021).
    """

    arch: ClassVar[str] = "unet"
    shapes: ShapesConfig = ShapesConfig()
    width: int = 128
    heads: int = 4
    text_layers: int = 2
    block_out_channels: tuple[int, ...] = (64, 128)
    layers_per_block: int = 1
    pixel_factor: int = 4
    beta_schedule: str = "squaredcos_cap_v2"

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width={self.width} must be a multiple of heads={self.heads}")
        groups = self.norm_groups
        if any(c % groups or c % self.heads for c in self.block_out_channels):
            raise ValueError(f"block_out_channels={self.block_out_channels} must be multiples of the "
                             f"group-norm groups ({groups}) and of heads={self.heads}")
        factor = self.pixel_factor * 2 ** (len(self.block_out_channels) - 1)
        if self.shapes.image_size % factor:
            raise ValueError(f"image_size={self.shapes.image_size} must be a multiple of pixel_factor x "
                             f"2^(levels - 1) = {factor}")
        if self.text_layers < 1 or self.layers_per_block < 1:
            raise ValueError("text_layers and layers_per_block must be >= 1")
        DDPMSchedule(beta_schedule=self.beta_schedule)  # validates the name

    @property
    def norm_groups(self) -> int:
        return min(32, self.block_out_channels[0] // 4)

    def text_config(self) -> CLIPTextConfig:
        return text_tower_config(self.shapes, self.width, self.heads, self.text_layers)

    def unet_config(self) -> UNet2DConditionConfig:
        levels = len(self.block_out_channels)
        channels = self.codec().latent_channels
        return UNet2DConditionConfig(
            in_channels=channels, out_channels=channels, block_out_channels=self.block_out_channels,
            down_block_types=("CrossAttnDownBlock2D",) * levels, up_block_types=("CrossAttnUpBlock2D",) * levels,
            layers_per_block=self.layers_per_block, cross_attention_dim=self.width,
            attention_head_dim=self.heads, norm_num_groups=self.norm_groups,
            sample_size=self.shapes.image_size // self.pixel_factor,
        )

    def schedule(self) -> DDPMSchedule:
        """The training schedule; sampling uses it with DDIM (``trailing`` spacing: every run of
        few steps starts at the last training level, pure noise)."""
        return DDPMSchedule(beta_schedule=self.beta_schedule, timestep_spacing="trailing")

    def codec(self) -> PixelCodec:
        return PixelCodec(factor=self.pixel_factor)

    def latents(self, images):
        """uint8 scenes ``[B, H, W, 3]`` -> the clean pixel latents ``x0`` ``[B, h, w, C]`` the model
        denoises (NumPy or JAX, as given)."""
        return self.codec().encode_latents(images.astype(np.float32) / 127.5 - 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> UNetWorldConfig:
        return cls(**config_fields(raw))

    def build(self, rngs: nnx.Rngs) -> UNetWorldModel:
        return UNetWorldModel(self, rngs=rngs)


class UNetWorldModel(nnx.Module):
    """Text tower + UNet + pixel codec. ``__call__`` predicts the noise of NHWC pixel latents."""

    denoiser_name = "unet"

    def __init__(self, config: UNetWorldConfig, *, rngs: nnx.Rngs | None,
                 text_encoder: CLIPTextModel | None = None, unet: UNet2DConditionModel | None = None):
        self.config = config
        self.text_encoder = text_encoder if text_encoder is not None else CLIPTextModel(config.text_config(),
                                                                                        rngs=rngs)
        self.unet = unet if unet is not None else UNet2DConditionModel(config.unet_config(), rngs=rngs)

    def encode_prompts(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[B, L]`` token ids -> (``[B, L, width]`` token states, ``[B, width]`` pooled)."""
        out = self.text_encoder(input_ids)
        return out.last_hidden_state, out.pooler_output

    def __call__(self, x_t: jax.Array, t: jax.Array, context: jax.Array, pooled: jax.Array | None = None,
                 plans=None) -> jax.Array:
        """Noise ``[B, h, w, C]`` predicted for pixel latents ``x_t`` at timesteps ``t`` ``[B]``
        (``pooled`` is unused: an SD 1.x UNet reads the token states only)."""
        return self.unet(x_t, t, context, plans=plans)

    def latents(self, images: jax.Array) -> jax.Array:
        """uint8 scenes ``[B, H, W, 3]`` -> the clean pixel latents ``x0`` ``[B, h, w, C]`` it denoises."""
        return self.config.latents(images)

    def generate(self, input_ids: jax.Array, key: jax.Array, *, steps: int, cfg_scale: float,
                 latents: jax.Array | None = None) -> jax.Array:
        """uint8 images ``[B, H, W, 3]`` for token ids ``[B, L]`` by DDIM (jit with ``steps`` and
        ``cfg_scale`` static). ``cfg_scale > 1`` guides against the empty prompt."""
        context, _ = self.encode_prompts(input_ids)
        negative = None
        if cfg_scale > 1:
            empty = jnp.broadcast_to(jnp.asarray(empty_prompt(input_ids.shape[1])), input_ids.shape)
            negative, _ = self.encode_prompts(empty)
        size = self.config.shapes.image_size
        return sd_generate(self.unet, self.config.codec(), context, schedule=self.config.schedule(),
                           negative_prompt_embeds=negative, key=None if latents is not None else key,
                           latents=latents, height=size, width=size, num_inference_steps=steps,
                           guidance_scale=cfg_scale)

    def tokenize(self, texts) -> np.ndarray:
        """Prompt texts -> ``int32 [B, PROMPT_TOKENS]`` ids (unknown words: ValueError)."""
        return tokenize(texts, self.config.shapes, PROMPT_TOKENS)
