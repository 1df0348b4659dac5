"""Classifier-free guidance (Ho & Salimans 2022) and CFG-Zero* (Fan et al. 2025) as
:class:`~jdpt.diffusion.branches.Guidance` methods the pipelines drive (branches, attention
plans: ``None`` for CFG, and a combination rule; PAG/SEG perturb the ``"perturbed"`` rows, see
:mod:`jdpt.guidance.perturbation`).

All combinations compute in fp32 and return fp32.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
from flax import nnx, struct

from jdpt.diffusion.branches import split_branches
from jdpt.models.attention import LayerPlans

Array = jax.Array


def rescale_guided(guided: Array, cond: Array, rescale: float | Array) -> Array:
    """Lin et al. 2024 (Common Diffusion Noise Schedules...) guidance rescale, diffusers'
    ``rescale_noise_cfg``: blend ``guided`` with itself scaled to ``cond``'s per-sample std.

    guided, cond: ``[B, ...]``; rescale: ``phi`` in [0, 1] (0: off).
    """
    if isinstance(rescale, (int, float)) and rescale == 0:
        return guided  # off (also where std(guided) = 0, which would make the ratio NaN)
    axes = tuple(range(1, guided.ndim))
    ratio = jnp.std(cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True)
    return rescale * guided * ratio + (1 - rescale) * guided


def cfg(e_u: Array, e_c: Array, w: float | Array, rescale: float | Array = 0.0) -> Array:
    """Classifier-free guidance, diffusers' form ``e_u + w (e_c - e_u)`` (the paper's
    ``e_c + w' (e_c - e_u)`` is ``w = w' + 1``), with optional guidance rescale.

    e_u, e_c: ``[B, ...]`` unconditional / conditional predictions. Returns ``[B, ...]`` fp32.
    """
    e_u, e_c = jnp.asarray(e_u, jnp.float32), jnp.asarray(e_c, jnp.float32)
    _same_shape(e_u, e_c)
    guided = e_u + w * (e_c - e_u)
    return rescale_guided(guided, e_c, rescale)


def cfg_zero_star_scale(v_c: Array, v_u: Array, eps: float = 1e-8) -> Array:
    """CFG-Zero*'s optimised scale ``s* = <v_c, v_u> / (||v_u||^2 + eps)`` per sample (fp32),
    the projection coefficient of ``v_c`` on ``v_u`` over the flattened sample.

    v_c, v_u: ``[B, ...]``. Returns ``[B]`` fp32.
    """
    v_c, v_u = jnp.asarray(v_c, jnp.float32), jnp.asarray(v_u, jnp.float32)
    _same_shape(v_u, v_c)
    v_c, v_u = v_c.reshape(v_c.shape[0], -1), v_u.reshape(v_u.shape[0], -1)
    return jnp.sum(v_c * v_u, axis=1) / (jnp.sum(v_u * v_u, axis=1) + eps)


def cfg_zero_star(v_u: Array, v_c: Array, w: float | Array, step: int | Array, zero_steps: int | Array = 1,
                  rescale: float | Array = 0.0) -> Array:
    """CFG-Zero* (Fan et al. 2025, "CFG-Zero*: Improved Classifier-Free Guidance for Flow
    Matching Models"): ``v = s* v_u + w (v_c - s* v_u)`` with ``s*`` from
    :func:`cfg_zero_star_scale`, and zero-init: the output is 0 while ``step < zero_steps``.

    ``zero_steps`` counts zeroed steps (diffusers guider's ``zero_init_steps``, default 1); the
    authors' ``zero_steps = k`` (zero while ``i <= k``) is ``k + 1`` here. With Euler flow
    sampling a zero velocity leaves the latent unchanged.

    v_u, v_c: ``[B, ...]``; step: the step index (0 first). Returns ``[B, ...]`` fp32.
    """
    v_u, v_c = jnp.asarray(v_u, jnp.float32), jnp.asarray(v_c, jnp.float32)
    s = cfg_zero_star_scale(v_c, v_u).reshape(-1, *(1,) * (v_u.ndim - 1))
    scaled = s * v_u
    guided = rescale_guided(scaled + w * (v_c - scaled), v_c, rescale)
    return jnp.where(jnp.asarray(step) < zero_steps, jnp.zeros_like(guided), guided)


@struct.dataclass
class CFG:
    """Classifier-free guidance (Ho & Salimans 2022), diffusers' scale convention.

    Attributes:
        scale: ``w`` (SD default 7.5); traced.
        rescale: guidance rescale ``phi`` (Lin et al. 2024; 0: off); traced.
        combine_impl: ``"xla"`` (default, plain JAX) or ``"pallas"``: :func:`kernel_combine`.
    """

    scale: float | Array = 7.5
    rescale: float | Array = 0.0
    branches: tuple[str, ...] = struct.field(pytree_node=False, default=("uncond", "cond"))
    combine_impl: str = struct.field(pytree_node=False, default="xla")

    def plans(self, model: nnx.Module, batch: int, latent_size: tuple[int, int]) -> LayerPlans | None:
        return None

    def combine(self, predictions: Array, *, step: Array, timestep: Array) -> Array:
        if self.combine_impl != "xla":
            return kernel_combine(predictions, self.branches, "cfg", self.combine_impl, w=self.scale,
                                  rescale=self.rescale)
        p = split_branches(predictions, self.branches)
        return cfg(p["uncond"], p["cond"], self.scale, self.rescale)


@struct.dataclass
class CFGZeroStar:
    """CFG-Zero* (Fan et al. 2025): optimised scale and zero-init (see :func:`cfg_zero_star`).

    Attributes:
        scale: ``w`` (diffusers guider default 7.5); traced.
        zero_steps: number of initial steps whose prediction is zeroed (1 = the authors' code
            default, only the first step; the README suggests ~4% of the steps); traced.
        rescale: guidance rescale ``phi`` (0: off); traced.
        combine_impl: ``"xla"`` (default, plain JAX) or ``"pallas"``: :func:`kernel_combine`.
    """

    scale: float | Array = 7.5
    zero_steps: int | Array = 1
    rescale: float | Array = 0.0
    branches: tuple[str, ...] = struct.field(pytree_node=False, default=("uncond", "cond"))
    combine_impl: str = struct.field(pytree_node=False, default="xla")

    def plans(self, model: nnx.Module, batch: int, latent_size: tuple[int, int]) -> LayerPlans | None:
        return None

    def combine(self, predictions: Array, *, step: Array, timestep: Array) -> Array:
        if self.combine_impl != "xla":
            return kernel_combine(predictions, self.branches, "cfg_zero_star", self.combine_impl, w=self.scale,
                                  step=step, zero_steps=self.zero_steps, rescale=self.rescale)
        p = split_branches(predictions, self.branches)
        return cfg_zero_star(p["uncond"], p["cond"], self.scale, step, self.zero_steps, self.rescale)


_KERNEL_BRANCHES = {"cfg": (("uncond", "cond"),), "cfg_zero_star": (("uncond", "cond"),),
                    "pag": (("uncond", "cond", "perturbed"), ("cond", "perturbed"))}
# The combine kernel lives in an optional module (it imports this one), imported on first use;
# it registers its entry point with register_combine_kernel.
COMBINE_PLUGIN = "jdpt.kernels.guidance"
_COMBINE_KERNEL: list = []


def register_combine_kernel(fn) -> None:
    """Register ``guidance_combine(stacked [n, B, ...], rule, *, impl, out_dtype, **weights)``
    (:func:`jdpt.kernels.guidance.guidance_combine`) as the entry point of :func:`kernel_combine`."""
    _COMBINE_KERNEL[:] = [fn]


def kernel_combine(predictions: Array, branches: tuple[str, ...], rule: str, impl: str, **weights) -> Array:
    """A guidance object's ``combine`` through :func:`jdpt.kernels.guidance.guidance_combine`
    (``rule`` ``"cfg"``, ``"cfg_zero_star"`` or ``"pag"``; ``impl`` ``"xla"`` or ``"pallas"``), fp32
    output like the rules here. The kernel is opt-in: it has not yet beaten XLA's fusion of the
    plain-JAX rules (``experiments/results/bench_guidance.md``).

    predictions: ``[len(branches) * B, ...]`` branch-major. Returns ``[B, ...]`` fp32.
    """
    if not _COMBINE_KERNEL:
        importlib.import_module(COMBINE_PLUGIN)
    if branches not in _KERNEL_BRANCHES[rule]:
        raise ValueError(f"the guidance kernel's rule {rule!r} takes branches {_KERNEL_BRANCHES[rule]}; got {branches}")
    n = len(branches)
    if predictions.ndim < 2 or predictions.shape[0] % n:
        raise ValueError(
            f"predictions [{n} * B, ...] expected for the {n} branches {branches}; got shape {predictions.shape}"
        )
    stacked = predictions.reshape(n, predictions.shape[0] // n, *predictions.shape[1:])
    return _COMBINE_KERNEL[0](stacked, rule, impl=impl, out_dtype=jnp.float32, **weights)


def _same_shape(a: Array, b: Array) -> None:
    if a.shape != b.shape:
        raise ValueError(f"guidance predictions must have the same shape; got {a.shape} and {b.shape}")
