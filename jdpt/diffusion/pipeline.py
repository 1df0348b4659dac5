"""Functional image generation: prompt embeddings + a key -> uint8 images, one jitted call.

``flux_generate`` reproduces diffusers' ``FluxPipeline.__call__`` given ``prompt_embeds`` and
``pooled_prompt_embeds`` (Euler flow ODE with Flux's resolution-dependent shift, guidance
embedding for guidance-distilled models, VAE decode with scaling and shift factors).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdpt.diffusion.branches import Guidance, stack_branches, step_index
from jdpt.diffusion.samplers import euler_flow
from jdpt.diffusion.schedules import flow_sigmas, flow_velocity, flux_mu
from jdpt.models.flux import FluxTransformer, image_ids, unpack_latents
from jdpt.models.pixels import PixelCodec
from jdpt.models.vae import AutoencoderKL

ImageCodec = AutoencoderKL | PixelCodec


def to_uint8(images: jax.Array) -> jax.Array:
    """``[-1, 1]`` float images -> uint8 ``[0, 255]`` (diffusers' post-processing)."""
    return jnp.round(jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)


def flux_latent_size(vae: ImageCodec, height: int, width: int) -> tuple[int, int]:
    """Latent height and width for an image size (even, as Flux packs 2x2 patches)."""
    factor = vae.downsample_factor
    return 2 * (height // (factor * 2)), 2 * (width // (factor * 2))


def flux_generate(
    transformer: FluxTransformer,
    vae: ImageCodec,
    prompt_embeds: jax.Array,
    pooled_prompt_embeds: jax.Array,
    *,
    key: jax.Array | None = None,
    latents: jax.Array | None = None,
    height: int = 1024,
    width: int = 1024,
    num_inference_steps: int = 28,
    guidance_scale: float = 3.5,
    negative_prompt_embeds: jax.Array | None = None,
    negative_pooled_prompt_embeds: jax.Array | None = None,
    true_cfg_scale: float = 1.0,
    sigmas: jax.Array | None = None,
    guidance: Guidance | None = None,
    prediction: str = "velocity",
) -> jax.Array:
    """Sample images with a Flux transformer (jit this function; models are pytrees).

    Args:
        vae: ``AutoencoderKL`` or any codec with ``downsample_factor`` and ``decode_latents``
            (``PixelCodec`` for pixel-space models).
        prompt_embeds: ``[B, S_txt, joint_attention_dim]`` (T5 tokens).
        pooled_prompt_embeds: ``[B, pooled_projection_dim]`` (pooled CLIP).
        key: PRNG key for the initial noise (or pass ``latents``).
        latents: initial packed noise ``[B, S_img, in_channels]`` instead of ``key``.
        guidance_scale: embedded guidance (used only by guidance-distilled models).
        negative_prompt_embeds, negative_pooled_prompt_embeds: the unconditional (negative)
            prompt, same shapes as the positive ones; with ``true_cfg_scale > 1`` every step
            uses classifier-free guidance ``v_neg + true_cfg_scale * (v_pos - v_neg)``
            (diffusers' ``true_cfg_scale``), both branches in one batched forward.
        sigmas: ``[N + 1]`` noise levels overriding the default schedule (Flux's
            resolution-dependent shift over ``num_inference_steps`` steps).
        guidance: a ``jdpt.guidance`` method (CFG-Zero*, PAG, SEG, ...) replacing
            ``true_cfg_scale``: one forward over its branches with its attention plans, then its
            combination (``timestep = sigma * 1000``); the negative embeddings are needed exactly
            when its branches include ``"uncond"``.
        prediction: what the transformer outputs, ``"velocity"`` (Flux) or ``"sample"`` (``x0``,
            turned into a velocity by :func:`jdpt.diffusion.schedules.flow_velocity`).
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
    has_negative = (negative_prompt_embeds is not None, negative_pooled_prompt_embeds is not None)
    if any(has_negative) and not all(has_negative):
        raise ValueError("pass both negative_prompt_embeds and negative_pooled_prompt_embeds, or neither")
    cfg = true_cfg_scale > 1 and all(has_negative)
    if guidance is not None:
        cfg = "uncond" in guidance.branches
        if cfg and not all(has_negative):
            raise ValueError(f"guidance with branches {guidance.branches} needs negative_prompt_embeds and "
                             "negative_pooled_prompt_embeds (the unconditional prompt's embeddings)")
    elif true_cfg_scale > 1 and not cfg:
        raise ValueError(
            f"true_cfg_scale={true_cfg_scale} needs negative_prompt_embeds and "
            "negative_pooled_prompt_embeds (the unconditional prompt's embeddings)"
        )
    dtype = transformer.x_embedder.kernel.get_value().dtype
    if sigmas is None:
        sigmas = flow_sigmas(num_inference_steps, mu=flux_mu(n_img))
    img_ids = image_ids(lh, lw)
    txt_ids = jnp.zeros((prompt_embeds.shape[1], 3), jnp.float32)
    context, pooled = prompt_embeds.astype(dtype), pooled_prompt_embeds.astype(dtype)
    if cfg or guidance is not None:
        if cfg and negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds {negative_prompt_embeds.shape} must match prompt_embeds "
                f"{prompt_embeds.shape} (pad both prompts to the same token length)"
            )
        branches = guidance.branches if guidance is not None else ("uncond", "cond")
        context = stack_branches(branches, context, negative_prompt_embeds.astype(dtype) if cfg else None)
        pooled = stack_branches(branches, pooled, negative_pooled_prompt_embeds.astype(dtype) if cfg else None)
    n = context.shape[0]
    plans = None if guidance is None else guidance.plans(transformer, b, (lh, lw))
    sigmas = jnp.asarray(sigmas, jnp.float32)
    embedded_guidance = jnp.full((n,), guidance_scale, jnp.float32) if transformer.config.guidance_embeds else None

    def velocity(x, sigma):
        x = jnp.concatenate([x] * (n // b))
        v = transformer(x, context, pooled, jnp.full((n,), sigma), img_ids, txt_ids, embedded_guidance,
                        plans=plans)
        v = flow_velocity(v, x, sigma, prediction)
        if guidance is not None:
            return guidance.combine(v, step=step_index(sigmas[:-1], sigma), timestep=sigma * 1000)
        if cfg:
            v_neg, v_pos = jnp.split(v.astype(jnp.float32), 2)
            v = v_neg + true_cfg_scale * (v_pos - v_neg)
        return v

    tokens = euler_flow(velocity, latents.astype(dtype), sigmas)
    z = unpack_latents(tokens, lh, lw)
    return to_uint8(vae.decode_latents(z))
