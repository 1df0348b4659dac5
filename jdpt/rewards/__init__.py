"""Rewards: the Shapes-world GenEval-lite verifier and JPEG (in)compressibility."""

from jdpt.rewards.compressibility import jpeg_compressibility, jpeg_incompressibility, jpeg_size_kb
from jdpt.rewards.verifier import Detection, Verdict, detect, geneval_lite_reward, verify

__all__ = [
    "Detection",
    "Verdict",
    "detect",
    "geneval_lite_reward",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "verify",
]
