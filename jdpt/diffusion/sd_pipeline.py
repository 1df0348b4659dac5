"""Functional Stable Diffusion sampling: prompt embeddings + a key -> uint8 images, one jitted call.

``sd_generate`` reproduces the denoising loop of diffusers' ``StableDiffusionPipeline`` (SD
1.x/2.x) and ``StableDiffusionXLPipeline`` (SDXL: pooled text and size micro-conditioning) with a
``DDIMScheduler``; ``sd3_generate`` that of ``StableDiffusion3Pipeline`` (Euler flow ODE,
timesteps ``sigma * 1000``). Classifier-free guidance is diffusers': both branches in one batched
forward, the unconditional first, ``uncond + guidance_scale * (cond - uncond)``; it is on when
negative embeddings are given, so ``guidance_scale`` may be traced.

``sd_text_to_image``, ``sdxl_text_to_image`` and ``sd3_text_to_image`` compose prompt encoding
(``jdpt.diffusion.prompts``) and sampling for a loaded pipeline (``jdpt.diffusion.sd_pipeline_parts``),
like the diffusers pipelines' ``__call__`` (guidance iff ``guidance_scale > 1``). SD and SDXL
sample with DDIM whatever scheduler the folder names (see ``jdpt.diffusion.sd_pipeline_parts``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jdpt.diffusion.branches import Guidance, stack_branches, step_index
from jdpt.diffusion.pipeline import to_uint8
from jdpt.diffusion.prompts import encode_sd3_prompt, encode_sd_prompt, encode_sdxl_prompt, sdxl_time_ids
from jdpt.diffusion.samplers import ddim_sample, euler_flow
from jdpt.diffusion.schedules import DDPMSchedule, flow_sigmas, inference_timesteps
from jdpt.diffusion.sd_pipeline_parts import SD3PipelineParts, SDPipelineParts, SDXLPipelineParts
from jdpt.models.sd3 import SD3Transformer
from jdpt.models.unet import UNet2DConditionModel
from jdpt.models.vae import AutoencoderKL

Prompts = str | Sequence[str]


def _guide(prediction: jax.Array, guidance_scale, guidance_rescale: float) -> jax.Array:
    """``[2B, ...]`` predictions (unconditional half first) -> guided ``[B, ...]`` in fp32, with
    Lin et al. 2024's rescale (diffusers ``rescale_noise_cfg``): blend the guided prediction with
    itself scaled to the conditional prediction's per-sample standard deviation."""
    uncond, cond = jnp.split(prediction.astype(jnp.float32), 2)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale:
        axes = tuple(range(1, guided.ndim))
        ratio = jnp.std(cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True)
        guided = guidance_rescale * guided * ratio + (1 - guidance_rescale) * guided
    return guided


def _initial_latents(key, latents, shape: tuple[int, ...], height: int, width: int):
    """``(key, latents)``: the given NHWC noise checked against ``shape``, or noise drawn from
    ``key`` (then a fresh key is returned for the sampler)."""
    if latents is None:
        if key is None:
            raise ValueError("pass key= (a jax.random key) or latents= for the initial noise")
        key, noise_key = jax.random.split(key)
        return key, jax.random.normal(noise_key, shape, jnp.float32)
    if latents.shape != shape:
        hint = (" It looks NCHW (diffusers' layout): transpose it with latents.transpose(0, 2, 3, 1)."
                if latents.ndim == 4 and latents.shape[1] == shape[-1] else "")
        raise ValueError(f"latents must be NHWC noise {shape} for a {height}x{width} image; got "
                         f"{tuple(latents.shape)}.{hint}")
    return key, latents


def _check_size(height: int, width: int, vae_factor: int, model_factor: int, model: str) -> tuple[int, int]:
    """Latent height and width of an image size that the VAE and the denoiser both divide."""
    m = vae_factor * model_factor
    if height % m or width % m:
        raise ValueError(f"height={height} and width={width} must be multiples of {m} (the VAE's "
                         f"downsampling {vae_factor} times the {model} {model_factor})")
    return height // vae_factor, width // vae_factor


