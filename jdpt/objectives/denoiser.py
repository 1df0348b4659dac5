"""What every objective needs from a model: a denoiser call, its reference, and clean latents.

Objectives are model-agnostic. They see the model only through a :data:`Denoiser`:
``denoise(model, x_t, t, cond) -> prediction`` where ``t`` is in the model's own time convention
(flow models: ``sigma`` in ``[0, 1]`` with ``x_t = (1 - sigma) x0 + sigma eps`` and the velocity
``eps - x0`` as prediction; DDPM models: integer timesteps and an eps / v / sample prediction) and
``cond`` is any pytree the objective's batch carries for the model (token ids, text embeddings...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdpt.parallel.step import Frozen
from jdpt.world.model import WorldModel

Array = jax.Array
Denoiser = Callable[[nnx.Module, Array, Array, Any], Array]


def world_velocity(model: WorldModel, x_t: Array, t: Array, cond: dict) -> Array:
    """The Shapes-world model's velocity ``[B, N, C]`` for packed tokens ``x_t`` at ``sigma = t``
    ``[B]``; ``cond["input_ids"]`` ``[B, L]`` are the prompts' token ids."""
    context, pooled = model.encode_prompts(cond["input_ids"])
    return model(x_t, t, context, pooled)


def world_latents(model: WorldModel, images: Array) -> Array:
    """uint8 scenes ``[B, H, W, 3]`` -> the clean packed latents ``x0`` ``[B, N, C]`` the world
    model denoises (the same map as pretraining: :meth:`WorldModel.latents`)."""
    return model.latents(images)


def is_lora(params: nnx.State) -> bool:
    """True when every trainable variable is a LoRA adapter (``trainable="lora"``)."""
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return bool(leaves) and all(isinstance(x, nnx.LoRAParam) for x in leaves)


def reference_model(frozen: Frozen, params: nnx.State) -> nnx.Module:
    """The frozen reference policy of a KL / DPO term.

    - ``frozen.extra["reference"]`` (an ``nnx.State`` shaped like ``params``) when given: a
      separate reference copy (full fine-tuning).
    - otherwise, with LoRA params (``trainable="lora"``): the base model, i.e. the adapters set to
      zero; no second copy of the weights exists.
    """
    extra = frozen.extra
    if isinstance(extra, dict) and "reference" in extra:
        return frozen.model(extra["reference"])
    if is_lora(params):
        zeros = jax.tree.map(jnp.zeros_like, jax.lax.stop_gradient(params))
        return frozen.model(zeros)
    raise ValueError(
        "this objective needs a reference model: train LoRA adapters (trainable='lora'; the "
        "reference is the base without them) or pass init_state(model, extra={'reference': params}) "
        "with a frozen copy of the trainable params"
    )
