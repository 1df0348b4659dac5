"""Rewards: the interface of online post-training (:class:`Reward`, scores decoded images
against their prompts; :func:`score` calls and checks one) and JPEG (in)compressibility (DDPO's).
The Shapes world's GenEval-lite verifier is ``jdpt.world.verifier.VerifierReward``."""

from jdpt.rewards.compressibility import jpeg_compressibility, jpeg_incompressibility, jpeg_size_kb
from jdpt.rewards.reward import Reward, score

__all__ = ["Reward", "jpeg_compressibility", "jpeg_incompressibility", "jpeg_size_kb", "score"]
