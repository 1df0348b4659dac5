"""Text prompts -> conditioning of Flux, SD 1.x, SDXL and SD3, and text-to-image sampling from a
loaded Flux pipeline.

``encode_flux_prompt`` reproduces diffusers' ``FluxPipeline.encode_prompt`` (the same prompt
for both encoders): the pooled vector is CLIP's ``pooler_output`` over the prompt padded to the
CLIP tokenizer's ``model_max_length`` (77), the sequence is T5's ``last_hidden_state`` over the
prompt padded to ``max_sequence_length``. Neither encoder gets an attention mask, as in diffusers:
padding tokens are attended to (and T5's padding positions carry embeddings the transformer sees).

``encode_sd_prompt``, ``encode_sdxl_prompt`` and ``encode_sd3_prompt`` reproduce the
``encode_prompt`` of diffusers' ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` and
``StableDiffusion3Pipeline`` with classifier-free guidance (negative embeddings included):

- SD 1.x: CLIP's ``last_hidden_state``; ``clip_skip=k`` takes the output ``k`` layers before the
  last, through the final layer norm.
- SDXL: the penultimate hidden states (not normed; ``clip_skip=k`` goes ``k`` layers further back)
  of CLIP-L and CLIP-G concatenated on features; pooled = CLIP-G's ``text_embeds``. Without a
  negative prompt the negative embeddings are zeros (``force_zeros_for_empty_prompt``).
- SD3: the same CLIP-L/CLIP-G concatenation zero-padded to T5's width, followed on the sequence
  axis by T5's ``last_hidden_state`` (zeros of ``joint_attention_dim`` without T5); pooled = both
  ``text_embeds`` concatenated.

Negative prompts always use ``clip_skip=None``, as in diffusers. A second/third prompt left out
(or empty) falls back to the first, as in diffusers; one string is used for every prompt.
Tokenization runs in Python (Hugging Face tokenizers, ``tokenize_*``); the encoders run jitted
(``embed_*``, pure); ``encode_*`` composes both.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jdpt.diffusion.pipeline import flux_generate, flux_latent_size
from jdpt.diffusion.pipeline_parts import FluxPipelineParts
from jdpt.models.clip import CLIPTextModelWithProjection, CLIPTextOutput

logger = logging.getLogger(__name__)

MAX_SEQUENCE_LENGTH = 512  # the longest T5 sequence FluxPipeline accepts


def tokenize_flux_prompt(prompts: str | Sequence[str], *, clip_tokenizer: Any, t5_tokenizer: Any,
                         max_sequence_length: int = 512,
                         prompts_2: str | Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids as ``FluxPipeline`` makes them (padded to full length, truncated, no mask).

    ``prompts`` go to CLIP and ``prompts_2`` (default: the same prompts) to T5, as diffusers'
    ``prompt`` / ``prompt_2``; one string is used for every prompt.

    Returns:
        ``clip_ids [B, clip_tokenizer.model_max_length]`` and ``t5_ids [B, max_sequence_length]``,
        int32. Prompts longer than that are truncated, with a logged warning (as diffusers does).
    """
    prompts = _prompt_list(prompts, "prompts")
    prompts_2 = prompts if prompts_2 is None else _batch_of(prompts_2, len(prompts), "prompts_2")
    if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"max_sequence_length={max_sequence_length} must be in [1, "
                         f"{MAX_SEQUENCE_LENGTH}] (the T5 length Flux was trained with; 256 for schnell)")
    clip_ids = _token_ids(clip_tokenizer, prompts, clip_tokenizer.model_max_length, "CLIP")
    t5_ids = _token_ids(t5_tokenizer, prompts_2, max_sequence_length, "T5")
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
                       t5_tokenizer: Any, max_sequence_length: int = 512,
                       prompts_2: str | Sequence[str] | None = None) -> tuple[jax.Array, jax.Array]:
    """Prompts -> Flux conditioning, as diffusers' ``FluxPipeline.encode_prompt(prompt, prompt_2)``.

    Args:
        prompts: one prompt or ``B`` prompts (CLIP's; and T5's unless ``prompts_2`` is given).
        clip: ``jdpt.models.clip.CLIPTextModel``; ``clip_tokenizer`` its tokenizer, whose
            ``model_max_length`` (77) must fit ``clip.config.max_position_embeddings``.
        t5: ``jdpt.models.t5.T5EncoderModel``; ``t5_tokenizer`` its tokenizer.
        max_sequence_length: T5 tokens, at most 512 (Flux.1-dev 512, schnell 256).
        prompts_2: the T5 prompts (diffusers' ``prompt_2``), one string or ``B``.

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
                                            max_sequence_length=max_sequence_length, prompts_2=prompts_2)
    return embed_flux_tokens(clip, t5, clip_ids, t5_ids)


def flux_text_to_image(parts: FluxPipelineParts, prompts: str | Sequence[str], *,
                       key: jax.Array | None = None, latents: jax.Array | None = None,
                       height: int = 1024, width: int = 1024, num_inference_steps: int = 28,
                       guidance_scale: float = 3.5, max_sequence_length: int = 512,
                       prompts_2: str | Sequence[str] | None = None,
                       negative_prompts: str | Sequence[str] | None = None,
                       negative_prompts_2: str | Sequence[str] | None = None,
                       true_cfg_scale: float = 1.0) -> jax.Array:
    """Sample images for text prompts, as diffusers' ``FluxPipeline(prompt, ...)``.

    Args:
        parts: a loaded pipeline (``jdpt.diffusion.pipeline_parts.load_flux_pipeline``).
        prompts: one prompt or ``B`` prompts; ``prompts_2`` the T5 prompts (default: the same).
        key: PRNG key for the initial noise, or ``latents``: the packed noise
            ``[B, (H/16) * (W/16), in_channels]`` (diffusers' ``latents=``).
        height, width: image size, multiples of 16.
        guidance_scale: embedded guidance (only guidance-distilled models, e.g. Flux.1-dev).
        max_sequence_length: T5 tokens, at most 512.
        negative_prompts, negative_prompts_2: the negative prompt (one string or ``B``) for
            classifier-free guidance; ``negative_prompts_2`` defaults to ``negative_prompts``.
        true_cfg_scale: with ``> 1``, every step uses ``v_neg + true_cfg_scale * (v - v_neg)``
            (diffusers' "true CFG"); it needs ``negative_prompts`` (an error otherwise, where
            diffusers would silently sample without guidance).

    Returns:
        ``[B, height, width, 3]`` uint8 images. The sigma schedule follows the folder's
        ``scheduler_config.json`` (dynamic shifting for dev, ``shift`` for schnell).
    """
    factor = 2 * parts.vae.downsample_factor
    if height % factor or width % factor:
        raise ValueError(f"height={height} and width={width} must be multiples of {factor} "
                         "(the VAE's downsampling times Flux's 2x2 packing)")
    if true_cfg_scale > 1 and negative_prompts is None:
        raise ValueError(f"true_cfg_scale={true_cfg_scale} needs negative_prompts (use \"\" for the "
                         "unconditional prompt), or leave true_cfg_scale at 1")
    if negative_prompts is not None and true_cfg_scale <= 1:
        raise ValueError("negative_prompts are used only with true_cfg_scale > 1; set true_cfg_scale "
                         "(e.g. 4.0) or drop the negative prompts")
    kw = dict(clip=parts.clip, clip_tokenizer=parts.clip_tokenizer, t5=parts.t5,
              t5_tokenizer=parts.t5_tokenizer, max_sequence_length=max_sequence_length)
    encoded = encode_flux_prompt(prompts, prompts_2=prompts_2, **kw)
    negative = {}
    if true_cfg_scale > 1:
        batch = encoded[0].shape[0]
        negative_prompts = _batch_of(negative_prompts, batch, "negative_prompts")
        if negative_prompts_2 is not None:
            negative_prompts_2 = _batch_of(negative_prompts_2, batch, "negative_prompts_2")
        neg_embeds, neg_pooled = encode_flux_prompt(negative_prompts, prompts_2=negative_prompts_2, **kw)
        negative = dict(negative_prompt_embeds=neg_embeds, negative_pooled_prompt_embeds=neg_pooled,
                        true_cfg_scale=true_cfg_scale)
    lh, lw = flux_latent_size(parts.vae, height, width)
    sigmas = parts.scheduler.sigmas(num_inference_steps, (lh // 2) * (lw // 2))
    return _generate(parts.transformer, parts.vae, *encoded, key=key, latents=latents,
                     height=height, width=width, num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale, sigmas=sigmas, **negative)


_generate = jax.jit(flux_generate, static_argnames=("height", "width", "num_inference_steps",
                                                    "true_cfg_scale"))


# Stable Diffusion 1.x, SDXL and SD3 ------------------------------------------------------------

Prompts = str | Sequence[str]


@struct.dataclass
class PromptEmbeds:
    """Conditioning with a pooled vector (SDXL, SD3), named as diffusers' ``encode_prompt`` outputs.

    Attributes:
        prompt_embeds: ``[B, L, D]`` token embeddings.
        pooled_prompt_embeds: ``[B, P]`` pooled vector.
        negative_prompt_embeds, negative_pooled_prompt_embeds: the same for the negative prompts;
            None without classifier-free guidance.
    """

    prompt_embeds: jax.Array
    pooled_prompt_embeds: jax.Array
    negative_prompt_embeds: jax.Array | None = None
    negative_pooled_prompt_embeds: jax.Array | None = None


def _prompt_list(prompts: Prompts, name: str) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings; got {prompts!r}")
    return prompts


def _batch_of(prompts: Prompts, batch: int, name: str) -> list[str]:
    """``prompts`` as ``batch`` strings: one string serves every prompt, a list holds ``batch``."""
    prompts = [prompts] * batch if isinstance(prompts, str) else _prompt_list(prompts, name)
    if len(prompts) != batch:
        raise ValueError(f"{name} has {len(prompts)} prompts but prompts has {batch}; pass one "
                         f"string (used for every prompt) or a list of {batch}")
    return prompts


def _check_guidance(do_classifier_free_guidance: bool, **negatives: Prompts | None) -> None:
    given = sorted(name for name, value in negatives.items() if value is not None)
    if given and not do_classifier_free_guidance:
        raise ValueError(f"{', '.join(given)} given with do_classifier_free_guidance=False; "
                         "negative prompts only serve guidance: drop them or set "
                         "do_classifier_free_guidance=True")


def _check_clip_length(length: int, encoder, name: str) -> None:
    limit = encoder.config.max_position_embeddings
    if length > limit:
        raise ValueError(f"{name}.model_max_length={length} exceeds the CLIP model's "
                         f"max_position_embeddings={limit}; set {name}.model_max_length = {limit}")


def _check_projection(encoder, name: str) -> None:
    if not isinstance(encoder, CLIPTextModelWithProjection):
        raise ValueError(f"{name} is a {type(encoder).__name__}, but its text_embeds are the "
                         "pooled vector: pass a jdpt.models.clip.CLIPTextModelWithProjection")


def _clip_layer(encoder, ids: jax.Array, clip_skip: int | None,
                offset: int) -> tuple[jax.Array, CLIPTextOutput]:
    """``(hidden_states[-(clip_skip + offset)], outputs)``: ``offset`` 1 is the last layer (SD 1.x),
    2 the penultimate one (SDXL, SD3); ``clip_skip`` goes that many layers further back."""
    layers = encoder.config.num_hidden_layers
    most = layers + 1 - offset
    if clip_skip is not None and (not isinstance(clip_skip, int) or not 0 <= clip_skip <= most):
        raise ValueError(f"clip_skip={clip_skip!r} must be None or an integer in [0, {most}] for a "
                         f"CLIP encoder with num_hidden_layers={layers}")
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-((clip_skip or 0) + offset)], out


def tokenize_sd_prompt(prompts: Prompts, *, tokenizer: Any) -> np.ndarray:
    """``[B, tokenizer.model_max_length]`` int32 ids as ``StableDiffusionPipeline`` makes them
    (padded, truncated with a logged warning, no mask)."""
    prompts = _prompt_list(prompts, "prompts")
    return _token_ids(tokenizer, prompts, tokenizer.model_max_length, "CLIP")


@functools.partial(jax.jit, static_argnames="clip_skip")
def embed_sd_tokens(text_encoder, ids: jax.Array, *, clip_skip: int | None = None) -> jax.Array:
    """SD 1.x token embeddings ``[B, L, D]`` from ``ids [B, L]``; jitted.

    ``clip_skip=None`` (or 0) gives ``last_hidden_state``; ``clip_skip=k`` the output ``k`` layers
    before the last, through the final layer norm (diffusers' rule).
    """
    states, _ = _clip_layer(text_encoder, ids, clip_skip, 1)
    return text_encoder.text_model.final_layer_norm(states)


def encode_sd_prompt(prompts: Prompts, *, text_encoder, tokenizer: Any,
                     negative_prompts: Prompts | None = None,
                     do_classifier_free_guidance: bool = True,
                     clip_skip: int | None = None) -> tuple[jax.Array, jax.Array | None]:
    """Prompts -> SD 1.x conditioning, as diffusers' ``StableDiffusionPipeline.encode_prompt``.

    Args:
        prompts: one prompt or ``B`` prompts.
        text_encoder: ``jdpt.models.clip.CLIPTextModel``; ``tokenizer`` its tokenizer.
        negative_prompts: one string for all or ``B``; None: the empty prompt.
        do_classifier_free_guidance: also encode the negative prompts.
        clip_skip: layers skipped from the end (negative prompts never skip, as in diffusers).

    Returns:
        ``prompt_embeds [B, 77, D]`` and ``negative_prompt_embeds [B, 77, D]`` (None without
        guidance).
    """
    _check_guidance(do_classifier_free_guidance, negative_prompts=negative_prompts)
    _check_clip_length(tokenizer.model_max_length, text_encoder, "tokenizer")
    prompts = _prompt_list(prompts, "prompts")
    embeds = embed_sd_tokens(text_encoder, tokenize_sd_prompt(prompts, tokenizer=tokenizer),
                             clip_skip=clip_skip)
    if not do_classifier_free_guidance:
        return embeds, None
    negative = _batch_of(negative_prompts or "", len(prompts), "negative_prompts")
    return embeds, embed_sd_tokens(text_encoder, tokenize_sd_prompt(negative, tokenizer=tokenizer))


def tokenize_sdxl_prompt(prompts: Prompts, *, tokenizer: Any, tokenizer_2: Any,
                         prompts_2: Prompts | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids as ``StableDiffusionXLPipeline`` makes them: ``ids [B, 77]`` of ``prompts`` for
    CLIP-L and ``ids_2 [B, 77]`` of ``prompts_2`` (default: ``prompts``) for CLIP-G, int32."""
    if tokenizer.model_max_length != tokenizer_2.model_max_length:
        raise ValueError(f"tokenizer.model_max_length={tokenizer.model_max_length} != tokenizer_2."
                         f"model_max_length={tokenizer_2.model_max_length}; SDXL concatenates both "
                         "encoders' tokens: give both tokenizers the same length (77)")
    prompts = _prompt_list(prompts, "prompts")
    prompts_2 = _batch_of(prompts_2 or prompts, len(prompts), "prompts_2")
    return (_token_ids(tokenizer, prompts, tokenizer.model_max_length, "CLIP-L"),
            _token_ids(tokenizer_2, prompts_2, tokenizer_2.model_max_length, "CLIP-G"))


@functools.partial(jax.jit, static_argnames="clip_skip")
def embed_sdxl_tokens(text_encoder, text_encoder_2, ids: jax.Array, ids_2: jax.Array, *,
                      clip_skip: int | None = None) -> tuple[jax.Array, jax.Array]:
    """SDXL conditioning from token ids; jitted.

    Args:
        text_encoder: CLIP-L (``CLIPTextModel``), run on ``ids [B, L]``.
        text_encoder_2: CLIP-G (``CLIPTextModelWithProjection``), run on ``ids_2 [B, L]``.
        clip_skip: layers skipped before the penultimate one.

    Returns:
        ``prompt_embeds [B, L, D1 + D2]`` (both penultimate hidden states, un-normed) and
        ``pooled [B, P]`` (CLIP-G's ``text_embeds``).
    """
    _check_projection(text_encoder_2, "text_encoder_2")
    states, _ = _clip_layer(text_encoder, ids, clip_skip, 2)
    states_2, out_2 = _clip_layer(text_encoder_2, ids_2, clip_skip, 2)
    return jnp.concatenate([states, states_2], axis=-1), out_2.text_embeds


def encode_sdxl_prompt(prompts: Prompts, *, text_encoder, tokenizer: Any, text_encoder_2,
                       tokenizer_2: Any, prompts_2: Prompts | None = None,
                       negative_prompts: Prompts | None = None,
                       negative_prompts_2: Prompts | None = None,
                       do_classifier_free_guidance: bool = True, clip_skip: int | None = None,
                       force_zeros_for_empty_prompt: bool = True) -> PromptEmbeds:
    """Prompts -> SDXL conditioning, as diffusers' ``StableDiffusionXLPipeline.encode_prompt``.

    Args:
        prompts: one prompt or ``B`` prompts, for CLIP-L; ``prompts_2`` for CLIP-G (default:
            ``prompts``).
        text_encoder, tokenizer: CLIP-L (``CLIPTextModel``) and its tokenizer.
        text_encoder_2, tokenizer_2: CLIP-G (``CLIPTextModelWithProjection``) and its tokenizer.
        negative_prompts, negative_prompts_2: as the prompts (``negative_prompts_2`` defaults to
            ``negative_prompts``, which defaults to the empty prompt).
        do_classifier_free_guidance: also return negative embeddings.
        clip_skip: layers skipped before the penultimate one (not for the negative prompts).
        force_zeros_for_empty_prompt: the model's ``force_zeros_for_empty_prompt`` (True for SDXL
            base): without ``negative_prompts`` the negative embeddings are zeros.

    Returns:
        :class:`PromptEmbeds` with ``prompt_embeds [B, 77, D1 + D2]`` and
        ``pooled_prompt_embeds [B, P]``.
    """
    _check_guidance(do_classifier_free_guidance, negative_prompts=negative_prompts,
                    negative_prompts_2=negative_prompts_2)
    _check_clip_length(tokenizer.model_max_length, text_encoder, "tokenizer")
    _check_clip_length(tokenizer_2.model_max_length, text_encoder_2, "tokenizer_2")
    prompts = _prompt_list(prompts, "prompts")
    tokenize = functools.partial(tokenize_sdxl_prompt, tokenizer=tokenizer, tokenizer_2=tokenizer_2)
    embeds, pooled = embed_sdxl_tokens(text_encoder, text_encoder_2,
                                       *tokenize(prompts, prompts_2=prompts_2), clip_skip=clip_skip)
    if not do_classifier_free_guidance:
        return PromptEmbeds(embeds, pooled)
    if negative_prompts is None and force_zeros_for_empty_prompt:
        return PromptEmbeds(embeds, pooled, jnp.zeros_like(embeds), jnp.zeros_like(pooled))
    negative = _batch_of(negative_prompts or "", len(prompts), "negative_prompts")
    negative_ids = tokenize(negative, prompts_2=negative_prompts_2)
    negative_embeds = embed_sdxl_tokens(text_encoder, text_encoder_2, *negative_ids)
    return PromptEmbeds(embeds, pooled, *negative_embeds)


def sdxl_time_ids(original_size: tuple[int, int], crops_coords_top_left: tuple[int, int],
                  target_size: tuple[int, int], batch: int) -> jax.Array:
    """SDXL's micro-conditioning ``[batch, 6]`` float32: ``(*original_size, *crops_coords_top_left,
    *target_size)`` per row, as diffusers' ``StableDiffusionXLPipeline._get_add_time_ids``.

    Sizes are ``(height, width)`` in pixels, the crop corner ``(top, left)``; the pipeline's
    defaults are ``original_size = target_size = (height, width)`` and ``(0, 0)``.
    """
    pairs = dict(original_size=original_size, crops_coords_top_left=crops_coords_top_left,
                 target_size=target_size)
    for name, pair in pairs.items():
        if len(tuple(pair)) != 2:
            raise ValueError(f"{name}={pair!r} must be a pair of pixels: (height, width) or "
                             "(top, left)")
    if batch < 1:
        raise ValueError(f"batch={batch} must be a positive number of rows")
    row = jnp.asarray([v for pair in pairs.values() for v in pair], jnp.float32)
    return jnp.tile(row, (batch, 1))


def _check_t5_length(max_sequence_length: int) -> None:
    if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"max_sequence_length={max_sequence_length} must be in [1, "
                         f"{MAX_SEQUENCE_LENGTH}] (SD3 pipelines accept up to 512 T5 tokens; "
                         "256 by default)")


def tokenize_sd3_prompt(prompts: Prompts, *, clip_l_tokenizer: Any, clip_g_tokenizer: Any,
                        t5_tokenizer: Any | None = None, prompts_2: Prompts | None = None,
                        prompts_3: Prompts | None = None, max_sequence_length: int = 256,
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Token ids as ``StableDiffusion3Pipeline`` makes them, int32.

    Returns:
        ``clip_l_ids [B, 77]`` of ``prompts``, ``clip_g_ids [B, 77]`` of ``prompts_2`` (both padded
        to ``clip_l_tokenizer.model_max_length``, as diffusers does) and ``t5_ids
        [B, max_sequence_length]`` of ``prompts_3`` (None without ``t5_tokenizer``); the second and
        third prompts default to ``prompts``.
    """
    prompts = _prompt_list(prompts, "prompts")
    prompts_2 = _batch_of(prompts_2 or prompts, len(prompts), "prompts_2")
    length = clip_l_tokenizer.model_max_length
    clip_ids = (_token_ids(clip_l_tokenizer, prompts, length, "CLIP-L"),
                _token_ids(clip_g_tokenizer, prompts_2, length, "CLIP-G"))
    if t5_tokenizer is None:
        return *clip_ids, None
    _check_t5_length(max_sequence_length)
    prompts_3 = _batch_of(prompts_3 or prompts, len(prompts), "prompts_3")
    return *clip_ids, _token_ids(t5_tokenizer, prompts_3, max_sequence_length, "T5")


@functools.partial(jax.jit, static_argnames=("clip_skip", "max_sequence_length",
                                             "joint_attention_dim"))
def embed_sd3_tokens(clip_l, clip_g, t5, clip_l_ids: jax.Array, clip_g_ids: jax.Array,
                     t5_ids: jax.Array | None, *, clip_skip: int | None = None,
                     max_sequence_length: int = 256, joint_attention_dim: int | None = None,
                     ) -> tuple[jax.Array, jax.Array]:
    """SD3 conditioning from token ids; jitted.

    Args:
        clip_l, clip_g: ``CLIPTextModelWithProjection`` s, run on ``clip_l_ids`` / ``clip_g_ids``
            ``[B, L]``.
        t5: ``T5EncoderModel`` run on ``t5_ids [B, max_sequence_length]``, or None (with
            ``t5_ids=None``) for zeros ``[B, max_sequence_length, joint_attention_dim]``.
        clip_skip: CLIP layers skipped before the penultimate one.
        joint_attention_dim: the transformer's ``joint_attention_dim`` (4096 for SD3); required
            without T5, checked against T5's width otherwise.

    Returns:
        ``prompt_embeds [B, L + max_sequence_length, W]`` (CLIP-L and CLIP-G penultimate states
        concatenated and zero-padded to the T5 width ``W``, then the T5 states) and
        ``pooled [B, P_l + P_g]`` (both ``text_embeds``).
    """
    _check_projection(clip_l, "clip_l")
    _check_projection(clip_g, "clip_g")
    if (t5 is None) != (t5_ids is None):
        given = {True: "None", False: "given"}
        raise ValueError(f"t5 is {given[t5 is None]} but t5_ids is {given[t5_ids is None]}; pass "
                         "both (T5 tokens) or neither (zeros in their place)")
    states_l, out_l = _clip_layer(clip_l, clip_l_ids, clip_skip, 2)
    states_g, out_g = _clip_layer(clip_g, clip_g_ids, clip_skip, 2)
    clip_states = jnp.concatenate([states_l, states_g], axis=-1)
    if t5 is None:
        if joint_attention_dim is None:
            raise ValueError("without T5, SD3 fills the T5 tokens with zeros of the transformer's "
                             "width: pass joint_attention_dim="
                             "transformer.config.joint_attention_dim")
        _check_t5_length(max_sequence_length)
        t5_states = jnp.zeros((clip_states.shape[0], max_sequence_length, joint_attention_dim),
                              clip_states.dtype)
    else:
        if t5_ids.shape[1] != max_sequence_length:
            raise ValueError(f"t5_ids has {t5_ids.shape[1]} tokens but max_sequence_length="
                             f"{max_sequence_length}; tokenize with the same max_sequence_length")
        if joint_attention_dim not in (None, t5.config.d_model):
            raise ValueError(f"the T5 width d_model={t5.config.d_model} differs from "
                             f"joint_attention_dim={joint_attention_dim}; pass the T5 encoder of "
                             "the same pipeline as the transformer")
        t5_states = t5(t5_ids).last_hidden_state
    width, clip_width = t5_states.shape[-1], clip_states.shape[-1]
    if clip_width > width:
        raise ValueError(f"CLIP-L + CLIP-G width {states_l.shape[-1]} + {states_g.shape[-1]} = "
                         f"{clip_width} exceeds the T5 width {width}; SD3 zero-pads the CLIP "
                         "features up to T5's (768 + 1280 <= 4096): use encoders of one pipeline")
    clip_states = jnp.pad(clip_states, ((0, 0), (0, 0), (0, width - clip_width)))
    return (jnp.concatenate([clip_states, t5_states], axis=1),
            jnp.concatenate([out_l.text_embeds, out_g.text_embeds], axis=-1))


def encode_sd3_prompt(prompts: Prompts, *, clip_l, clip_l_tokenizer: Any, clip_g,
                      clip_g_tokenizer: Any, t5=None, t5_tokenizer: Any | None = None,
                      prompts_2: Prompts | None = None, prompts_3: Prompts | None = None,
                      negative_prompts: Prompts | None = None,
                      negative_prompts_2: Prompts | None = None,
                      negative_prompts_3: Prompts | None = None,
                      do_classifier_free_guidance: bool = True, max_sequence_length: int = 256,
                      clip_skip: int | None = None,
                      joint_attention_dim: int | None = None) -> PromptEmbeds:
    """Prompts -> SD3 conditioning, as diffusers' ``StableDiffusion3Pipeline.encode_prompt``.

    Args:
        prompts: one prompt or ``B`` prompts, for CLIP-L; ``prompts_2`` for CLIP-G and
            ``prompts_3`` for T5 (default: ``prompts``).
        clip_l, clip_g: ``CLIPTextModelWithProjection`` s (the pipeline's ``text_encoder`` and
            ``text_encoder_2``) with their tokenizers.
        t5, t5_tokenizer: ``T5EncoderModel`` (``text_encoder_3``) and its tokenizer; ``t5=None``
            puts zeros in place of the T5 tokens, as diffusers does without ``text_encoder_3``.
        negative_prompts, negative_prompts_2, negative_prompts_3: as the prompts (the second and
            third default to ``negative_prompts``, which defaults to the empty prompt).
        do_classifier_free_guidance: also return negative embeddings.
        max_sequence_length: T5 tokens (at most 512).
        clip_skip: CLIP layers skipped before the penultimate one (not for the negative prompts).
        joint_attention_dim: the transformer's ``joint_attention_dim``; required without T5.

    Returns:
        :class:`PromptEmbeds` with ``prompt_embeds [B, 77 + max_sequence_length, W]`` (``W``: T5's
        width or ``joint_attention_dim``) and ``pooled_prompt_embeds [B, P_l + P_g]``.
    """
    _check_guidance(do_classifier_free_guidance, negative_prompts=negative_prompts,
                    negative_prompts_2=negative_prompts_2, negative_prompts_3=negative_prompts_3)
    if t5 is not None and t5_tokenizer is None:
        raise ValueError("t5 given without t5_tokenizer; pass the pipeline's tokenizer_3")
    _check_clip_length(clip_l_tokenizer.model_max_length, clip_l, "clip_l_tokenizer")
    _check_clip_length(clip_l_tokenizer.model_max_length, clip_g, "clip_l_tokenizer")
    prompts = _prompt_list(prompts, "prompts")
    tokenize = functools.partial(tokenize_sd3_prompt, clip_l_tokenizer=clip_l_tokenizer,
                                 clip_g_tokenizer=clip_g_tokenizer,
                                 t5_tokenizer=None if t5 is None else t5_tokenizer,
                                 max_sequence_length=max_sequence_length)
    embed = functools.partial(embed_sd3_tokens, clip_l, clip_g, t5,
                              max_sequence_length=max_sequence_length,
                              joint_attention_dim=joint_attention_dim)
    embeds, pooled = embed(*tokenize(prompts, prompts_2=prompts_2, prompts_3=prompts_3),
                           clip_skip=clip_skip)
    if not do_classifier_free_guidance:
        return PromptEmbeds(embeds, pooled)
    negative = _batch_of(negative_prompts or "", len(prompts), "negative_prompts")
    negative_ids = tokenize(negative, prompts_2=negative_prompts_2, prompts_3=negative_prompts_3)
    return PromptEmbeds(embeds, pooled, *embed(*negative_ids))
