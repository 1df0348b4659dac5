"""Rewards: JPEG (in)compressibility (DDPO's). The Shapes world's GenEval-lite verifier lives in
:mod:`jdpt.world.verifier`."""

from jdpt.rewards.compressibility import jpeg_compressibility, jpeg_incompressibility, jpeg_size_kb

__all__ = ["jpeg_compressibility", "jpeg_incompressibility", "jpeg_size_kb"]
