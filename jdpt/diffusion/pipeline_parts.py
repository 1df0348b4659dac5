"""Diffusers pipeline folders -> jdpt models, tokenizers and sampler settings.

A pipeline folder (what ``pipe.save_pretrained`` writes, or a hub snapshot) holds a
``model_index.json`` naming the pipeline class and one subfolder per component. This module reads
the Flux text-to-image pipeline (:mod:`jdpt.diffusion.sd_pipeline_parts` the SD family); its single models
load with :func:`from_diffusers` as well (``jdpt.from_diffusers(folder, subfolder="transformer")``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar, Self

import numpy as np
from flax import nnx

from jdpt.diffusion.schedules import flow_sigmas, flux_mu
from jdpt.weights.diffusers import from_diffusers
from jdpt.weights.files import WeightsError
from jdpt.weights.pipeline_folder import open_pipeline, read_scheduler_config

# model_index.json entry -> the classes it may name (None: any tokenizer class).
FLUX_COMPONENTS: dict[str, tuple[str, ...] | None] = {
    "transformer": ("FluxTransformer2DModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": None,
    "text_encoder_2": ("T5EncoderModel",),
    "tokenizer_2": None,
    "scheduler": ("FlowMatchEulerDiscreteScheduler",),
}

# FlowMatchEulerDiscreteScheduler options (diffusers applies them when truthy) jdpt's Flux sampler
# does not implement.
_UNSUPPORTED_SCHEDULER_OPTIONS = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                                  "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")


@dataclasses.dataclass(frozen=True)
class FlowMatchScheduler:
    """``FlowMatchEulerDiscreteScheduler`` settings (static ``shift`` or dynamic, resolution-dependent
    shifting from ``base_shift`` to ``max_shift``). Subclasses name the pipeline whose sigma grid
    they reproduce: :class:`FluxScheduler`, ``jdpt.diffusion.sd_pipeline_parts.SD3Scheduler``.
    """

    pipeline: ClassVar[str] = "flow-matching"
    # True: the scheduler's own grid over num_train_timesteps levels (SD3); False: the
    # linspace(1, 1/N, N) sigmas the Flux pipeline passes in (see flow_sigmas).
    train_grid: ClassVar[bool] = False

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096

    @classmethod
    def from_config(cls, raw: dict[str, Any], *, source: str = "scheduler_config.json") -> Self:
        """From a diffusers ``scheduler_config.json`` dict; options jdpt does not implement raise."""
        for key in _UNSUPPORTED_SCHEDULER_OPTIONS:
            if raw.get(key):
                raise WeightsError(f"{source}: {key}={raw[key]!r} is not implemented by jdpt's {cls.pipeline} "
                                   "sampler; unset it (diffusers' default) or sample with diffusers")
        if raw.get("time_shift_type", "exponential") != "exponential":
            raise WeightsError(f"{source}: time_shift_type={raw['time_shift_type']!r} is not implemented "
                               f"by jdpt's {cls.pipeline} sampler; use 'exponential' (diffusers' default)")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def sigmas(self, num_inference_steps: int, image_seq_len: int) -> np.ndarray:
        """``[num_inference_steps + 1]`` fp32 noise levels, as the pipeline sets them for
        ``image_seq_len`` latent tokens (the last one 0)."""
        mu = None
        if self.use_dynamic_shifting:
            mu = flux_mu(image_seq_len, base_seq_len=self.base_image_seq_len,
                         max_seq_len=self.max_image_seq_len, base_shift=self.base_shift,
                         max_shift=self.max_shift)
        return flow_sigmas(num_inference_steps, shift=self.shift, mu=mu,
                           num_train_timesteps=self.num_train_timesteps if self.train_grid else None)


class FluxScheduler(FlowMatchScheduler):
    """The scheduler settings the Flux pipeline samples with. Flux.1-dev uses dynamic shifting;
    Flux.1-schnell a static ``shift=1``."""

    pipeline = "Flux"


@dataclasses.dataclass(frozen=True, eq=False)
class FluxPipelineParts:
    """The components of a diffusers ``FluxPipeline`` folder, loaded by :func:`load_flux_pipeline`.

    Attributes:
        transformer: ``jdpt.models.flux.FluxTransformer``.
        vae: ``jdpt.models.vae.AutoencoderKL``.
        clip: ``jdpt.models.clip.CLIPTextModel`` (its ``pooler_output`` is the pooled prompt).
        clip_tokenizer: transformers tokenizer of ``clip`` (pads to ``model_max_length``, 77).
        t5: ``jdpt.models.t5.T5EncoderModel`` (its ``last_hidden_state`` is the prompt sequence).
        t5_tokenizer: transformers tokenizer of ``t5``.
        scheduler: the sampler settings of ``scheduler/scheduler_config.json``.
    """

    transformer: nnx.Module
    vae: nnx.Module
    clip: nnx.Module
    clip_tokenizer: Any
    t5: nnx.Module
    t5_tokenizer: Any
    scheduler: FluxScheduler


def load_flux_pipeline(folder: str | os.PathLike, *, dtype: Any = None, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None) -> FluxPipelineParts:
    """Load a diffusers ``FluxPipeline`` folder (never downloads).

    Args:
        folder: the pipeline folder (holding ``model_index.json``), or a hub repo id such as
            ``"black-forest-labs/FLUX.1-dev"`` already in the local Hugging Face cache.
        dtype: cast the models' floating parameters (e.g. ``jnp.bfloat16``); default keeps the
            stored dtype.
        revision: hub revision (branch, tag or commit) when resolving a repo id from the cache.
        cache_dir: hub cache location (default ``$HF_HUB_CACHE``).

    Returns:
        :class:`FluxPipelineParts`.
    """
    root, _ = open_pipeline(folder, revision, cache_dir, "FluxPipeline", FLUX_COMPONENTS)
    raw, source = read_scheduler_config(root)
    scheduler = FluxScheduler.from_config(raw, source=source)
    models = {name: from_diffusers(root, subfolder=name, dtype=dtype)
              for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    return FluxPipelineParts(
        transformer=models["transformer"],
        vae=models["vae"],
        clip=models["text_encoder"],
        clip_tokenizer=load_tokenizer(root / "tokenizer"),
        t5=models["text_encoder_2"],
        t5_tokenizer=load_tokenizer(root / "tokenizer_2"),
        scheduler=scheduler,
    )


def load_tokenizer(folder: str | os.PathLike):
    """``transformers.AutoTokenizer`` from a pipeline's tokenizer folder (nothing downloaded).
    transformers is imported here, not with jdpt: importing it is slow and, without PyTorch
    installed, it prints a warning that has nothing to do with jdpt."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
