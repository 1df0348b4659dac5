"""The reward interface of online post-training.

A :class:`Reward` scores decoded images against their prompts on the host:
``reward(images, prompts) -> [B]`` with ``images`` uint8 ``[B, H, W, 3]`` (NumPy) and ``prompts``
the ``B`` prompt texts. JPEG (in)compressibility ignores the prompts; the Shapes world's verifier
(``jdpt.world.verifier.VerifierReward``) and learned scorers read them. :func:`score` calls one and
checks what it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class Reward(Protocol):
    """Host-side reward: uint8 images ``[B, H, W, 3]`` and ``B`` prompts -> ``[B]`` scores."""

    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray: ...


def score(reward: Reward, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
    """``reward(images, prompts)`` as float32 ``[B]``; a ValueError names a wrong shape or the
    rows whose score is NaN or infinite."""
    images = np.asarray(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give the reward one prompt per image")
    scores = np.asarray(reward(images, prompts), np.float64)
    if scores.shape != (len(images),):
        raise ValueError(f"the reward {getattr(reward, '__name__', type(reward).__name__)} returned shape "
                         f"{scores.shape} for {len(images)} images; a reward returns one score per image [B]")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"the reward gave non-finite scores {scores[bad[:4]].tolist()} at rows {bad[:4].tolist()}: "
                         "fix the reward (or the images it cannot score)")
    return scores.astype(np.float32)
