"""Attend-and-Excite: latent updates that make every subject token of the prompt attended.

Chefer, Alaluf, Vinker, Wolf, Cohen-Or, "Attend-and-Excite: Attention-Based Semantic Guidance
for Text-to-Image Diffusion Models", SIGGRAPH 2023 (reference code yuval-alaluf/Attend-and-Excite
``pipeline_attend_and_excite.py``). At each early step of sampling, the conditional prompt's
cross-attention maps give each subject token ``s`` a spatial maximum ``A_s``; the loss
``L = max_s max(0, 1 - A_s)`` is lowered by a gradient step on the latent,
``z <- z - alpha_i grad L``, with iterative refinement at a few steps, before the normal guided
denoising step.

Maps per model (``AttentionPlan(return_probs=True)`` on the chosen layers, read back with
``nnx.capture(model, nnx.Intermediate)``, averaged over layers; the plan's maps are already
averaged over heads):

- UNet: the ``*.cross`` layers whose query count is the chosen resolution (the paper: 16x16 of
  SD at 512 px, from the down, mid and up blocks): ``[B, hw, L]``.
- Flux / SD3 joint attention: the image-query -> text-key block of the joint map (Flux
  ``[text, image]``, SD3 ``[image, text]``). The ``x100`` softmax over text tokens renormalises
  it, so the image keys' share of each row does not matter.

Step-count scaling: the paper's schedule is for ``T = 50`` steps (updates while ``i < 25``,
refinement at steps 0, 10, 20). For ``N`` steps the step indices are scaled by ``N / 50``
(rounded), and ``alpha_i = scale_factor * sqrt(linspace(1, 0.5, N)[i])`` uses the actual ``N``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdpt.diffusion.samplers import ddim_step
from jdpt.diffusion.schedules import DDPMSchedule, inference_timesteps
from jdpt.models.attention import AttentionPlan, LayerPlans, attention_layer_names, plan_layers
from jdpt.models.flux import FluxTransformer
from jdpt.models.sd3 import SD3Transformer
from jdpt.models.unet import UNet2DConditionModel

Array = jax.Array
Denoise = Callable[[Array, Array], Array]
MapsFn = Callable[[Array, Array], Array]


@dataclasses.dataclass(frozen=True)
class AttendExciteConfig:
    """Attend-and-Excite hyper-parameters (Chefer et al. 2023; defaults = the reference's).

    Attributes:
        scale_factor: step size factor (20): ``alpha_i = scale_factor * sqrt(linspace(*scale_range, N)[i])``.
        scale_range: (1.0, 0.5).
        max_iter_to_alter: latent updates while ``i < 25`` (of ``reference_steps``).
        thresholds: ``((step, threshold), ...)`` iterative refinement (0: 0.05, 10: 0.5, 20: 0.8):
            at ``step``, while ``L > 1 - threshold``, update the latent again.
        max_refinement_steps: at most 20 refinement updates per refinement step.
        temperature: the maps are multiplied by 100 before the softmax over text tokens.
        smooth, sigma, kernel_size: 3x3 Gaussian smoothing with ``sigma = 0.5`` and reflect
            padding. As the reference's ``GaussianSmoothing`` the taps are
            ``exp(-((x - mean) / (2 sigma))^2)`` normalised to sum 1 (a textbook Gaussian of
            width ``sigma * sqrt(2)``).
        reference_steps: the step count the step indices above refer to (50).
    """

    scale_factor: float = 20.0
    scale_range: tuple[float, float] = (1.0, 0.5)
    max_iter_to_alter: int = 25
    thresholds: tuple[tuple[int, float], ...] = ((0, 0.05), (10, 0.5), (20, 0.8))
    max_refinement_steps: int = 20
    temperature: float = 100.0
    smooth: bool = True
    sigma: float = 0.5
    kernel_size: int = 3
    reference_steps: int = 50

    def schedule(self, num_steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-step ``(step_size [N], excite [N] bool, threshold [N])`` for ``N`` steps
        (threshold ``-1`` where no refinement runs); indices scaled by ``N / reference_steps``."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1; got {num_steps}")
        ratio = num_steps / self.reference_steps
        step_size = self.scale_factor * np.sqrt(np.linspace(*self.scale_range, num_steps))
        excite = np.arange(num_steps) < round(self.max_iter_to_alter * ratio)
        threshold = np.full(num_steps, -1.0)
        for step, value in self.thresholds:
            i = round(step * ratio)
            if i < num_steps:
                threshold[i] = value
        return step_size.astype(np.float32), excite, threshold.astype(np.float32)


def gaussian_kernel(sigma: float, kernel_size: int) -> np.ndarray:
    """``[k, k]`` taps of the reference's ``GaussianSmoothing`` (see :class:`AttendExciteConfig`)."""
    x = np.arange(kernel_size) - (kernel_size - 1) / 2
    taps = np.exp(-((x / (2 * sigma)) ** 2))
    kernel = np.outer(taps, taps)
    return kernel / kernel.sum()


def smooth_maps(maps: Array, sigma: float = 0.5, kernel_size: int = 3) -> Array:
    """Gaussian-smooth ``maps [..., h, w]`` with reflect padding (same size out)."""
    pad = kernel_size // 2
    lead = maps.shape[:-2]
    x = maps.reshape(-1, *maps.shape[-2:])
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    kernel = jnp.asarray(gaussian_kernel(sigma, kernel_size), maps.dtype)
    out = jax.lax.conv_general_dilated(x[:, None], kernel[None, None], (1, 1), "VALID",
                                       precision=jax.lax.Precision.HIGHEST)
    return out.reshape(*lead, *maps.shape[-2:])


def default_text_mask(length: int) -> np.ndarray:
    """``[L]`` bool: the reference's default token range ``1:-1`` (drops the start token and the
    last position)."""
    mask = np.ones(length, bool)
    mask[0] = mask[-1] = False
    return mask


def subject_maxima(probs: Array, token_ids: Array, grid: tuple[int, int], *,
                   text_mask: Array | None = None, config: AttendExciteConfig = AttendExciteConfig()) -> Array:
    """``A_s``: each subject token's (smoothed) spatial maximum of its attention map.

    Args:
        probs: ``[B, h*w, L]`` cross-attention probabilities of the conditional prompt
            (image queries -> text tokens), averaged over layers and heads.
        token_ids: ``[B, K]`` int positions of the subject tokens in the prompt (start token
            at 0, as the reference's ``indices_to_alter``); each must lie in ``text_mask``.
        grid: ``(h, w)`` of the image queries.
        text_mask: ``[L]`` or ``[B, L]`` bool, the tokens of the softmax (default
            :func:`default_text_mask`; the reference's ``normalize_eot`` keeps the words only).
    Returns:
        ``[B, K]`` fp32.
    """
    b, p, length = probs.shape
    h, w = grid
    if p != h * w:
        raise ValueError(f"probs have {p} image queries; grid {h}x{w} needs {h * w}")
    mask = default_text_mask(length) if text_mask is None else text_mask
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), (b, length))
    logits = jnp.where(mask[:, None], probs.astype(jnp.float32) * config.temperature, -jnp.inf)
    text = jax.nn.softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(text, jnp.asarray(token_ids)[:, None, :], axis=-1)  # [B, P, K]
    maps = jnp.moveaxis(chosen, -1, 1).reshape(b, -1, h, w)
    if config.smooth:
        maps = smooth_maps(maps, config.sigma, config.kernel_size)
    return maps.max(axis=(-2, -1))


