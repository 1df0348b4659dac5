"""The embedded default: a text-to-image model of the Shapes world, pretrained by jdpt on a CPU.

``base_model(preset)`` loads the cached base model (or pretrains, evaluates and caches it);
``WorldModel`` is a tiny CLIP text tower + tiny Flux in pixel space; ``pretrain`` trains one from
scratch with flow matching; ``evaluate`` samples and scores it with the analytic verifier.
"""

from jdpt.world.cache import PRESETS, CacheError, base_model, cache_root, load_model, model_dir, save_model
from jdpt.world.model import WorldConfig, WorldModel, empty_prompt, make_sampler
from jdpt.world.pretraining import PretrainConfig, eval_prompts, evaluate, flow_matching_loss, pretrain

__all__ = [
    "PRESETS",
    "CacheError",
    "PretrainConfig",
    "WorldConfig",
    "WorldModel",
    "base_model",
    "cache_root",
    "empty_prompt",
    "eval_prompts",
    "evaluate",
    "flow_matching_loss",
    "load_model",
    "make_sampler",
    "model_dir",
    "pretrain",
    "save_model",
]
