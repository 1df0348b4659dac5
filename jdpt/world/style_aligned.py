"""StyleAligned on the Shapes-world model: the library's plans and pinned Euler sampler
(:mod:`jdpt.guidance.style_aligned`) driven with the world's text tower and empty prompt."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdpt.diffusion.pipeline import to_uint8
from jdpt.diffusion.samplers import euler_flow
from jdpt.diffusion.schedules import flow_sigmas
from jdpt.guidance.cfg import cfg
from jdpt.guidance.style_aligned import StyleAlignedConfig, euler_flow_pinned, euler_invert, style_aligned_plans
from jdpt.models.flux import unpack_latents
from jdpt.world.adapter import world_latents
from jdpt.world.model import WorldModel, empty_prompt

Array = jax.Array


def world_style_aligned(model: WorldModel, input_ids: Array, key: Array, *, reference: Array | None = None,
                        steps: int = 20, config: StyleAlignedConfig = StyleAlignedConfig()) -> Array:
    """A style-aligned set from the Shapes-world model (Flux, Euler): uint8 ``[n, H, W, 3]``.

    Row 0 is the reference: generated from ``input_ids[0]`` when ``reference`` is None, else
    the uint8 scene ``reference [H, W, 3]``, Euler-inverted with ``input_ids[0]`` at CFG
    ``config.inversion_guidance`` and pinned to its trajectory. Generation runs CFG
    ``config.guidance_scale`` against the empty prompt, shared attention on the CFG batch.
    ``steps`` replaces ``config.inversion_steps`` for both (the world samples in 20 steps).
    """
    n = input_ids.shape[0]
    h, w = model.latent_size
    context, pooled = model.encode_prompts(input_ids)
    empty = jnp.broadcast_to(jnp.asarray(empty_prompt(input_ids.shape[1])), input_ids.shape)
    neg_context, neg_pooled = model.encode_prompts(empty)
    context, pooled = jnp.concatenate([neg_context, context]), jnp.concatenate([neg_pooled, pooled])
    plans = style_aligned_plans(model.transformer, (h, w), groups=2, config=config)
    sigmas = flow_sigmas(steps, shift=model.config.shift)

    def guided(ctx, pool, scale, plans):
        def velocity(x, sigma):
            both = jnp.concatenate([x, x])
            v = model(both, jnp.full((both.shape[0],), sigma), ctx, pool, plans=plans)
            v_u, v_c = jnp.split(v.astype(jnp.float32), 2)
            return cfg(v_u, v_c, scale)
        return velocity

    channels = model.config.flux_config().in_channels
    x = jax.random.normal(key, (n, h * w // 4, channels), jnp.float32)
    velocity = guided(context, pooled, config.guidance_scale, plans)
    if reference is None:
        tokens = euler_flow(velocity, x, sigmas)
    else:
        ref_ctx = jnp.concatenate([neg_context[:1], context[n:n + 1]])
        ref_pool = jnp.concatenate([neg_pooled[:1], pooled[n:n + 1]])
        x0 = world_latents(model, jnp.asarray(reference)[None])
        trajectory = euler_invert(guided(ref_ctx, ref_pool, config.inversion_guidance, None), x0, sigmas)
        tokens = euler_flow_pinned(velocity, x, sigmas, trajectory)
    return to_uint8(model.config.codec().decode_latents(unpack_latents(tokens, h, w)))
