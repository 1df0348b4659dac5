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

Array = jax.Array
Denoiser = Callable[[nnx.Module, Array, Array, Any], Array]


def check_prediction(denoise: Denoiser, prediction: str, objective: str) -> None:
    """Raise a ValueError when ``denoise`` is an adapter declaring (``.prediction``) another output
    than the ``prediction`` ``objective`` trains (e.g. an eps-prediction UNet under a flow loss)."""
    declared = getattr(denoise, "prediction", None)
    if declared is not None and declared != prediction:
        raise ValueError(
            f"{objective} treats the model's output as {prediction!r} but {type(denoise).__name__} predicts "
            f"{declared!r}: give the objective the model's convention (process=ForwardProcess.ddpm(schedule) "
            "or schedule= with that prediction_type for DDPM models; the flow settings for velocity models)")


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
