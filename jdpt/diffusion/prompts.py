"""Text prompts -> Flux conditioning, and text-to-image sampling from a loaded pipeline.

``encode_flux_prompt`` reproduces diffusers' ``FluxPipeline.encode_prompt`` (the same prompt
for both encoders): the pooled vector is CLIP's ``pooler_output`` over the prompt padded to the
CLIP tokenizer's ``model_max_length`` (77), the sequence is T5's ``last_hidden_state`` over the
prompt padded to ``max_sequence_length``. Neither encoder gets an attention mask, as in diffusers:
padding tokens are attended to (and T5's padding positions carry embeddings the transformer sees).
Tokenization runs in Python (Hugging Face tokenizers); the encoders and the sampler run jitted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jdpt.diffusion.pipeline import flux_generate, flux_latent_size
from jdpt.weights.pipelines import FluxPipelineParts

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # the longest T5 sequence FluxPipeline accepts


def tokenize_flux_prompt(prompts: str | Sequence[str], *, clip_tokenizer: Any, t5_tokenizer: Any,
                         max_sequence_length: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Token ids as ``FluxPipeline`` makes them (padded to full length, truncated, no mask).

    Returns:
        ``clip_ids [B, clip_tokenizer.model_max_length]`` and ``t5_ids [B, max_sequence_length]``,
        int32. Prompts longer than that are truncated, with a logged warning (as diffusers does).
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty list of strings; got {prompts!r}")
    if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"max_sequence_length={max_sequence_length} must be in [1, "
                         f"{MAX_SEQUENCE_LENGTH}] (the T5 length Flux was trained with; 256 for schnell)")
    clip_ids = _token_ids(clip_tokenizer, prompts, clip_tokenizer.model_max_length, "CLIP")
    t5_ids = _token_ids(t5_tokenizer, prompts, max_sequence_length, "T5")
    return clip_ids, t5_ids


def _token_ids(tokenizer: Any, prompts: list[str], length: int, what: str) -> np.ndarray:
    ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                    return_tensors="np").input_ids
    cut = [p for p, full in zip(prompts, tokenizer(prompts).input_ids) if len(full) > length]
    if cut:
        logger.warning("%s keeps %d tokens of a prompt; truncated: %s", what, length, cut)
    return ids.astype(np.int32)


@jax.jit
def embed_flux_tokens(clip, t5, clip_ids: jax.Array, t5_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(prompt_embeds [B, L, t5.d_model], pooled [B, clip.hidden_size])`` from token ids
    (``clip_ids [B, 77]``, ``t5_ids [B, L]``); jitted."""
    return t5(t5_ids).last_hidden_state, clip(clip_ids).pooler_output


def encode_flux_prompt(prompts: str | Sequence[str], *, clip, clip_tokenizer: Any, t5,
                       t5_tokenizer: Any, max_sequence_length: int = 512) -> tuple[jax.Array, jax.Array]:
    """Prompts -> Flux conditioning, as diffusers' ``FluxPipeline.encode_prompt(prompt)``.

    Args:
        prompts: one prompt or ``B`` prompts.
        clip: ``jdpt.models.clip.CLIPTextModel``; ``clip_tokenizer`` its tokenizer, whose
            ``model_max_length`` (77) must fit ``clip.config.max_position_embeddings``.
        t5: ``jdpt.models.t5.T5EncoderModel``; ``t5_tokenizer`` its tokenizer.
        max_sequence_length: T5 tokens, at most 512 (Flux.1-dev 512, schnell 256).

    Returns:
        ``prompt_embeds [B, max_sequence_length, d_model]`` and ``pooled [B, hidden_size]`` in
        the encoders' parameter dtypes.
    """
    limit = clip.config.max_position_embeddings
    if clip_tokenizer.model_max_length > limit:
        raise ValueError(
            f"clip_tokenizer.model_max_length={clip_tokenizer.model_max_length} exceeds the CLIP "
            f"model's max_position_embeddings={limit}; set clip_tokenizer.model_max_length = {limit}"
        )
    clip_ids, t5_ids = tokenize_flux_prompt(prompts, clip_tokenizer=clip_tokenizer,
                                            t5_tokenizer=t5_tokenizer,
                                            max_sequence_length=max_sequence_length)
    return embed_flux_tokens(clip, t5, clip_ids, t5_ids)


def flux_text_to_image(parts: FluxPipelineParts, prompts: str | Sequence[str], *,
                       key: jax.Array | None = None, latents: jax.Array | None = None,
                       height: int = 1024, width: int = 1024, num_inference_steps: int = 28,
                       guidance_scale: float = 3.5, max_sequence_length: int = 512) -> jax.Array:
    """Sample images for text prompts, as diffusers' ``FluxPipeline(prompt, ...)``.

    Args:
        parts: a loaded pipeline (``jdpt.weights.pipelines.load_flux_pipeline``).
        prompts: one prompt or ``B`` prompts.
        key: PRNG key for the initial noise, or ``latents``: the packed noise
            ``[B, (H/16) * (W/16), in_channels]`` (diffusers' ``latents=``).
        height, width: image size, multiples of 16.
        guidance_scale: embedded guidance (only guidance-distilled models, e.g. Flux.1-dev).
        max_sequence_length: T5 tokens, at most 512.

    Returns:
        ``[B, height, width, 3]`` uint8 images. The sigma schedule follows the folder's
        ``scheduler_config.json`` (dynamic shifting for dev, ``shift`` for schnell).
    """
    factor = 2 * parts.vae.downsample_factor
    if height % factor or width % factor:
        raise ValueError(f"height={height} and width={width} must be multiples of {factor} "
                         "(the VAE's downsampling times Flux's 2x2 packing)")
    encoded = encode_flux_prompt(prompts, clip=parts.clip, clip_tokenizer=parts.clip_tokenizer,
                                 t5=parts.t5, t5_tokenizer=parts.t5_tokenizer,
                                 max_sequence_length=max_sequence_length)
    lh, lw = flux_latent_size(parts.vae, height, width)
    sigmas = parts.scheduler.sigmas(num_inference_steps, (lh // 2) * (lw // 2))
    return _generate(parts.transformer, parts.vae, *encoded, key=key, latents=latents,
                     height=height, width=width, num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale, sigmas=sigmas)


_generate = jax.jit(flux_generate, static_argnames=("height", "width", "num_inference_steps",
                                                    "true_cfg_scale"))
