"""Functional image generation: prompt embeddings + a key -> uint8 images, one jitted call.

``flux_generate`` reproduces diffusers' ``FluxPipeline.__call__`` given ``prompt_embeds`` and
``pooled_prompt_embeds`` (Euler flow ODE with Flux's resolution-dependent shift, guidance
embedding for guidance-distilled models, VAE decode with scaling and shift factors).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdpt.diffusion.samplers import euler_flow
from jdpt.diffusion.schedules import flow_sigmas, flux_mu
from jdpt.models.flux import FluxTransformer, image_ids, pack_latents, unpack_latents
from jdpt.models.vae import AutoencoderKL


def to_uint8(images: jax.Array) -> jax.Array:
    """``[-1, 1]`` float images -> uint8 ``[0, 255]`` (diffusers' post-processing)."""
    return jnp.round(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)


def flux_latent_size(vae: AutoencoderKL, height: int, width: int) -> tuple[int, int]:
    """Latent height and width for an image size (even, as Flux packs 2x2 patches)."""
    factor = vae.config.downsample_factor
    return 2 * (height // (factor * 2)), 2 * (width // (factor * 2))


def flux_generate(
    transformer: FluxTransformer,
    vae: AutoencoderKL,
    prompt_embeds: jax.Array,
    pooled_prompt_embeds: jax.Array,
    *,
    key: jax.Array | None = None,
    latents: jax.Array | None = None,
    height: int = 1024,
    width: int = 1024,
    num_inference_steps: int = 28,
    guidance_scale: float = 3.5,
) -> jax.Array:
    """Sample images with a Flux transformer (jit this function; models are pytrees).

    Args:
        prompt_embeds: ``[B, S_txt, joint_attention_dim]`` (T5 tokens).
        pooled_prompt_embeds: ``[B, pooled_projection_dim]`` (pooled CLIP).
        key: PRNG key for the initial noise (or pass ``latents``).
        latents: initial packed noise ``[B, S_img, in_channels]`` instead of ``key``.
        guidance_scale: embedded guidance (used only by guidance-distilled models).
    Returns:
        ``[B, height, width, 3]`` uint8 images.
    """
    b = prompt_embeds.shape[0]
    lh, lw = flux_latent_size(vae, height, width)
    n_img = (lh // 2) * (lw // 2)
    shape = (b, n_img, transformer.config.in_channels)
    if latents is None:
        if key is None:
            raise ValueError("pass key= (a jax.random key) or latents= for the initial noise")
        latents = jax.random.normal(key, shape, jnp.float32)
    elif latents.shape != shape:
        raise ValueError(f"latents must be packed noise {shape} for a {height}x{width} image; got {latents.shape}")
    dtype = transformer.x_embedder.kernel.get_value().dtype
    sigmas = flow_sigmas(num_inference_steps, mu=flux_mu(n_img))
    img_ids = image_ids(lh, lw)
    txt_ids = jnp.zeros((prompt_embeds.shape[1], 3), jnp.float32)
    guidance = jnp.full((b,), guidance_scale, jnp.float32) if transformer.config.guidance_embeds else None

    def velocity(x, sigma):
        return transformer(x, prompt_embeds.astype(dtype), pooled_prompt_embeds.astype(dtype),
                           jnp.full((b,), sigma), img_ids, txt_ids, guidance)

    tokens = euler_flow(velocity, latents.astype(dtype), sigmas)
    z = unpack_latents(tokens, lh, lw)
    return to_uint8(vae.decode_latents(z))
