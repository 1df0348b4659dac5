"""Weights: diffusers/transformers folders <-> jdpt modules, and Orbax checkpoints."""

from jdpt.weights.checkpoint import restore, save
from jdpt.weights.diffusers import from_diffusers, state_dict, to_diffusers
from jdpt.weights.files import WeightsError

__all__ = ["WeightsError", "from_diffusers", "restore", "save", "state_dict", "to_diffusers"]
