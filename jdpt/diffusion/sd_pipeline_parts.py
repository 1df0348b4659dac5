"""Diffusers Stable Diffusion pipeline folders -> jdpt models, tokenizers and sampler settings.

``load_sd_pipeline`` reads ``StableDiffusionPipeline`` folders (SD 1.x/2.x), ``load_sdxl_pipeline``
``StableDiffusionXLPipeline`` (SDXL base) and ``load_sd3_pipeline`` ``StableDiffusion3Pipeline``
(SD3 / SD3.5). Models load with :func:`jdpt.from_diffusers` from the component subfolders,
tokenizers with ``transformers.AutoTokenizer``; nothing is downloaded.

**Samplers.** jdpt samples SD 1.x/2.x and SDXL with DDIM only: the folder's
``DDIMScheduler``, ``PNDMScheduler`` or ``EulerDiscreteScheduler`` config becomes the
:class:`~jdpt.diffusion.schedules.DDPMSchedule` diffusers builds with
``DDIMScheduler.from_config(scheduler_config)``; PNDM's and Euler's own update rules are not
ported, so images match diffusers' pipeline after ``pipe.scheduler =
DDIMScheduler.from_config(pipe.scheduler.config)``, not with the folder's own scheduler. SD3
folders keep their ``FlowMatchEulerDiscreteScheduler`` (Euler flow ODE), as diffusers samples
them. Safety checkers, feature extractors and IP-Adapter image encoders named in
``model_index.json`` are not loaded.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from flax import nnx

from jdpt.diffusion.pipeline_parts import FlowMatchScheduler, load_tokenizer
from jdpt.diffusion.schedules import DDPMSchedule
from jdpt.weights.diffusers import from_diffusers
from jdpt.weights.files import WeightsError
from jdpt.weights.pipeline_folder import DDIM_CONVERTIBLE, open_pipeline, read_scheduler_config

_VAE = ("AutoencoderKL",)
_UNET = ("UNet2DConditionModel",)
_CLIP = ("CLIPTextModel",)
_CLIP_PROJECTION = ("CLIPTextModelWithProjection",)
# model_index.json entry -> the transformers/diffusers classes it may name (None: any tokenizer).
SD_COMPONENTS: dict[str, tuple[str, ...] | None] = {
    "unet": _UNET, "vae": _VAE, "text_encoder": _CLIP, "tokenizer": None,
    "scheduler": DDIM_CONVERTIBLE,
}
SDXL_COMPONENTS: dict[str, tuple[str, ...] | None] = {
    **SD_COMPONENTS, "text_encoder_2": _CLIP_PROJECTION, "tokenizer_2": None,
}
SD3_COMPONENTS: dict[str, tuple[str, ...] | None] = {
    "transformer": ("SD3Transformer2DModel",), "vae": _VAE, "text_encoder": _CLIP_PROJECTION,
    "tokenizer": None, "text_encoder_2": _CLIP_PROJECTION, "tokenizer_2": None,
    "text_encoder_3": ("T5EncoderModel",), "tokenizer_3": None,
    "scheduler": ("FlowMatchEulerDiscreteScheduler",),
}
_SD3_OPTIONAL = ("text_encoder_3", "tokenizer_3")  # SD3 runs without T5 (zeros in its place)

# DDIMScheduler's config keys and defaults: what DDIMScheduler.from_config fills in.
_DDIM_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
    trained_betas=None, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
    prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995,
    clip_sample_range=1.0, sample_max_value=1.0, timestep_spacing="leading",
    rescale_betas_zero_snr=False,
)
# DDIM options (applied by diffusers when truthy) jdpt's DDPMSchedule does not implement.
_UNSUPPORTED_DDIM_OPTIONS = ("trained_betas", "thresholding", "rescale_betas_zero_snr")


def ddim_schedule(raw: dict[str, Any], *, source: str = "scheduler_config.json") -> DDPMSchedule:
    """The DDIM schedule of a diffusers DDPM-family ``scheduler_config.json`` dict, as
    ``DDIMScheduler.from_config(raw)`` builds it: DDIM's keys taken from ``raw``, DDIM's defaults
    for the others (so a config without ``clip_sample`` clips the predicted ``x0`` to
    ``[-1, 1]``, DDIM's default). Options jdpt does not implement raise :class:`WeightsError`."""
    config = _DDIM_DEFAULTS | {k: v for k, v in raw.items() if k in _DDIM_DEFAULTS}
    for key in _UNSUPPORTED_DDIM_OPTIONS:
        if config[key]:
            raise WeightsError(f"{source}: {key}={config[key]!r} is not implemented by jdpt's DDIM "
                               "sampler; unset it (diffusers' default) or sample with diffusers")
    clip = config["clip_sample_range"] if config["clip_sample"] else None
    fields = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
              "set_alpha_to_one", "steps_offset", "timestep_spacing")
    try:
        return DDPMSchedule(clip_sample=clip, **{k: config[k] for k in fields})
    except ValueError as e:
        raise WeightsError(f"{source}: {e}") from None


