"""jdpt: post-training for diffusion and flow-matching image models in JAX/Flax."""

from jdpt import data, diffusion, guidance, kernels, models, objectives, parallel, rewards, train, weights, world
from jdpt.models import from_diffusers
from jdpt.models.attention import AttentionPlan, LayerPlans, attention, plan_layers

__version__ = "0.1.0"

__all__ = [
    "AttentionPlan",
    "LayerPlans",
    "attention",
    "data",
    "diffusion",
    "from_diffusers",
    "guidance",
    "kernels",
    "models",
    "objectives",
    "parallel",
    "plan_layers",
    "rewards",
    "train",
    "weights",
    "world",
]