def _negatives(cfg: bool, pairs: dict[str, tuple[jax.Array | None, jax.Array | None]]) -> None:
    """Each negative embedding is given exactly when guidance is on, shaped as its positive."""
    for name, (positive, negative) in pairs.items():
        if positive is None:
            continue
        if (negative is not None) != cfg:
            raise ValueError(f"pass negative_{name} together with negative_prompt_embeds (guidance), "
                             "or neither")
        if cfg and negative.shape != positive.shape:
            raise ValueError(f"negative_{name} {tuple(negative.shape)} must match {name} "
                             f"{tuple(positive.shape)} (pad both prompts to the same token length)")


def sd_generate(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    prompt_embeds: jax.Array,
    *,
    schedule: DDPMSchedule,
    negative_prompt_embeds: jax.Array | None = None,
    pooled_prompt_embeds: jax.Array | None = None,
    negative_pooled_prompt_embeds: jax.Array | None = None,
    add_time_ids: jax.Array | None = None,
    key: jax.Array | None = None,
    latents: jax.Array | None = None,
    height: int = 512,
    width: int = 512,
    num_inference_steps: int = 50,
    guidance_scale: float | jax.Array = 7.5,
    guidance_rescale: float = 0.0,
    eta: float = 0.0,
    guidance: Guidance | None = None,
) -> jax.Array:
    """Sample images with an SD 1.x/2.x or SDXL UNet and DDIM (jit this function with
    ``schedule``, the sizes, ``num_inference_steps``, ``guidance_rescale`` and ``eta`` static).

    Args:
        prompt_embeds: ``[B, L, cross_attention_dim]`` text tokens.
        schedule: the DDIM schedule (prediction type, timestep spacing, ``steps_offset``,
            ``set_alpha_to_one``, clipping), e.g. ``load_sd_pipeline(...).schedule``.
        negative_prompt_embeds: the unconditional prompt's tokens, shaped as ``prompt_embeds``;
            given, every step uses classifier-free guidance (module docstring).
        pooled_prompt_embeds, negative_pooled_prompt_embeds: SDXL only (a UNet with
            ``addition_embed_type="text_time"``): the pooled CLIP-G text ``[B, P]``, the
            ``text_embeds`` of the added embedding.
        add_time_ids: SDXL's micro-conditioning ``[B, 6]`` (``prompts.sdxl_time_ids``), used by
            both guidance branches; default ``original_size = target_size = (height, width)``,
            crop ``(0, 0)``.
        key: PRNG key for the initial noise (and DDIM's noise when ``eta > 0``).
        latents: initial noise ``[B, height / f, width / f, in_channels]`` (NHWC; ``f`` the VAE's
            downsampling) instead of drawing it from ``key``. DDIM's ``init_noise_sigma`` is 1.
        height, width: image size, multiples of the VAE's times the UNet's downsampling.
        guidance_scale: classifier-free guidance weight (may be traced).
        guidance_rescale: Lin et al. 2024's rescale ``phi`` (0: off), with guidance only.
        eta: DDIM noise (0: deterministic; needs ``key`` when > 0).
        guidance: a ``jdpt.guidance`` method (CFG-Zero*, PAG, SEG, ...) replacing the built-in
            CFG (``guidance_scale`` and ``guidance_rescale`` are then unused): one forward over
            its branches with its attention plans, then its combination. The negative
            embeddings are given exactly when its branches include ``"uncond"``.

    Returns:
        ``[B, height, width, 3]`` uint8 images, decoded by ``vae.decode_latents`` (divided by
        ``scaling_factor``; ``latents_mean``/``latents_std`` where the VAE config sets them, as
        the SDXL pipeline does).
    """
    b = prompt_embeds.shape[0]
    lh, lw = _check_size(height, width, vae.downsample_factor, unet.config.downsample_factor, "UNet's")
    key, latents = _initial_latents(key, latents, (b, lh, lw, unet.config.in_channels), height, width)
    cfg = negative_prompt_embeds is not None
    branches = ("uncond", "cond") if cfg else ("cond",)
    if guidance is not None:
        branches = guidance.branches
        cfg = "uncond" in branches
    sdxl = unet.config.addition_embed_type == "text_time"
    if sdxl and pooled_prompt_embeds is None:
        raise ValueError("an SDXL UNet (addition_embed_type='text_time') needs pooled_prompt_embeds "
                         "(the pooled CLIP-G text of encode_sdxl_prompt)")
    if not sdxl and (pooled_prompt_embeds is not None or add_time_ids is not None):
        raise ValueError("pooled_prompt_embeds / add_time_ids given to a UNet without SDXL's added "
                         "embedding (addition_embed_type=None); drop them")
    _negatives(cfg, {"prompt_embeds": (prompt_embeds, negative_prompt_embeds),
                     "pooled_prompt_embeds": (pooled_prompt_embeds, negative_pooled_prompt_embeds)})
    dtype = unet.conv_in.kernel.get_value().dtype
    negative = negative_prompt_embeds.astype(dtype) if cfg else None
    context = stack_branches(branches, prompt_embeds.astype(dtype), negative)
    added = None
    if sdxl:
        if add_time_ids is None:
            add_time_ids = sdxl_time_ids((height, width), (0, 0), (height, width), batch=b)
        time_ids = jnp.asarray(add_time_ids, jnp.float32)
        added = {"text_embeds": stack_branches(branches, pooled_prompt_embeds, negative_pooled_prompt_embeds)
                 .astype(dtype), "time_ids": stack_branches(branches, time_ids, time_ids)}
    plans = None if guidance is None else guidance.plans(unet, b, (lh, lw))
    timesteps = inference_timesteps(schedule, num_inference_steps)

    def denoise(x, t):
        x_in = jnp.concatenate([x] * len(branches))
        prediction = unet(x_in, t, context, added_cond_kwargs=added, plans=plans)
        if guidance is not None:
            return guidance.combine(prediction, step=step_index(timesteps, t), timestep=t)
        return _guide(prediction, guidance_scale, guidance_rescale) if cfg else prediction

    x = ddim_sample(denoise, latents.astype(dtype), schedule, num_inference_steps, eta=eta, key=key)
    return to_uint8(vae.decode_latents(x))


