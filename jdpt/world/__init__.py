"""The embedded default: a text-to-image model of the Shapes world, pretrained by jdpt on a CPU.

``base_model(preset)`` loads the cached base model (or pretrains, evaluates and caches it);
``WorldModel`` is a tiny CLIP text tower + tiny Flux in pixel space; ``pretrain`` trains one from
scratch with flow matching; ``evaluate`` samples and scores it with the analytic verifier;
``post_train`` aligns it with one of seven post-training methods (SFT, Diffusion-DPO, MaPO, DDPO,
reward backprop, Flow-GRPO, DiffusionNFT) under a wall-clock budget.
"""

from jdpt.world.cache import PRESETS, CacheError, base_model, cache_root, load_model, model_dir, save_model
from jdpt.world.colour_mass import colour_mass_reward, mass_targets, object_areas
from jdpt.world.model import WorldConfig, WorldModel, empty_prompt, make_sampler
from jdpt.world.pretraining import PretrainConfig, eval_prompts, evaluate, flow_matching_loss, pretrain

# Post-training imports jdpt.objectives, whose denoiser contract imports jdpt.world.model: these
# names load on first use (PEP 562) so that importing either package first works.
_LAZY = {"METHODS": "alignment", "AlignSettings": "alignment", "PostTrainResult": "alignment",
         "post_train": "alignment", "geneval": "alignment_runs"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"jdpt.world.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'jdpt.world' has no attribute {name!r}")

__all__ = [
    "METHODS",
    "PRESETS",
    "AlignSettings",
    "CacheError",
    "PostTrainResult",
    "PretrainConfig",
    "WorldConfig",
    "WorldModel",
    "base_model",
    "cache_root",
    "colour_mass_reward",
    "empty_prompt",
    "eval_prompts",
    "evaluate",
    "flow_matching_loss",
    "geneval",
    "load_model",
    "make_sampler",
    "mass_targets",
    "model_dir",
    "object_areas",
    "post_train",
    "pretrain",
    "save_model",
]