class SD3Scheduler(FlowMatchScheduler):
    """The ``FlowMatchEulerDiscreteScheduler`` settings the SD3 pipeline samples with.

    SD3 and SD3.5 use a static ``shift=3.0`` over the scheduler's own grid of
    ``num_train_timesteps`` levels; with ``use_dynamic_shifting`` the shift depends on the number
    of latent patches as in Flux (``base_shift`` .. ``max_shift``).
    """

    pipeline = "SD3"
    train_grid = True


@dataclasses.dataclass(frozen=True, eq=False)
class SDPipelineParts:
    """The components of a ``StableDiffusionPipeline`` folder (:func:`load_sd_pipeline`).

    Attributes:
        unet: ``jdpt.models.unet.UNet2DConditionModel``.
        vae: ``jdpt.models.vae.AutoencoderKL``.
        text_encoder: ``jdpt.models.clip.CLIPTextModel``; ``tokenizer`` its tokenizer.
        schedule: the DDIM schedule of ``scheduler/scheduler_config.json`` (module docstring).
    """

    unet: nnx.Module
    vae: nnx.Module
    text_encoder: nnx.Module
    tokenizer: Any
    schedule: DDPMSchedule


@dataclasses.dataclass(frozen=True, eq=False)
class SDXLPipelineParts:
    """The components of a ``StableDiffusionXLPipeline`` folder (:func:`load_sdxl_pipeline`).

    Attributes:
        unet: ``jdpt.models.unet.UNet2DConditionModel`` with the ``text_time`` added embedding.
        vae: ``jdpt.models.vae.AutoencoderKL``.
        text_encoder, tokenizer: CLIP-L (``CLIPTextModel``) and its tokenizer.
        text_encoder_2, tokenizer_2: CLIP-G (``CLIPTextModelWithProjection``) and its tokenizer.
        schedule: the DDIM schedule of ``scheduler/scheduler_config.json`` (module docstring).
        force_zeros_for_empty_prompt: ``model_index.json``'s setting (True for SDXL base): without
            negative prompts the unconditional embeddings are zeros.
    """

    unet: nnx.Module
    vae: nnx.Module
    text_encoder: nnx.Module
    tokenizer: Any
    text_encoder_2: nnx.Module
    tokenizer_2: Any
    schedule: DDPMSchedule
    force_zeros_for_empty_prompt: bool = True


@dataclasses.dataclass(frozen=True, eq=False)
class SD3PipelineParts:
    """The components of a ``StableDiffusion3Pipeline`` folder (:func:`load_sd3_pipeline`),
    named as the arguments of ``jdpt.diffusion.prompts.encode_sd3_prompt``.

    Attributes:
        transformer: ``jdpt.models.sd3.SD3Transformer``.
        vae: ``jdpt.models.vae.AutoencoderKL``.
        clip_l, clip_l_tokenizer: ``text_encoder`` (CLIP-L with projection) and ``tokenizer``.
        clip_g, clip_g_tokenizer: ``text_encoder_2`` (CLIP-G with projection) and ``tokenizer_2``.
        t5, t5_tokenizer: ``text_encoder_3`` (``T5EncoderModel``) and ``tokenizer_3``; None when
            the folder has no T5 (its tokens are then zeros, as in diffusers).
        scheduler: the sampler settings of ``scheduler/scheduler_config.json``.
    """

    transformer: nnx.Module
    vae: nnx.Module
    clip_l: nnx.Module
    clip_l_tokenizer: Any
    clip_g: nnx.Module
    clip_g_tokenizer: Any
    t5: nnx.Module | None
    t5_tokenizer: Any | None
    scheduler: SD3Scheduler


