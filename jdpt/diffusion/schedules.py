"""Noise schedules. Rectified flow: x_sigma = (1 - sigma) x_0 + sigma * noise, sigma from 1 to 0.

Matches diffusers' ``FlowMatchEulerDiscreteScheduler`` as the Flux and SD3 pipelines configure it.
"""

from __future__ import annotations

import math

import numpy as np


def flux_mu(image_seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent shift exponent ``mu`` (diffusers ``calculate_shift``): linear in the
    number of image tokens between ``base_shift`` at ``base_seq_len`` and ``max_shift`` at
    ``max_seq_len``."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def flow_sigmas(num_steps: int, *, shift: float = 1.0, mu: float | None = None) -> np.ndarray:
    """``num_steps + 1`` decreasing noise levels ending at 0 (fp32).

    The base grid is ``linspace(1, 1/num_steps, num_steps)``. With ``mu`` (Flux's dynamic
    shifting) each sigma becomes ``e^mu / (e^mu + 1/sigma - 1)``; otherwise the static shift
    ``shift * sigma / (1 + (shift - 1) * sigma)`` applies (SD3 uses 3.0).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
    if mu is not None:
        sigmas = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    else:
        sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    return np.append(sigmas, 0.0).astype(np.float32)