def sd3_generate(
    transformer: SD3Transformer,
    vae: AutoencoderKL,
    prompt_embeds: jax.Array,
    pooled_prompt_embeds: jax.Array,
    *,
    negative_prompt_embeds: jax.Array | None = None,
    negative_pooled_prompt_embeds: jax.Array | None = None,
    key: jax.Array | None = None,
    latents: jax.Array | None = None,
    height: int = 1024,
    width: int = 1024,
    num_inference_steps: int = 28,
    guidance_scale: float | jax.Array = 7.0,
    sigmas: jax.Array | None = None,
    num_train_timesteps: int = 1000,
    guidance: Guidance | None = None,
) -> jax.Array:
    """Sample images with an SD3 / SD3.5 transformer (jit this function with the sizes,
    ``num_inference_steps`` and ``num_train_timesteps`` static).

    Args:
        prompt_embeds: ``[B, L, joint_attention_dim]`` CLIP + T5 tokens (``encode_sd3_prompt``).
        pooled_prompt_embeds: ``[B, pooled_projection_dim]`` pooled CLIP-L + CLIP-G.
        negative_prompt_embeds, negative_pooled_prompt_embeds: the unconditional prompt's, shaped
            as the positive ones; given, every step uses classifier-free guidance.
        key: PRNG key for the initial noise, or ``latents``: ``[B, height / f, width / f,
            in_channels]`` NHWC noise (``f`` the VAE's downsampling).
        height, width: image size, multiples of the VAE's downsampling times ``patch_size``.
        guidance_scale: classifier-free guidance weight (may be traced).
        sigmas: ``[N + 1]`` noise levels ending at 0; default SD3's scheduler
            (``shift=3.0`` over ``num_train_timesteps`` levels, ``SD3Scheduler.sigmas``).
        num_train_timesteps: the transformer sees timesteps ``sigma * num_train_timesteps``.
        guidance: a ``jdpt.guidance`` method replacing the built-in CFG (as in
            :func:`sd_generate`); its ``timestep`` is ``sigma * num_train_timesteps``.

    Returns:
        ``[B, height, width, 3]`` uint8 images (``vae.decode_latents``: divided by
        ``scaling_factor``, plus ``shift_factor``).
    """
    b = prompt_embeds.shape[0]
    cfg_model = transformer.config
    lh, lw = _check_size(height, width, vae.downsample_factor, cfg_model.patch_size, "transformer's patch")
    _, latents = _initial_latents(key, latents, (b, lh, lw, cfg_model.in_channels), height, width)
    cfg = negative_prompt_embeds is not None
    branches = ("uncond", "cond") if cfg else ("cond",)
    if guidance is not None:
        branches = guidance.branches
        cfg = "uncond" in branches
    _negatives(cfg, {"prompt_embeds": (prompt_embeds, negative_prompt_embeds),
                     "pooled_prompt_embeds": (pooled_prompt_embeds, negative_pooled_prompt_embeds)})
    if sigmas is None:
        sigmas = flow_sigmas(num_inference_steps, shift=3.0, num_train_timesteps=num_train_timesteps)
    dtype = transformer.pos_embed.proj.kernel.get_value().dtype
    context = stack_branches(branches, prompt_embeds.astype(dtype),
                             negative_prompt_embeds.astype(dtype) if cfg else None)
    pooled = stack_branches(branches, pooled_prompt_embeds.astype(dtype),
                            negative_pooled_prompt_embeds.astype(dtype) if cfg else None)
    plans = None if guidance is None else guidance.plans(transformer, b, (lh, lw))
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def velocity(x, sigma):
        t = sigma * num_train_timesteps
        v = transformer(jnp.concatenate([x] * len(branches)), context, pooled, t, plans=plans)
        if guidance is not None:
            return guidance.combine(v, step=step_index(sigmas[:-1], sigma), timestep=t)
        return _guide(v, guidance_scale, 0.0) if cfg else v

    return to_uint8(vae.decode_latents(euler_flow(velocity, latents.astype(dtype), sigmas)))


