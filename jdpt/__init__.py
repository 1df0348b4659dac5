"""jdpt: post-training for diffusion and flow-matching image models in JAX/Flax.

``import jdpt`` loads the attention entry point and the weight loader; every subpackage
(``jdpt.objectives``, ``jdpt.world``, the Pallas kernels ``jdpt.kernels``, ...) is imported the
first time it is used, so importing jdpt never compiles or registers a kernel.
"""

import importlib

from jdpt.models.attention import AttentionPlan, LayerPlans, attention, plan_layers
from jdpt.weights.diffusers import from_diffusers

__version__ = "0.1.0"

SUBPACKAGES = ("data", "diffusion", "guidance", "kernels", "models", "objectives", "parallel", "rewards",
               "train", "weights", "world")


def __getattr__(name: str):
    if name in SUBPACKAGES:
        return importlib.import_module(f"jdpt.{name}")
    raise AttributeError(f"module 'jdpt' has no attribute {name!r}")


__all__ = ["AttentionPlan", "LayerPlans", "attention", "from_diffusers", "plan_layers", *SUBPACKAGES]
