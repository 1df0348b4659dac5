"""The embedded default: the Shapes world, a text-to-image world small enough for a laptop with an
exact verifier, built on the library as its first user (the library never imports it).

- :mod:`~jdpt.world.scenes`: seeded scenes, the prompt grammar and its tokenizer;
  :mod:`~jdpt.world.verifier`: GenEval-lite, an analytic verifier; :mod:`~jdpt.world.builders`:
  its tensorflow-datasets builders.
- ``WorldModel`` (a tiny CLIP text tower + tiny Flux in pixel space) and ``UNetWorldModel``, with
  their objective adapter ``world_velocity`` / ``world_latents``; ``pretrain`` trains one from
  scratch, ``evaluate`` samples and scores it, ``base_model(preset)`` loads the cached base model
  (or pretrains, evaluates and caches it).
- ``post_train`` aligns a base model with one of seven post-training methods (SFT, Diffusion-DPO,
  MaPO, DDPO, reward backprop, Flow-GRPO, DiffusionNFT) under a wall-clock budget.
"""

from jdpt.world.adapter import adapter_for, unet_world_eps, world_latents, world_velocity
from jdpt.world.alignment import METHODS, AlignSettings, PostTrainResult, post_train
from jdpt.world.alignment_runs import geneval
from jdpt.world.cache import PRESETS, CacheError, base_model, cache_root, load_model, model_dir, save_model
from jdpt.world.colour_mass import colour_mass_reward, mass_targets, object_areas
from jdpt.world.evaluation import eval_prompts, evaluate, make_sampler
from jdpt.world.model import WorldConfig, WorldModel, empty_prompt
from jdpt.world.pretraining import PretrainConfig, pretrain, pretraining_objective
from jdpt.world.scenes import CATEGORIES, Prompt, ShapesConfig, parse_prompt, render, sample_pairs, sample_prompts
from jdpt.world.verifier import Verdict, detect, geneval_lite_reward, verify

__all__ = [
    "CATEGORIES",
    "METHODS",
    "PRESETS",
    "AlignSettings",
    "adapter_for",
    "CacheError",
    "PostTrainResult",
    "PretrainConfig",
    "Prompt",
    "ShapesConfig",
    "Verdict",
    "WorldConfig",
    "WorldModel",
    "base_model",
    "cache_root",
    "colour_mass_reward",
    "detect",
    "empty_prompt",
    "eval_prompts",
    "evaluate",
    "geneval",
    "geneval_lite_reward",
    "load_model",
    "make_sampler",
    "mass_targets",
    "model_dir",
    "object_areas",
    "parse_prompt",
    "post_train",
    "pretrain",
    "pretraining_objective",
    "render",
    "sample_pairs",
    "sample_prompts",
    "save_model",
    "unet_world_eps",
    "verify",
    "world_latents",
    "world_velocity",
]
