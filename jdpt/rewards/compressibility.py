"""JPEG (in)compressibility rewards (Black et al., 2023, "Training Diffusion Models with
Reinforcement Learning", DDPO): the size of the image saved as JPEG at quality 95, in kB
(1 kB = 1000 bytes)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

QUALITY = 95


def jpeg_size_kb(images, quality: int = QUALITY) -> np.ndarray:
    """JPEG sizes float32 ``[B]`` in kB of uint8 ``images [B, H, W, 3]``."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images must be uint8 [B, H, W, 3]; got dtype {images.dtype} and shape "
            f"{images.shape}. Convert [-1, 1] floats with jdpt.diffusion.pipeline.to_uint8")
    sizes = np.empty(len(images), np.float32)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes[i] = buffer.tell() / 1000
    return sizes


def jpeg_compressibility(images, prompts=None) -> np.ndarray:
    """DDPO's compressibility reward: ``-jpeg_size_kb(images)``, float32 ``[B]`` (a
    :class:`~jdpt.rewards.reward.Reward`: the prompts are ignored)."""
    return -jpeg_size_kb(images)


def jpeg_incompressibility(images, prompts=None) -> np.ndarray:
    """DDPO's incompressibility reward: ``+jpeg_size_kb(images)``, float32 ``[B]`` (a
    :class:`~jdpt.rewards.reward.Reward`: the prompts are ignored)."""
    return jpeg_size_kb(images)
