"""Flax NNX ports of diffusion models and their encoders (``jdpt.weights.from_diffusers`` loads
them from diffusers / transformers folders)."""
