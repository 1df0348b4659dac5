"""Flax NNX ports of diffusion models and their encoders, loadable from diffusers folders."""

from jdpt.weights.diffusers import from_diffusers

__all__ = ["from_diffusers"]