_sd_generate = jax.jit(sd_generate, static_argnames=("schedule", "height", "width", "num_inference_steps",
                                                     "guidance_rescale", "eta"))
_sd3_generate = jax.jit(sd3_generate, static_argnames=("height", "width", "num_inference_steps",
                                                       "num_train_timesteps"))


def _image_size(height: int | None, width: int | None, sample_size, factor: int) -> tuple[int, int]:
    """The pipelines' default size: the denoiser config's ``sample_size`` times the VAE's
    downsampling, where ``height`` / ``width`` are None."""
    if height is not None and width is not None:
        return height, width
    if sample_size is None:
        raise ValueError("the model config has no sample_size to take a default image size from; "
                         "pass height= and width=")
    h, w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    return height or h * factor, width or w * factor


def _check_negatives(guidance_scale: float, **negatives: Prompts | None) -> bool:
    """Whether guidance is on (``guidance_scale > 1``, diffusers' rule); negative prompts
    without it raise."""
    given = sorted(name for name, value in negatives.items() if value is not None)
    if given and not guidance_scale > 1:
        raise ValueError(f"{', '.join(given)} are used only with guidance_scale > 1 (got "
                         f"{guidance_scale}); raise guidance_scale (e.g. 7.5) or drop them")
    return guidance_scale > 1


