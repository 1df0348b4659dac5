"""The guidance interface the samplers drive: a :class:`Guidance` method names the *branches* of
one batched forward (a tuple over ``"uncond"``, ``"cond"`` and ``"perturbed"``: the pipeline
stacks the latents once per branch, with the negative prompt for ``"uncond"`` and the prompt for
the others), gives attention *plans* for that batch and *combines* the stacked predictions.
The methods themselves (CFG, CFG-Zero*, PAG, SEG, ...) are :mod:`jdpt.guidance`.
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from jdpt.models.attention import LayerPlans

Array = jax.Array

BRANCHES = ("uncond", "cond", "perturbed")


class Guidance(Protocol):
    """What a pipeline needs from a guidance method (a pytree: pass it through ``jax.jit``).

    Attributes:
        branches: the chunks of the batched forward, in order, each one of ``BRANCHES``.
    """

    branches: tuple[str, ...]

    def plans(self, model: nnx.Module, batch: int, latent_size: tuple[int, int]) -> LayerPlans | None:
        """Attention plans for a forward over ``len(branches) * batch`` rows (branch-major) of
        latents of spatial size ``latent_size`` (the denoiser's input ``[H, W]``)."""
        ...

    def combine(self, predictions: Array, *, step: Array, timestep: Array) -> Array:
        """``[len(branches) * B, ...]`` predictions -> guided ``[B, ...]`` fp32 prediction.

        ``step`` is the int32 index of the denoising step (0 first), ``timestep`` the model's
        timestep in ``[0, 1000]`` (``sigma * 1000`` for flow models).
        """
        ...


def split_branches(predictions: Array, branches: tuple[str, ...]) -> dict[str, Array]:
    """``[n * B, ...]`` branch-major predictions -> ``{branch: [B, ...] fp32}``."""
    n = len(branches)
    if predictions.shape[0] % n:
        raise ValueError(
            f"predictions have {predictions.shape[0]} rows, not a multiple of the {n} branches {branches}"
        )
    chunks = jnp.split(predictions.astype(jnp.float32), n)
    return dict(zip(branches, chunks))


def stack_branches(branches: tuple[str, ...], positive: Array, negative: Array | None) -> Array:
    """The conditioning of a branch-major batch: ``negative`` for ``"uncond"``, ``positive`` for
    ``"cond"`` and ``"perturbed"``; ``[len(branches) * B, ...]``."""
    unknown = [b for b in branches if b not in BRANCHES]
    if unknown or not branches:
        raise ValueError(f"guidance branches must be a non-empty tuple over {BRANCHES}; got {branches}")
    if "uncond" in branches and negative is None:
        raise ValueError(f"guidance with branches {branches} needs the negative (unconditional) prompt embeddings")
    return jnp.concatenate([negative if b == "uncond" else positive for b in branches])


def step_index(levels: Array, level: Array) -> Array:
    """Index of the step at ``level`` in the decreasing ``levels`` ``[N]`` (timesteps or sigmas
    of the steps, in order): the number of levels above it, int32."""
    return jnp.sum(jnp.asarray(levels) > level).astype(jnp.int32)
