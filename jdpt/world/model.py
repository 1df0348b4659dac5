"""The Shapes world's text-to-image model: a tiny CLIP text tower + a tiny Flux, in pixel space.

Both halves are the library's real architectures (``CLIPTextModel``, ``FluxTransformer``) at
toy sizes, so every post-training method that runs on them runs unchanged on the full-size
models. Images are denoised directly in pixel space: ``PixelCodec`` folds ``pixel_factor`` x
``pixel_factor`` pixel blocks into channels and Flux packs 2x2 of those into a token, so a token
is ``2 * pixel_factor`` pixels square with ``12 * pixel_factor**2`` channels: with the presets'
``pixel_factor=4`` a 32x32 scene is 16 tokens of 192 channels, which the transformer (width 128)
denoises by predicting the clean tokens (``prediction="sample"``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdpt.diffusion.pipeline import flux_generate
from jdpt.diffusion.schedules import FLOW_PREDICTIONS, flow_sigmas, flow_velocity
from jdpt.models.clip import CLIPTextConfig, CLIPTextModel
from jdpt.models.flux import FluxConfig, FluxTransformer, image_ids, pack_latents
from jdpt.models.pixels import PixelCodec
from jdpt.world.scenes import BOS_ID, EOS_ID, PAD_ID, PROMPT_TOKENS, ShapesConfig, tokenize, vocabulary

# Sampling defaults of the Shapes world. No guidance by default: measured on the default base
# model (experiments/results/pretrain_shapes_default.md), CFG 1.5 and 4 raise GenEval-lite from
# 0.253 to 0.297, within the noise of 64 prompts per category (a difference needs about 0.06),
# and the guidance methods are measured against the unguided sampler. The models learn the
# unconditional velocity (10% empty prompts), so guidance methods have it to work with.
SAMPLING_STEPS = 20
CFG_SCALE = 1.0


def text_tower_config(shapes: ShapesConfig, width: int, heads: int, layers: int) -> CLIPTextConfig:
    """The Shapes world's CLIP text tower: its vocabulary, ``PROMPT_TOKENS`` positions."""
    return CLIPTextConfig(
        vocab_size=len(vocabulary(shapes)), hidden_size=width, intermediate_size=2 * width,
        projection_dim=None, num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=PROMPT_TOKENS, hidden_act="gelu", pad_token_id=PAD_ID,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )


def config_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """A world config's ``to_dict`` form back to constructor arguments (JSON lists -> tuples)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k not in ("arch", "shapes")}
    shapes = {k: tuple(v) if isinstance(v, list) else v for k, v in raw["shapes"].items()}
    return {**fields, "shapes": ShapesConfig(**shapes)}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Sizes of the Shapes-world model (text tower and Flux share the width).

    Attributes:
        shapes: the world (image size, grid, vocabulary).
        width: hidden size of the text tower and of Flux (``heads * head_dim``).
        heads: attention heads in both.
        text_layers: CLIP text transformer layers.
        double_layers / single_layers: Flux double- and single-stream blocks.
        pixel_factor: pixels per latent pixel along each axis (``PixelCodec``).
        shift: static shift of the sampling schedule (1.0 = the plain linear grid).
        noise_mean: training noise levels are ``sigmoid(N(noise_mean, 1))``, SD3's logit-normal
            sampling (Esser et al. 2024); a positive mean trains more at high noise, where the
            scene's layout is decided.
        prediction: what Flux outputs: ``"velocity"`` (as the full-size Flux) or ``"sample"``
            (the clean tokens ``x0``; the model's velocity is derived from it by
            :func:`jdpt.diffusion.schedules.flow_velocity`, and training still regresses the
            velocity). In pixel space a token has more channels than a small transformer is wide;
            an ``x0`` prediction lies on the low-dimensional manifold of clean scenes while a
            velocity must carry the token's full-rank noise through that bottleneck (Li & He 2025,
            "Back to Basics: Let Denoising Generative Models Denoise").
    """

    arch: ClassVar[str] = "flux"
    shapes: ShapesConfig = ShapesConfig()
    width: int = 128
    heads: int = 4
    text_layers: int = 2
    double_layers: int = 2
    single_layers: int = 2
    pixel_factor: int = 2
    shift: float = 1.0
    prediction: str = "velocity"
    noise_mean: float = 0.0

    def __post_init__(self):
        if self.prediction not in FLOW_PREDICTIONS:
            raise ValueError(f"prediction={self.prediction!r}: choose one of {FLOW_PREDICTIONS}")
        head_dim, rem = divmod(self.width, self.heads)
        if rem or head_dim % 8:
            raise ValueError(
                f"width={self.width} / heads={self.heads}: the head size must be a multiple of 8 "
                "(Flux splits it over three even RoPE axes); e.g. width=128, heads=4"
            )
        patch = 2 * self.pixel_factor
        if self.shapes.image_size % patch:
            raise ValueError(
                f"image_size={self.shapes.image_size} must be a multiple of 2 * pixel_factor = {patch} "
                "(Flux packs 2x2 latent pixels per token)"
            )
        for name in ("text_layers", "double_layers", "single_layers"):
            if getattr(self, name) < (1 if name == "text_layers" else 0):
                raise ValueError(f"{name}={getattr(self, name)} must be >= {1 if name == 'text_layers' else 0}")

    def text_config(self) -> CLIPTextConfig:
        return text_tower_config(self.shapes, self.width, self.heads, self.text_layers)

    def flux_config(self) -> FluxConfig:
        head_dim = self.width // self.heads
        a = head_dim // 4 // 2 * 2
        b = (head_dim - a) // 2 // 2 * 2
        return FluxConfig(
            in_channels=4 * self.codec().latent_channels, num_layers=self.double_layers,
            num_single_layers=self.single_layers, attention_head_dim=head_dim,
            num_attention_heads=self.heads, joint_attention_dim=self.width,
            pooled_projection_dim=self.width, guidance_embeds=False, axes_dims_rope=(a, b, head_dim - a - b),
        )

    def codec(self) -> PixelCodec:
        return PixelCodec(factor=self.pixel_factor)

    def latents(self, images):
        """uint8 scenes ``[B, H, W, 3]`` -> the clean packed tokens ``x0`` ``[B, N, C]`` the model
        denoises (NumPy in, NumPy out; JAX in, JAX out: the map is a reshape)."""
        return pack_latents(self.codec().encode_latents(images.astype(np.float32) / 127.5 - 1.0))

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WorldConfig:
        return cls(**config_fields(raw))

    def build(self, rngs: nnx.Rngs) -> WorldModel:
        return WorldModel(self, rngs=rngs)