def sd_text_to_image(parts: SDPipelineParts, prompts: Prompts, *, negative_prompts: Prompts | None = None,
                     key: jax.Array | None = None, latents: jax.Array | None = None,
                     height: int | None = None, width: int | None = None,
                     num_inference_steps: int = 50, guidance_scale: float = 7.5,
                     guidance_rescale: float = 0.0, eta: float = 0.0,
                     clip_skip: int | None = None) -> jax.Array:
    """Sample images for text prompts, as diffusers' ``StableDiffusionPipeline(prompt, ...)`` with
    a ``DDIMScheduler``.

    Args:
        parts: a loaded pipeline (``jdpt.diffusion.sd_pipeline_parts.load_sd_pipeline``).
        prompts: one prompt or ``B`` prompts; ``negative_prompts`` (one string or ``B``) replace
            the empty unconditional prompt. Guidance is on when ``guidance_scale > 1``.
        key: PRNG key for the noise, or ``latents``: NHWC noise ``[B, H / f, W / f, C]``.
        height, width: default ``unet.config.sample_size`` times the VAE's downsampling ``f``.
        guidance_rescale, eta, clip_skip: as diffusers' (see :func:`sd_generate` and
            ``encode_sd_prompt``).

    Returns:
        ``[B, height, width, 3]`` uint8 images.
    """
    cfg = _check_negatives(guidance_scale, negative_prompts=negative_prompts)
    height, width = _image_size(height, width, parts.unet.config.sample_size, parts.vae.downsample_factor)
    embeds, negative = encode_sd_prompt(prompts, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                        negative_prompts=negative_prompts,
                                        do_classifier_free_guidance=cfg, clip_skip=clip_skip)
    return _sd_generate(parts.unet, parts.vae, embeds, negative_prompt_embeds=negative,
                        schedule=parts.schedule, key=key, latents=latents, height=height, width=width,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                        guidance_rescale=guidance_rescale, eta=eta)


def sdxl_text_to_image(parts: SDXLPipelineParts, prompts: Prompts, *, prompts_2: Prompts | None = None,
                       negative_prompts: Prompts | None = None,
                       negative_prompts_2: Prompts | None = None, key: jax.Array | None = None,
                       latents: jax.Array | None = None, height: int | None = None,
                       width: int | None = None, num_inference_steps: int = 50,
                       guidance_scale: float = 5.0, guidance_rescale: float = 0.0, eta: float = 0.0,
                       clip_skip: int | None = None, original_size: tuple[int, int] | None = None,
                       crops_coords_top_left: tuple[int, int] = (0, 0),
                       target_size: tuple[int, int] | None = None) -> jax.Array:
    """Sample images for text prompts, as diffusers' ``StableDiffusionXLPipeline(prompt, ...)``
    with a ``DDIMScheduler``.

    Args:
        parts: a loaded pipeline (``jdpt.diffusion.sd_pipeline_parts.load_sdxl_pipeline``).
        prompts: one prompt or ``B`` prompts for CLIP-L; ``prompts_2`` for CLIP-G (default: the
            same). ``negative_prompts`` / ``negative_prompts_2`` likewise; without them the
            unconditional embeddings are zeros when ``parts.force_zeros_for_empty_prompt``.
            Guidance is on when ``guidance_scale > 1``.
        key: PRNG key for the noise, or ``latents``: NHWC noise ``[B, H / f, W / f, C]``.
        height, width: default ``unet.config.sample_size`` times the VAE's downsampling ``f``.
        original_size, crops_coords_top_left, target_size: SDXL's micro-conditioning in pixels
            (``(height, width)``, ``(top, left)``); sizes default to ``(height, width)``.
        guidance_rescale, eta, clip_skip: as diffusers' (see :func:`sd_generate`).

    Returns:
        ``[B, height, width, 3]`` uint8 images.
    """
    cfg = _check_negatives(guidance_scale, negative_prompts=negative_prompts,
                           negative_prompts_2=negative_prompts_2)
    height, width = _image_size(height, width, parts.unet.config.sample_size, parts.vae.downsample_factor)
    encoded = encode_sdxl_prompt(
        prompts, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
        text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2, prompts_2=prompts_2,
        negative_prompts=negative_prompts, negative_prompts_2=negative_prompts_2,
        do_classifier_free_guidance=cfg, clip_skip=clip_skip,
        force_zeros_for_empty_prompt=parts.force_zeros_for_empty_prompt)
    time_ids = sdxl_time_ids(original_size or (height, width), crops_coords_top_left,
                             target_size or (height, width), batch=encoded.prompt_embeds.shape[0])
    return _sd_generate(
        parts.unet, parts.vae, encoded.prompt_embeds,
        negative_prompt_embeds=encoded.negative_prompt_embeds,
        pooled_prompt_embeds=encoded.pooled_prompt_embeds,
        negative_pooled_prompt_embeds=encoded.negative_pooled_prompt_embeds, add_time_ids=time_ids,
        schedule=parts.schedule, key=key, latents=latents, height=height, width=width,
        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale, eta=eta)