def attend_excite_loss(probs: Array, token_ids: Array, grid: tuple[int, int], *, text_mask: Array | None = None,
                       config: AttendExciteConfig = AttendExciteConfig()) -> Array:
    """``L = max_s max(0, 1 - A_s)`` per sample, ``[B]`` fp32 (arguments as :func:`subject_maxima`)."""
    maxima = subject_maxima(probs, token_ids, grid, text_mask=text_mask, config=config)
    return jnp.maximum(0.0, 1.0 - maxima).max(axis=-1)


def excite_step(loss_fn: Callable[[Array], Array], z: Array, step_size: Array, excite: Array,
                threshold: Array, *, max_refinement_steps: int = 20) -> tuple[Array, Array]:
    """One step's latent update, the reference's loop per sample.

    If ``threshold >= 0`` and ``L > 1 - threshold``: refinement, ``z <- z - step_size grad L``
    (where ``L > 0``) repeated while the loss seen before the update exceeds
    ``max(0, 1 - threshold)``, at most ``max_refinement_steps`` times. Then, if ``excite``, one
    more update at the resulting latent. Samples are independent: ``loss_fn``'s per-sample
    losses are summed for the gradient.

    Args:
        loss_fn: ``z [B, ...] -> L [B]``.
        z: ``[B, ...]`` latents.
        step_size, excite, threshold: this step's scalars (from ``AttendExciteConfig.schedule``).
    Returns:
        ``(z, L)``: the updated latents (in ``z``'s dtype) and ``[B]`` the loss before the final
        update.
    """
    def value_and_grad(x):
        losses, vjp = jax.vjp(loss_fn, x)
        return losses, vjp(jnp.ones_like(losses))[0]

    per_sample = (z.shape[0],) + (1,) * (z.ndim - 1)

    def update(x, losses, grad, active):
        move = (active & (losses > 0)).reshape(per_sample)
        return jnp.where(move, x - step_size * grad.astype(jnp.float32), x.astype(jnp.float32)).astype(x.dtype)

    losses, grad = value_and_grad(z)
    target = jnp.maximum(0.0, 1.0 - threshold)
    active = (threshold >= 0) & (losses > target)

    def cond(state):
        return jnp.any(state[3])

    def body(state):
        x, losses, grad, active, it = state
        x = update(x, losses, grad, active)
        it = it + 1
        active = active & (losses > target) & (it < max_refinement_steps)
        losses_new, grad_new = value_and_grad(x)
        return x, losses_new, grad_new, active, it

    z, losses, grad, _, _ = jax.lax.while_loop(cond, body, (z, losses, grad, active, jnp.int32(0)))
    z = update(z, losses, grad, jnp.broadcast_to(excite, losses.shape))
    return z, losses