class WorldModel(nnx.Module):
    """Text tower + Flux + pixel codec. ``__call__`` predicts the flow velocity of packed tokens."""

    denoiser_name = "transformer"

    def __init__(self, config: WorldConfig, *, rngs: nnx.Rngs,
                 text_encoder: CLIPTextModel | None = None, transformer: FluxTransformer | None = None):
        self.config = config
        if text_encoder is None:
            text_encoder = CLIPTextModel(config.text_config(), rngs=rngs)
        if transformer is None:
            transformer = FluxTransformer(config.flux_config(), rngs=rngs)
        self.text_encoder, self.transformer = text_encoder, transformer
        size = config.shapes.image_size // config.pixel_factor
        self.latent_size = (size, size)

    def encode_prompts(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``[B, L]`` token ids -> (``[B, L, width]`` token states, ``[B, width]`` pooled)."""
        out = self.text_encoder(input_ids)
        return out.last_hidden_state, out.pooler_output

    def __call__(self, tokens: jax.Array, sigma: jax.Array, context: jax.Array, pooled: jax.Array,
                 plans=None) -> jax.Array:
        """Velocity ``[B, N, C]`` of packed noisy tokens at noise level ``sigma`` ``[B]``."""
        out = self.transformer(tokens, context, pooled, sigma, image_ids(*self.latent_size),
                               jnp.zeros((context.shape[1], 3), jnp.float32), plans=plans)
        return flow_velocity(out, tokens, sigma, self.config.prediction)

    def latents(self, images: jax.Array) -> jax.Array:
        """uint8 scenes ``[B, H, W, 3]`` -> the clean packed tokens ``x0`` ``[B, N, C]`` it denoises."""
        return self.config.latents(images)

    def generate(self, input_ids: jax.Array, key: jax.Array, *, steps: int = SAMPLING_STEPS,
                 cfg_scale: float = CFG_SCALE, latents: jax.Array | None = None, guidance=None) -> jax.Array:
        """uint8 images ``[B, H, W, 3]`` for token ids ``[B, L]`` (jit with ``steps`` and
        ``cfg_scale`` static). ``cfg_scale > 1`` guides against the empty prompt; a
        ``jdpt.guidance`` method ``guidance`` (CFG-Zero*, PAG, SEG, ...) replaces ``cfg_scale``,
        its ``"uncond"`` branch being the empty prompt."""
        context, pooled = self.encode_prompts(input_ids)
        negative = {}
        uncond = "uncond" in guidance.branches if guidance is not None else cfg_scale > 1
        if uncond:
            empty = jnp.broadcast_to(jnp.asarray(empty_prompt(input_ids.shape[1])), input_ids.shape)
            neg_context, neg_pooled = self.encode_prompts(empty)
            negative = dict(negative_prompt_embeds=neg_context, negative_pooled_prompt_embeds=neg_pooled,
                            true_cfg_scale=cfg_scale)
        size = self.config.shapes.image_size
        return flux_generate(self.transformer, self.config.codec(), context, pooled,
                             key=None if latents is not None else key, latents=latents,
                             height=size, width=size,
                             sigmas=flow_sigmas(steps, shift=self.config.shift), guidance=guidance,
                             prediction=self.config.prediction, **negative)

    def tokenize(self, texts) -> np.ndarray:
        """Prompt texts -> ``int32 [B, PROMPT_TOKENS]`` ids (unknown words: ValueError)."""
        return tokenize(texts, self.config.shapes, PROMPT_TOKENS)


def empty_prompt(length: int = PROMPT_TOKENS) -> np.ndarray:
    """Token ids ``[length]`` of the empty prompt (BOS, EOS, padding): the unconditional input."""
    ids = np.full((length,), PAD_ID, np.int32)
    ids[:2] = (BOS_ID, EOS_ID)
    return ids