def sd3_text_to_image(parts: SD3PipelineParts, prompts: Prompts, *, prompts_2: Prompts | None = None,
                      prompts_3: Prompts | None = None, negative_prompts: Prompts | None = None,
                      negative_prompts_2: Prompts | None = None,
                      negative_prompts_3: Prompts | None = None, key: jax.Array | None = None,
                      latents: jax.Array | None = None, height: int | None = None,
                      width: int | None = None, num_inference_steps: int = 28,
                      guidance_scale: float = 7.0, max_sequence_length: int = 256,
                      clip_skip: int | None = None) -> jax.Array:
    """Sample images for text prompts, as diffusers' ``StableDiffusion3Pipeline(prompt, ...)``.

    Args:
        parts: a loaded pipeline (``jdpt.diffusion.sd_pipeline_parts.load_sd3_pipeline``).
        prompts: one prompt or ``B`` prompts for CLIP-L; ``prompts_2`` for CLIP-G and
            ``prompts_3`` for T5 (default: the same); the negative prompts likewise (default: the
            empty prompt). Guidance is on when ``guidance_scale > 1``.
        key: PRNG key for the noise, or ``latents``: NHWC noise ``[B, H / f, W / f, C]``.
        height, width: default ``transformer.config.sample_size`` times the VAE's downsampling.
        max_sequence_length: T5 tokens (at most 512).
        clip_skip: CLIP layers skipped before the penultimate one (not for negative prompts).

    Returns:
        ``[B, height, width, 3]`` uint8 images. The sigmas follow the folder's
        ``scheduler_config.json``.
    """
    cfg = _check_negatives(guidance_scale, negative_prompts=negative_prompts,
                           negative_prompts_2=negative_prompts_2, negative_prompts_3=negative_prompts_3)
    model = parts.transformer.config
    factor = parts.vae.downsample_factor
    height, width = _image_size(height, width, model.sample_size, factor)
    lh, lw = _check_size(height, width, factor, model.patch_size, "transformer's patch")
    encoded = encode_sd3_prompt(
        prompts, clip_l=parts.clip_l, clip_l_tokenizer=parts.clip_l_tokenizer, clip_g=parts.clip_g,
        clip_g_tokenizer=parts.clip_g_tokenizer, t5=parts.t5, t5_tokenizer=parts.t5_tokenizer,
        prompts_2=prompts_2, prompts_3=prompts_3, negative_prompts=negative_prompts,
        negative_prompts_2=negative_prompts_2, negative_prompts_3=negative_prompts_3,
        do_classifier_free_guidance=cfg, max_sequence_length=max_sequence_length,
        clip_skip=clip_skip, joint_attention_dim=model.joint_attention_dim)
    sigmas = parts.scheduler.sigmas(num_inference_steps, (lh // model.patch_size) * (lw // model.patch_size))
    return _sd3_generate(
        parts.transformer, parts.vae, encoded.prompt_embeds, encoded.pooled_prompt_embeds,
        negative_prompt_embeds=encoded.negative_prompt_embeds,
        negative_pooled_prompt_embeds=encoded.negative_pooled_prompt_embeds, key=key, latents=latents,
        height=height, width=width, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, sigmas=sigmas,
        num_train_timesteps=parts.scheduler.num_train_timesteps)