def cross_attention_plans(model: nnx.Module, layers: str | None = None) -> LayerPlans:
    """Plans returning probabilities on the Attend-and-Excite layers: every UNet ``*.cross``
    layer (filtered by resolution in :func:`aggregate_maps`), the double-stream joint layers of
    Flux, the joint ``attn`` layers of SD3; ``layers`` (a regex) overrides."""
    if layers is None:
        if isinstance(model, UNet2DConditionModel):
            layers = r".*\.cross"
        elif isinstance(model, (FluxTransformer, SD3Transformer)):
            layers = r"transformer_blocks\.\d+\.attn"
        else:
            raise ValueError(f"pass layers= for a {type(model).__name__}; defaults exist for UNet, Flux and SD3")
    return plan_layers(attention_layer_names(model), layers, AttentionPlan(return_probs=True))


def aggregate_maps(captured, num_image: int, *, layout: str) -> Array:
    """Average the captured ``attn_probs`` into ``[B, num_image, L]`` image -> text maps.

    Args:
        captured: the ``nnx.Intermediate`` state from ``nnx.capture`` under
            :func:`cross_attention_plans`.
        num_image: image tokens (``h * w`` of the chosen resolution).
        layout: ``"cross"`` (UNet ``[B, P, L]`` maps; those with ``P == num_image`` are kept),
            ``"text_first"`` (Flux joint ``[text, image]``) or ``"image_first"`` (SD3).
    """
    maps = []
    for probs in jax.tree.leaves(captured):
        if layout == "cross":
            if probs.shape[1] == num_image:
                maps.append(probs)
        elif layout == "text_first":
            n_text = probs.shape[1] - num_image
            maps.append(probs[:, n_text:, :n_text])
        elif layout == "image_first":
            maps.append(probs[:, :num_image, num_image:])
        else:
            raise ValueError(f"layout must be 'cross', 'text_first' or 'image_first'; got {layout!r}")
    if not maps:
        raise ValueError(f"no captured attention map has {num_image} image queries; choose the resolution of a "
                         "cross-attention layer (e.g. 16x16 for SD at 512 px)")
    return jnp.mean(jnp.stack(maps), axis=0)


