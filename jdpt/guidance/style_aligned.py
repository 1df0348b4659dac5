"""StyleAligned: a set of images sharing one reference's style through shared self-attention.

Hertz, Voynov, Fruchter, Cohen-Or, "Style Aligned Image Generation via Shared Attention",
CVPR 2024 (reference code google/style-aligned ``sa_handler.py``, ``inversion.py``). Every
self-attention layer of the batch ``[uncond 0..n-1, cond 0..n-1]`` (image 0 of each half the
reference) AdaIN-normalises queries and keys towards the reference's statistics and appends the
reference's keys and values to every image's own (:class:`jdpt.models.attention.SharedReference`
does the attention part; this module builds the plans, inverts a reference image and runs the
sampler with the reference row pinned to its inverted trajectory).

What "self-attention" means per model:

- UNet: every ``*.self`` layer (``attn1``); all its tokens are image tokens.
- Flux (double- and single-stream) and SD3 (joint ``attn`` and image-only ``attn2``): every
  attention layer, restricted to the image tokens of the joint sequence: AdaIN statistics are
  taken over the image tokens only, only the reference's image keys/values are shared, and only
  image queries see them (text tokens attend as without StyleAligned). The reference rows keep
  plain attention, so the reference's own prediction is unchanged.

Defaults follow the paper's transfer setting (spec ``methods/enhancement-and-control.md`` s. 4):
DDIM inversion of the reference with 50 steps and CFG 2, generation with CFG 10; shared
group/layer-norm statistics are off (as the SDXL real-image demo).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jdpt.diffusion.branches import split_branches
from jdpt.diffusion.samplers import ddim_step
from jdpt.diffusion.schedules import (
    DDPMSchedule,
    alpha_cumprod_at,
    inference_timesteps,
    prediction_to_x0_eps,
)
from jdpt.guidance.cfg import cfg
from jdpt.guidance.perturbation import attention_layers
from jdpt.models.attention import AttentionPlan, LayerPlans, SharedReference
from jdpt.models.unet import UNet2DConditionModel

Array = jax.Array
Denoise = Callable[[Array, Array], Array]


@dataclasses.dataclass(frozen=True)
class StyleAlignedConfig:
    """StyleAligned hyper-parameters (Hertz et al. 2024; defaults from google/style-aligned).

    Attributes:
        score_shift: ``shared_score_shift``, log-bias on the reference keys (0 in
            ``StyleAlignedArgs``; ``ln 2`` in the style-transfer notebook).
        score_scale: ``shared_score_scale``, multiplies the reference keys of the other images.
        adain_queries, adain_keys, adain_values: AdaIN on q / k / v (True, True, False).
        inversion_steps: DDIM (or Euler) inversion steps of a reference image (50).
        inversion_guidance: CFG scale of the inversion (2).
        guidance_scale: CFG scale of the generation (10, the transfer setting).
    """

    score_shift: float = 0.0
    score_scale: float = 1.0
    adain_queries: bool = True
    adain_keys: bool = True
    adain_values: bool = False
    inversion_steps: int = 50
    inversion_guidance: float = 2.0
    guidance_scale: float = 10.0

    def shared_reference(self, groups: int) -> SharedReference:
        return SharedReference(score_shift=self.score_shift, score_scale=self.score_scale, groups=groups,
                               adain_queries=self.adain_queries, adain_keys=self.adain_keys,
                               adain_values=self.adain_values)


def style_aligned_layers(model: nnx.Module) -> str:
    """The layers StyleAligned shares, as a pattern over the model's layer names: ``*.self`` for
    a UNet, every attention layer for Flux / SD3 (image tokens only, see the module docstring)."""
    return r".*\.self" if isinstance(model, UNet2DConditionModel) else r".*"


def style_aligned_plans(model: nnx.Module, latent_size: tuple[int, int], *, groups: int = 2,
                        config: StyleAlignedConfig = StyleAlignedConfig(), layers: str | None = None,
                        impl: str = "xla") -> LayerPlans:
    """Plans sharing the reference's attention on every self-attention layer of ``model``.

    Args:
        model: ``UNet2DConditionModel``, ``FluxTransformer`` or ``SD3Transformer``.
        latent_size: the denoiser input's spatial ``[H, W]`` (for Flux the unpacked latent).
        groups: batch chunks each led by its reference: 2 for the CFG batch
            ``[uncond 0..n-1, cond 0..n-1]``, 1 without CFG.
        layers: regex over layer names overriding :func:`style_aligned_layers` (cross-attention
            layers are never shared).
    Returns:
        ``LayerPlans`` for a forward over the whole ``groups * n`` batch.
    """
    info = attention_layers(model, latent_size)
    pattern = layers or style_aligned_layers(model)
    chosen = [n for n in info if re.fullmatch(pattern, n) and not n.endswith(".cross")]
    if not chosen:
        raise ValueError(f"layer pattern {pattern!r} matches no self-attention layer; the model's layers are: "
                         f"{list(info)}")
    shared = config.shared_reference(groups)
    plans = {n: AttentionPlan(grid=info[n].grid, shared_reference=shared, impl=impl) for n in chosen}
    return LayerPlans(default=AttentionPlan(impl=impl), layers=plans)


@struct.dataclass
class StyleAligned:
    """StyleAligned as a :class:`jdpt.guidance.cfg.Guidance`: the CFG batch ``[uncond, cond]``
    (row 0 of each the reference) with shared-attention plans, combined by CFG.

    Attributes:
        config: :class:`StyleAlignedConfig` (static).
        scale: CFG ``w`` of the generation (traced; the transfer setting's 10).
    """

    config: StyleAlignedConfig = struct.field(pytree_node=False, default=StyleAlignedConfig())
    scale: float | Array = 10.0
    branches: tuple[str, ...] = struct.field(pytree_node=False, default=("uncond", "cond"))

    def plans(self, model: nnx.Module, batch: int, latent_size: tuple[int, int]) -> LayerPlans:
        return style_aligned_plans(model, latent_size, groups=len(self.branches), config=self.config)

    def combine(self, predictions: Array, *, step: Array, timestep: Array) -> Array:
        p = split_branches(predictions, self.branches)
        return cfg(p["uncond"], p["cond"], self.scale)


def ddim_invert(denoise: Denoise, x0: Array, schedule: DDPMSchedule, num_steps: int) -> Array:
    """Deterministic DDIM inversion (google/style-aligned ``inversion.py``): from the clean
    latent up the grid that :func:`jdpt.diffusion.samplers.ddim_sample` walks down.

    Step ``k`` goes from ``t_low = t - T // N`` to ``t`` (the sampler's timesteps ascending),
    evaluating the model at the *higher* timestep on the lower latent:
    ``x_t = sqrt(a_t) x0_hat + sqrt(1 - a_t) eps``, ``(x0_hat, eps)`` from ``denoise(x_low, t)``
    with ``a_low`` (``final_alpha_cumprod`` below 0). With a prediction that does not depend on
    ``x`` this is the exact inverse of DDIM sampling.

    Args:
        denoise: ``(x, t) -> prediction`` (the caller's CFG: the paper inverts with scale 2).
        x0: ``[B, ...]`` clean latents.
    Returns:
        ``[N + 1, B, ...]`` fp32 latents ordered as the sampler visits them: ``[0]`` the most
        noisy (``x_T``), ``[N]`` = ``x0``.
    """
    t = inference_timesteps(schedule, num_steps)[::-1].copy()
    t_low = t - schedule.num_train_timesteps // num_steps
    x0 = jnp.asarray(x0, jnp.float32)

    def body(x, step):
        t_i, t_low_i = step
        a_low = alpha_cumprod_at(schedule, t_low_i, final=schedule.final_alpha_cumprod)
        x0_hat, eps = prediction_to_x0_eps(denoise(x, t_i), x, a_low, schedule.prediction_type)
        a_t = alpha_cumprod_at(schedule, t_i)
        x_next = jnp.sqrt(a_t) * x0_hat + jnp.sqrt(1 - a_t) * eps
        return x_next, x_next

    _, states = jax.lax.scan(body, x0, (jnp.asarray(t), jnp.asarray(t_low)))
    return jnp.concatenate([x0[None], states])[::-1]


def euler_invert(velocity: Denoise, x0: Array, sigmas: Array) -> Array:
    """Euler inversion of the flow ODE ``dx/dsigma = v``: the mirror of
    :func:`jdpt.diffusion.samplers.euler_flow` over the same ``sigmas``.

    Step ``k`` goes from ``sigma_{j+1}`` up to ``sigma_j`` as ``x + (sigma_j - sigma_{j+1}) v``
    with ``v = velocity(x, sigma_j)``, the velocity at the *higher* noise level (as DDIM
    inversion evaluates at the higher timestep), so that with an ``x``-independent velocity
    inversion followed by Euler sampling returns ``x0`` exactly.

    Args:
        velocity: ``(x, sigma) -> v`` (the caller's CFG).
        x0: ``[B, ...]`` clean latents.
        sigmas: ``[N + 1]`` decreasing noise levels ending at 0 (``flow_sigmas``).
    Returns:
        ``[N + 1, B, ...]`` fp32 latents at ``sigmas[0], ..., sigmas[N]`` (``[N]`` = ``x0``).
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    x0 = jnp.asarray(x0, jnp.float32)

    def body(x, step):
        sigma_hi, sigma_lo = step
        x_next = x + (sigma_hi - sigma_lo) * velocity(x, sigma_hi).astype(jnp.float32)
        return x_next, x_next

    _, states = jax.lax.scan(body, x0, (sigmas[:-1][::-1], sigmas[1:][::-1]))
    return jnp.concatenate([x0[None], states])[::-1]


def _pinned_indices(num_steps: int, offset: int) -> tuple[int, np.ndarray]:
    """``inversion.make_inversion_callback``: the run starts from ``trajectory[offset]`` and
    after step ``i`` the reference row is ``trajectory[max(offset + 1, i + 1)]``."""
    if not 0 <= offset < num_steps:
        raise ValueError(f"offset must be in [0, num_steps={num_steps}); got {offset}")
    return offset, np.maximum(offset + 1, np.arange(num_steps) + 1)


def _run_pinned(step: Callable[[Array, Array, Array, Array], Array], denoise: Denoise, x: Array,
                t: Array, t_next: Array, trajectory: Array, offset: int) -> Array:
    n = t.shape[0]
    if trajectory.shape != (n + 1, *x.shape[1:]) and trajectory.shape != (n + 1, 1, *x.shape[1:]):
        raise ValueError(
            f"trajectory must be the reference's inverted latents [N + 1, ...] = {(n + 1, *x.shape[1:])} "
            f"(ddim_invert / euler_invert of one image, N = {n} steps); got {tuple(trajectory.shape)}"
        )
    trajectory = jnp.reshape(trajectory, (n + 1, *x.shape[1:]))
    start, pinned = _pinned_indices(n, offset)
    x = jnp.asarray(x).at[0].set(trajectory[start].astype(x.dtype))

    def body(x_cur, inputs):
        t_i, t_next_i, pin = inputs
        x_next = step(denoise(x_cur, t_i), x_cur, t_i, t_next_i).astype(x_cur.dtype)
        return x_next.at[0].set(trajectory[pin].astype(x_cur.dtype)), None

    out, _ = jax.lax.scan(body, x, (t, t_next, jnp.asarray(pinned)))
    return out


def ddim_sample_pinned(denoise: Denoise, x: Array, schedule: DDPMSchedule, num_steps: int, trajectory: Array,
                       *, offset: int = 0) -> Array:
    """Deterministic DDIM sampling (``ddim_sample``'s grid, ``eta = 0``) with row 0 (the
    reference) replaced by its inverted ``trajectory`` at the start and after every step.

    Args:
        denoise: ``(x [n, ...], t) -> prediction [n, ...]``; it runs the whole set at once
            (typically CFG over ``[uncond, cond]`` with :func:`style_aligned_plans`).
        x: ``[n, ...]`` initial noise; row 0 is overwritten.
        trajectory: ``[N + 1, ...]`` from :func:`ddim_invert` of the reference image.
        offset: start the reference from ``trajectory[offset]`` (``make_inversion_callback``).
    Returns:
        ``[n, ...]`` samples; row 0 is ``trajectory[N]``, the reference's clean latent.
    """
    t = inference_timesteps(schedule, num_steps)
    t_prev = t - schedule.num_train_timesteps // num_steps

    def step(prediction, x_t, t_i, t_prev_i):
        return ddim_step(prediction, x_t, t_i, t_prev_i, schedule)[0]

    return _run_pinned(step, denoise, x, jnp.asarray(t), jnp.asarray(t_prev), trajectory, offset)


def euler_flow_pinned(velocity: Denoise, x: Array, sigmas: Array, trajectory: Array, *, offset: int = 0) -> Array:
    """Euler flow sampling (``euler_flow``) with row 0 replaced by its inverted ``trajectory``
    (:func:`euler_invert`) at the start and after every step; arguments as
    :func:`ddim_sample_pinned` with ``sigmas [N + 1]`` for the schedule."""
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def step(v, x_cur, sigma, sigma_next):
        return x_cur.astype(jnp.float32) + (sigma_next - sigma) * v.astype(jnp.float32)

    return _run_pinned(step, velocity, x, sigmas[:-1], sigmas[1:], trajectory, offset)