def load_sd_pipeline(folder: str | os.PathLike, *, dtype: Any = None, revision: str | None = None,
                     cache_dir: str | os.PathLike | None = None) -> SDPipelineParts:
    """Load a diffusers ``StableDiffusionPipeline`` folder (SD 1.x/2.x; never downloads).

    Args:
        folder: the pipeline folder (holding ``model_index.json``), or a hub repo id such as
            ``"stable-diffusion-v1-5/stable-diffusion-v1-5"`` already in the local cache.
        dtype: cast the models' floating parameters (e.g. ``jnp.bfloat16``); default keeps the
            stored dtype.
        revision: hub revision when resolving a repo id from the cache.
        cache_dir: hub cache location (default ``$HF_HUB_CACHE``).

    Returns:
        :class:`SDPipelineParts`; its ``schedule`` is the DDIM equivalent of the folder's
        scheduler (jdpt samples SD with DDIM only, see the module docstring).
    """
    root, _ = open_pipeline(folder, revision, cache_dir, "StableDiffusionPipeline", SD_COMPONENTS)
    raw, source = read_scheduler_config(root)
    schedule = ddim_schedule(raw, source=source)
    models = _models(root, ("unet", "vae", "text_encoder"), dtype)
    return SDPipelineParts(**models, tokenizer=_tokenizer(root, "tokenizer"), schedule=schedule)


def load_sdxl_pipeline(folder: str | os.PathLike, *, dtype: Any = None, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> SDXLPipelineParts:
    """Load a diffusers ``StableDiffusionXLPipeline`` folder (SDXL base; never downloads).

    Arguments as :func:`load_sd_pipeline`. The refiner (no CLIP-L) is not supported.

    Returns:
        :class:`SDXLPipelineParts`; its ``schedule`` is the DDIM equivalent of the folder's
        scheduler (jdpt samples SDXL with DDIM only, see the module docstring).
    """
    root, index = open_pipeline(folder, revision, cache_dir, "StableDiffusionXLPipeline", SDXL_COMPONENTS)
    raw, source = read_scheduler_config(root)
    schedule = ddim_schedule(raw, source=source)
    models = _models(root, ("unet", "vae", "text_encoder", "text_encoder_2"), dtype)
    return SDXLPipelineParts(
        **models, tokenizer=_tokenizer(root, "tokenizer"), tokenizer_2=_tokenizer(root, "tokenizer_2"),
        schedule=schedule,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )


def load_sd3_pipeline(folder: str | os.PathLike, *, dtype: Any = None, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None) -> SD3PipelineParts:
    """Load a diffusers ``StableDiffusion3Pipeline`` folder (SD3 / SD3.5; never downloads).

    Arguments as :func:`load_sd_pipeline`. A folder without T5 (``text_encoder_3: [null, null]``)
    loads with ``t5=None``.

    Returns:
        :class:`SD3PipelineParts`.
    """
    root, index = open_pipeline(folder, revision, cache_dir, "StableDiffusion3Pipeline", SD3_COMPONENTS,
                        optional=_SD3_OPTIONAL)
    raw, source = read_scheduler_config(root)
    scheduler = SD3Scheduler.from_config(raw, source=source)
    with_t5, with_tokenizer = ((index.get(name) or [None, None])[1] is not None for name in _SD3_OPTIONAL)
    if with_t5 != with_tokenizer:
        raise WeightsError(f"{root / 'model_index.json'}: text_encoder_3 and tokenizer_3 come together; "
                           "give both (T5) or set both to [null, null] (no T5)")
    names = ("transformer", "vae", "text_encoder", "text_encoder_2") + ("text_encoder_3",) * with_t5
    models = _models(root, names, dtype)
    return SD3PipelineParts(
        transformer=models["transformer"], vae=models["vae"],
        clip_l=models["text_encoder"], clip_l_tokenizer=_tokenizer(root, "tokenizer"),
        clip_g=models["text_encoder_2"], clip_g_tokenizer=_tokenizer(root, "tokenizer_2"),
        t5=models.get("text_encoder_3"), t5_tokenizer=_tokenizer(root, "tokenizer_3") if with_t5 else None,
        scheduler=scheduler,
    )


def _models(root: Path, names: tuple[str, ...], dtype: Any) -> dict[str, nnx.Module]:
    return {name: from_diffusers(root, subfolder=name, dtype=dtype) for name in names}


def _tokenizer(root: Path, name: str):
    return load_tokenizer(root / name)
