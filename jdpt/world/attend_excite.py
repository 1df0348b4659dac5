"""Attend-and-Excite on the Shapes-world model: its Flux's image -> text attention maps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jdpt.guidance.attend_excite import MapsFn, aggregate_maps, cross_attention_plans

Array = jax.Array


def world_maps(model, context: Array, pooled: Array, layers: str | None = None) -> MapsFn:
    """``(tokens, sigma) -> [B, N, L]`` image -> text maps of the Shapes-world Flux for the
    conditional ``context [B, L, D]``, ``pooled [B, D]``."""
    plans = cross_attention_plans(model.transformer, layers)
    h, w = model.latent_size
    graphdef, state = nnx.split(model)  # merged inside each call: sowing works under any transform

    def maps(z, sigma):
        call = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)
        _, captured = call(z, jnp.full((z.shape[0],), sigma), context, pooled, plans=plans)
        return aggregate_maps(captured, h * w // 4, layout="text_first")

    return maps