def unet_maps(unet: UNet2DConditionModel, context: Array, resolution: tuple[int, int],
              layers: str | None = None) -> MapsFn:
    """``(z, t) -> [B, h*w, L]`` cross-attention maps of ``unet`` for the conditional ``context``
    ``[B, L, D]`` at the ``resolution`` ``(h, w)`` of some cross-attention layers."""
    plans = cross_attention_plans(unet, layers)
    graphdef, state = nnx.split(unet)  # merged inside each call: sowing works under any transform

    def maps(z, t):
        _, captured = nnx.capture(nnx.merge(graphdef, state), nnx.Intermediate)(z, t, context, plans=plans)
        return aggregate_maps(captured, resolution[0] * resolution[1], layout="cross")

    return maps


def _sample(step: Callable[[Array, Array, Array, Array], Array], maps: MapsFn, denoise: Denoise, z: Array,
            t: Array, t_next: Array, token_ids: Array, grid: tuple[int, int], text_mask, config) -> tuple[Array, Array]:
    step_size, excite, threshold = (jnp.asarray(a) for a in config.schedule(t.shape[0]))

    def body(x, inputs):
        t_i, t_next_i, size_i, excite_i, thr_i = inputs

        def loss_fn(x_):
            return attend_excite_loss(maps(x_, t_i), token_ids, grid, text_mask=text_mask, config=config)

        x, losses = excite_step(loss_fn, x, size_i, excite_i, thr_i,
                                max_refinement_steps=config.max_refinement_steps)
        return step(denoise(x, t_i), x, t_i, t_next_i).astype(x.dtype), losses

    return jax.lax.scan(body, z, (t, t_next, step_size, excite, threshold))


def attend_excite_ddim(maps: MapsFn, denoise: Denoise, z: Array, schedule: DDPMSchedule, num_steps: int,
                       token_ids: Array, grid: tuple[int, int], *, text_mask: Array | None = None,
                       config: AttendExciteConfig = AttendExciteConfig()) -> tuple[Array, Array]:
    """Deterministic DDIM sampling (``ddim_sample``'s grid) with Attend-and-Excite updates.

    Args:
        maps: ``(z, t) -> [B, h*w, L]`` maps of the conditional prompt (:func:`unet_maps`).
        denoise: ``(z, t) -> prediction``, the guided step (the paper: CFG 7.5).
        z: ``[B, ...]`` initial noise.
        token_ids, grid, text_mask: as :func:`subject_maxima`.
    Returns:
        ``(samples [B, ...], losses [N, B])`` (each step's loss before its final update).
    """
    t = inference_timesteps(schedule, num_steps)
    t_prev = t - schedule.num_train_timesteps // num_steps

    def step(prediction, x, t_i, t_prev_i):
        return ddim_step(prediction, x, t_i, t_prev_i, schedule)[0]

    return _sample(step, maps, denoise, z, jnp.asarray(t), jnp.asarray(t_prev), token_ids, grid, text_mask, config)


def attend_excite_euler(maps: MapsFn, velocity: Denoise, z: Array, sigmas: Array, token_ids: Array,
                        grid: tuple[int, int], *, text_mask: Array | None = None,
                        config: AttendExciteConfig = AttendExciteConfig()) -> tuple[Array, Array]:
    """Euler flow sampling (``euler_flow``) with Attend-and-Excite updates; arguments as
    :func:`attend_excite_ddim` with ``sigmas [N + 1]`` (``maps`` e.g. :func:`jdpt.world.attend_excite.world_maps`)."""
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def step(v, x, sigma, sigma_next):
        return x.astype(jnp.float32) + (sigma_next - sigma) * v.astype(jnp.float32)

    return _sample(step, maps, velocity, z, sigmas[:-1], sigmas[1:], token_ids, grid, text_mask, config)
