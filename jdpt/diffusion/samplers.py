"""Samplers: pure functions over a ``denoise(x, t) -> prediction`` callable, one jitted loop.

Every sampler is a ``jax.lax.scan`` over the steps of a schedule, so a whole run is one jittable
call. Each step is one *step function* returning the Gaussian transition ``x_next ~ N(mean, std²)``
(``ddim_step``, ``ddpm_step``, ``flow_sde_step``); samplers draw from it and the ``*_step_logprob``
functions re-evaluate a recorded transition under a new prediction (DDPO, Flow-GRPO), so the
two share all the math.

Log-probability convention (DDPO ``ddim_with_logprob``, Flow-GRPO ``sd3_sde_with_logprob``): per
sample, the MEAN over all non-batch dims of the elementwise Gaussian log density
``-(x - mean)² / (2 std²) - log std - log sqrt(2 pi)``, computed in fp32, shape ``[B]`` per step
and ``[N, B]`` for a trajectory. Deterministic transitions (``std = 0``: DDIM with ``eta = 0``,
ODE steps, a final step without noise) have no density; their log-prob is reported as 0, so a
PPO ratio over them is 1 and they carry no gradient. Flow-CPS transitions (``flow_cps_step``) use
the reference's constant-free surrogate ``-mean((x - mean)²)`` instead (``cps_log_prob``).

Randomness: a stochastic sampler given ``key`` draws step ``i``'s noise as
``jax.random.normal(jax.random.split(key, N)[i], x.shape, jnp.float32)``.

Precision: step math runs in fp32 (inputs are cast); the state between steps, the returned
samples and trajectories are in the input ``x``'s dtype, and log-probs are evaluated at the
stored (rounded) state, so re-evaluating a recorded transition with the same prediction gives
the recorded log-prob in any dtype (to an ulp or so: the sampler's scan and a separately compiled
re-evaluation may fuse the fp32 arithmetic differently).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdpt.diffusion.schedules import (
    DDPMSchedule,
    _per_sample,
    alpha_cumprod_at,
    inference_timesteps,
    prediction_to_x0_eps,
)

Denoise = Callable[[jax.Array, jax.Array], jax.Array]
StepFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class Trajectory(NamedTuple):
    """A sampling run, step ``i`` going from ``samples[i]`` at ``t[i]`` to ``samples[i + 1]`` at
    ``t_next[i]`` (integer timesteps for DDIM/DDPM, sigmas for flow samplers).

    Attributes:
        samples: ``[N + 1, B, ...]`` states, ``samples[0]`` the initial noise, ``samples[-1]``
            the result; in the input dtype.
        log_probs: ``[N, B]`` fp32 log-probability of each transition (module docstring).
        t: ``[N]`` time of each step's input state.
        t_next: ``[N]`` time each step moves to (the ``t_prev`` / ``sigma_next`` arguments of the
            ``*_step_logprob`` functions).
    """

    samples: jax.Array
    log_probs: jax.Array
    t: jax.Array
    t_next: jax.Array


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """Per-sample mean over non-batch dims of the elementwise ``N(mean, std²)`` log density.

    Args:
        x, mean: ``[B, ...]``.
        std: broadcastable to ``x`` (scalar or ``[B, 1, ...]``); where it is 0 the log-prob is 0.
    Returns:
        ``[B]`` fp32.
    """
    x, mean = jnp.asarray(x, jnp.float32), jnp.asarray(mean, jnp.float32)
    std = jnp.broadcast_to(jnp.asarray(std, jnp.float32), x.shape)
    noisy = std > 0
    safe_std = jnp.where(noisy, std, 1.0)  # keeps gradients finite where std == 0
    log_p = -((x - mean) ** 2) / (2 * safe_std**2) - jnp.log(safe_std) - _LOG_SQRT_2PI
    log_p = jnp.where(noisy, log_p, 0.0)
    return log_p.mean(axis=tuple(range(1, x.ndim)))


def _check_eta(eta) -> None:
    if isinstance(eta, (int, float)) and eta < 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic DDIM, 1: DDPM-like noise); got {eta}")


def ddim_step(prediction: jax.Array, x_t: jax.Array, t: jax.Array, t_prev: jax.Array,
              schedule: DDPMSchedule, eta: float | jax.Array = 0.0) -> tuple[jax.Array, jax.Array]:
    """One DDIM transition ``x_t -> x_prev`` (Song et al. 2021, eq. 12 and 16; diffusers
    ``DDIMScheduler.step``): ``x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - std²) eps + std z``,
    ``std = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))``. ``t_prev < 0`` uses
    ``schedule.final_alpha_cumprod``. The predicted ``x0`` is clipped if ``schedule.clip_sample``;
    ``eps`` is not re-derived from it (diffusers' ``use_clipped_model_output=False``). Where
    ``eta > 1`` makes ``1 - a_prev - std²`` negative it is taken as 0.

    Args:
        prediction: ``[B, ...]`` model output (``schedule.prediction_type``).
        x_t: ``[B, ...]`` current state.
        t, t_prev: integer timesteps, scalars or ``[B]``.
        eta: noise scale >= 0.
    Returns:
        ``(mean, std)``: ``[B, ...]`` fp32 and fp32 broadcastable to it.
    """
    _check_eta(eta)
    x_t = jnp.asarray(x_t, jnp.float32)
    a_t = alpha_cumprod_at(schedule, t)
    a_prev = _per_sample(alpha_cumprod_at(schedule, t_prev, final=schedule.final_alpha_cumprod), x_t)
    x0, eps = prediction_to_x0_eps(prediction, x_t, a_t, schedule.prediction_type)
    if schedule.clip_sample is not None:
        x0 = jnp.clip(x0, -schedule.clip_sample, schedule.clip_sample)
    a_t = _per_sample(a_t, x_t)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = jnp.asarray(eta, jnp.float32) * jnp.sqrt(variance)
    mean = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1 - a_prev - std**2, 0.0)) * eps
    return mean, std


def ddpm_step(prediction: jax.Array, x_t: jax.Array, t: jax.Array, t_prev: jax.Array,
              schedule: DDPMSchedule) -> tuple[jax.Array, jax.Array]:
    """One ancestral DDPM transition (Ho et al. 2020, eq. 7; diffusers ``DDPMScheduler.step``
    with ``variance_type="fixed_small"``): with ``b = 1 - a_t / a_prev``,
    ``mean = sqrt(a_prev) b / (1 - a_t) x0 + sqrt(1 - b) (1 - a_prev) / (1 - a_t) x_t`` and
    ``std = sqrt((1 - a_prev) / (1 - a_t) b)``. ``t_prev < 0`` means ``a_prev = 1``, so the last
    step is deterministic (``std = 0``; diffusers clamps the variance to 1e-20 there, adding
    1e-10 * noise, below fp32 resolution). ``x0`` is clipped if ``schedule.clip_sample``.

    Args:
        prediction: ``[B, ...]`` model output (``schedule.prediction_type``).
        x_t: ``[B, ...]`` current state.
        t, t_prev: integer timesteps, scalars or ``[B]``.
    Returns:
        ``(mean, std)``: ``[B, ...]`` fp32 and fp32 broadcastable to it.
    """
    x_t = jnp.asarray(x_t, jnp.float32)
    a_t = alpha_cumprod_at(schedule, t)
    a_prev = _per_sample(alpha_cumprod_at(schedule, t_prev, final=1.0), x_t)
    x0, _ = prediction_to_x0_eps(prediction, x_t, a_t, schedule.prediction_type)
    if schedule.clip_sample is not None:
        x0 = jnp.clip(x0, -schedule.clip_sample, schedule.clip_sample)
    a_t = _per_sample(a_t, x_t)
    beta = 1 - a_t / a_prev
    mean = jnp.sqrt(a_prev) * beta / (1 - a_t) * x0 + jnp.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x_t
    return mean, jnp.sqrt(jnp.maximum((1 - a_prev) / (1 - a_t) * beta, 0.0))


def flow_sde_step(velocity: jax.Array, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array, *,
                  sigma_max: float | jax.Array, noise_level: float | jax.Array = 0.7,
                  ) -> tuple[jax.Array, jax.Array]:
    """One Flow-GRPO SDE transition (Liu et al. 2025, eq. 9; flow_grpo ``sd3_sde_with_logprob``),
    with the same marginals as the flow ODE ``dx = v dsigma``: ``dt = sigma_next - sigma < 0``,
    ``s = noise_level * sqrt(sigma / (1 - sigma'))`` with ``sigma' = sigma_max`` where
    ``sigma = 1`` (else ``sigma``),
    ``mean = x + [v + s² / (2 sigma) (x + (1 - sigma) v)] dt``, ``std = s sqrt(-dt)``.
    ``noise_level = 0`` gives the Euler ODE step ``x + v dt``. The marginals match the ODE's up to
    O(dt) except for the step from ``sigma = 1``, whose noise std is ``noise_level`` on a uniform
    grid whatever the step count: a coarse first-order step (from unit variance it gives
    ``(1 - a²/2)² + a²`` as ``dt -> 0``, 6% high at ``a = 0.7``), as in the reference.

    Args:
        velocity: ``[B, ...]`` model velocity ``v(x, sigma)`` (noise minus data).
        x: ``[B, ...]`` current state at ``sigma``.
        sigma, sigma_next: noise levels, scalars or ``[B]``, ``sigma > 0``.
        sigma_max: replaces ``sigma = 1`` in ``1 - sigma`` (Flow-GRPO: ``sigmas[1]``, the first
            level below 1) so the first step's noise is finite.
        noise_level: ``a`` >= 0, scalar or ``[B]``.
    Returns:
        ``(mean, std)``: ``[B, ...]`` fp32 and fp32 broadcastable to it.
    """
    x = jnp.asarray(x, jnp.float32)
    v = jnp.asarray(velocity, jnp.float32)
    sigma = _per_sample(jnp.asarray(sigma, jnp.float32), x)
    dt = _per_sample(jnp.asarray(sigma_next, jnp.float32), x) - sigma
    capped = jnp.where(sigma == 1, jnp.asarray(sigma_max, jnp.float32), sigma)
    s = _per_sample(jnp.asarray(noise_level, jnp.float32), x) * jnp.sqrt(sigma / (1 - capped))
    mean = x + (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    return mean, s * jnp.sqrt(-dt)


def ddim_step_logprob(prediction: jax.Array, x_t: jax.Array, x_prev: jax.Array, t: jax.Array,
                      t_prev: jax.Array, schedule: DDPMSchedule, eta: float | jax.Array) -> jax.Array:
    """Log-prob ``[B]`` (fp32) of a given transition ``x_t -> x_prev`` under ``ddim_step``
    (arguments as there; DDPO's ``ddim_step_with_logprob``)."""
    return gaussian_log_prob(x_prev, *ddim_step(prediction, x_t, t, t_prev, schedule, eta))


def ddpm_step_logprob(prediction: jax.Array, x_t: jax.Array, x_prev: jax.Array, t: jax.Array,
                      t_prev: jax.Array, schedule: DDPMSchedule) -> jax.Array:
    """Log-prob ``[B]`` (fp32) of a given transition ``x_t -> x_prev`` under ``ddpm_step``."""
    return gaussian_log_prob(x_prev, *ddpm_step(prediction, x_t, t, t_prev, schedule))


def flow_sde_step_logprob(velocity: jax.Array, x: jax.Array, x_next: jax.Array, sigma: jax.Array,
                          sigma_next: jax.Array, *, sigma_max: float | jax.Array,
                          noise_level: float | jax.Array = 0.7) -> jax.Array:
    """Log-prob ``[B]`` (fp32) of a given transition ``x -> x_next`` under ``flow_sde_step``
    (arguments as there)."""
    mean, std = flow_sde_step(velocity, x, sigma, sigma_next, sigma_max=sigma_max, noise_level=noise_level)
    return gaussian_log_prob(x_next, mean, std)


def flow_cps_step(velocity: jax.Array, x: jax.Array, sigma: jax.Array, sigma_next: jax.Array, *,
                  noise_level: float | jax.Array = 0.7) -> tuple[jax.Array, jax.Array]:
    """One coefficients-preserving (CPS) transition of a flow model (Wang & Yu 2025,
    "Coefficients-Preserving Sampling for Reinforcement Learning with Flow Matching",
    arXiv 2509.05952; flow_grpo ``sd3_sde_with_logprob`` with ``sde_type="cps"``): from the
    predicted endpoints ``x0 = x - sigma v`` and ``x1 = x + (1 - sigma) v``,
    ``std = sigma_next sin(a pi / 2)``, ``mean = x0 (1 - sigma_next) + x1 sqrt(sigma_next² - std²)``,
    so ``x_next`` is ``(1 - sigma_next) x0`` plus noise of total std ``sigma_next`` (the
    coefficients of the forward process ``x = (1 - sigma) x0 + sigma eps``; DDIM with ``eta`` in
    flow form). ``noise_level = 0`` gives the Euler step ``x + (sigma_next - sigma) v`` (the
    DDIM-like deterministic step); ``a = 1`` re-noises ``x0`` entirely with fresh noise.
    ``sigma_next = 0`` (the last step) is deterministic (``std = 0``).

    Args:
        velocity: ``[B, ...]`` model velocity ``v(x, sigma)`` (noise minus data).
        x: ``[B, ...]`` current state at ``sigma``.
        sigma, sigma_next: noise levels in ``[0, 1]``, scalars or ``[B]``.
        noise_level: ``a`` in ``[0, 1]``, scalar or ``[B]``.
    Returns:
        ``(mean, std)``: ``[B, ...]`` fp32 and fp32 broadcastable to it. Log-probs of CPS
        transitions are :func:`cps_log_prob`, not the Gaussian density.
    """
    x = jnp.asarray(x, jnp.float32)
    v = jnp.asarray(velocity, jnp.float32)
    sigma = _per_sample(jnp.asarray(sigma, jnp.float32), x)
    sigma_next = _per_sample(jnp.asarray(sigma_next, jnp.float32), x)
    std = sigma_next * jnp.sin(_per_sample(jnp.asarray(noise_level, jnp.float32), x) * (math.pi / 2))
    x0, x1 = x - sigma * v, x + (1 - sigma) * v
    return x0 * (1 - sigma_next) + x1 * jnp.sqrt(jnp.maximum(sigma_next**2 - std**2, 0.0)), std


def cps_log_prob(x: jax.Array, mean: jax.Array, std: jax.Array | None = None) -> jax.Array:
    """Flow-CPS's log-probability surrogate ``-mean((x - mean)²)`` ``[B]`` fp32 (mean over the
    non-batch dims): the Gaussian log-density without its constants and without the ``1 / (2
    std²)`` scale (flow_grpo ``sde_type="cps"``: "remove all constants"). ``std`` is unused (the
    signature of :func:`gaussian_log_prob`); a deterministic step (``x == mean``) gives 0."""
    del std
    diff = jnp.asarray(x, jnp.float32) - jnp.asarray(mean, jnp.float32)
    return -jnp.mean(diff**2, axis=tuple(range(1, diff.ndim)))


def flow_cps_step_logprob(velocity: jax.Array, x: jax.Array, x_next: jax.Array, sigma: jax.Array,
                          sigma_next: jax.Array, *, noise_level: float | jax.Array = 0.7) -> jax.Array:
    """:func:`cps_log_prob` ``[B]`` (fp32) of a given transition ``x -> x_next`` under
    :func:`flow_cps_step` (arguments as there)."""
    mean, _ = flow_cps_step(velocity, x, sigma, sigma_next, noise_level=noise_level)
    return cps_log_prob(x_next, mean)


def _run(step: StepFn, denoise: Denoise, x: jax.Array, t: jax.Array, t_next: jax.Array,
         key: jax.Array | None, return_trajectory: bool, extra: jax.Array | None = None,
         log_prob: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] = gaussian_log_prob,
         ) -> jax.Array | Trajectory:
    """Scan ``step(prediction, x, t, t_next, extra) -> (mean, std)`` over the ``[N]`` arrays
    ``t, t_next, extra`` (``extra`` None: passed as None), drawing ``x_next = mean + std * z``
    (``z`` from ``key``; ``mean`` when ``key`` is None); a trajectory records
    ``log_prob(x_next, mean, std)`` per step."""
    x = jnp.asarray(x)
    keys = None if key is None else jax.random.split(key, t.shape[0])

    def body(x_cur, inputs):
        t_i, t_next_i, extra_i, key_i = inputs
        mean, std = step(denoise(x_cur, t_i), x_cur, t_i, t_next_i, extra_i)
        x_next = mean if key_i is None else mean + std * jax.random.normal(key_i, x.shape, jnp.float32)
        x_next = x_next.astype(x.dtype)
        if not return_trajectory:
            return x_next, None
        return x_next, (x_next, log_prob(x_next, mean, std))

    out, recorded = jax.lax.scan(body, x, (t, t_next, extra, keys))
    if not return_trajectory:
        return out
    states, log_probs = recorded
    return Trajectory(jnp.concatenate([x[None], states]), log_probs, t, t_next)


def _check_key(key, sampler: str) -> None:
    if key is None:
        raise ValueError(f"{sampler} is stochastic: pass key=jax.random.key(seed)")


def ddim_sample(denoise: Denoise, x: jax.Array, schedule: DDPMSchedule, num_steps: int, *,
                eta: float = 0.0, key: jax.Array | None = None,
                return_trajectory: bool = False) -> jax.Array | Trajectory:
    """DDIM sampling (diffusers ``DDIMScheduler``: ``inference_timesteps`` and, as diffusers does
    for every spacing, ``t_prev = t - T // num_steps``).

    Args:
        denoise: model ``(x, t) -> prediction``; ``x`` in ``x``'s dtype, ``t`` an int32 scalar.
        x: ``[B, ...]`` initial noise.
        schedule: a ``DDPMSchedule`` (prediction type, spacing, final alpha, clipping).
        num_steps: number of steps ``N``, in ``[1, schedule.num_train_timesteps]``.
        eta: noise scale >= 0 (a Python float); 0 is deterministic, 1 is DDPO's setting.
        key: PRNG key, required when ``eta > 0``.
        return_trajectory: return a ``Trajectory`` instead of the final sample.
    Returns:
        ``[B, ...]`` sample in ``x``'s dtype, or a ``Trajectory``.
    """
    _check_eta(eta)
    if eta > 0:
        _check_key(key, f"DDIM with eta={eta}")
    t = inference_timesteps(schedule, num_steps)
    t_prev = t - schedule.num_train_timesteps // num_steps

    def step(prediction, x_t, t_i, t_prev_i, _):
        return ddim_step(prediction, x_t, t_i, t_prev_i, schedule, eta)

    return _run(step, denoise, x, jnp.asarray(t), jnp.asarray(t_prev), key if eta > 0 else None,
                return_trajectory)


def ddpm_sample(denoise: Denoise, x: jax.Array, schedule: DDPMSchedule, num_steps: int, *,
                key: jax.Array, return_trajectory: bool = False) -> jax.Array | Trajectory:
    """Ancestral DDPM sampling (diffusers ``DDPMScheduler`` with ``fixed_small`` variance) over
    ``inference_timesteps``; each step goes to the next timestep in the list, the last to -1.

    Args:
        denoise: model ``(x, t) -> prediction``; ``x`` in ``x``'s dtype, ``t`` an int32 scalar.
        x: ``[B, ...]`` initial noise.
        num_steps: ``N`` in ``[1, schedule.num_train_timesteps]`` (``T`` for the original chain).
        key: PRNG key for the per-step noise.
        return_trajectory: return a ``Trajectory`` instead of the final sample.
    Returns:
        ``[B, ...]`` sample in ``x``'s dtype, or a ``Trajectory``.
    """
    _check_key(key, "DDPM sampling")
    t = inference_timesteps(schedule, num_steps)
    t_prev = np.append(t[1:], -1).astype(np.int32)

    def step(prediction, x_t, t_i, t_prev_i, _):
        return ddpm_step(prediction, x_t, t_i, t_prev_i, schedule)

    return _run(step, denoise, x, jnp.asarray(t), jnp.asarray(t_prev), key, return_trajectory)


def _check_sigmas(sigmas) -> jax.Array:
    sigmas = jnp.asarray(sigmas, jnp.float32)
    if sigmas.ndim != 1 or sigmas.shape[0] < 2:
        raise ValueError(f"sigmas must be [num_steps + 1] noise levels (flow_sigmas); got shape {sigmas.shape}")
    return sigmas


def euler_flow(denoise: Denoise, x: jax.Array, sigmas: jax.Array, *,
               return_trajectory: bool = False) -> jax.Array | Trajectory:
    """Integrate the flow ODE ``dx/dsigma = v(x, sigma)`` with Euler steps (diffusers'
    ``FlowMatchEulerDiscreteScheduler.step``): ``x <- x + (sigma_next - sigma) * v``.

    Args:
        denoise: velocity model ``(x, sigma) -> v``, ``sigma`` an fp32 scalar in [0, 1].
        x: ``[B, ...]`` initial noise.
        sigmas: ``[N + 1]`` decreasing noise levels ending at 0 (``flow_sigmas``).
        return_trajectory: return a ``Trajectory`` (log-probs are 0: the steps are deterministic).
    Returns:
        The sample at ``sigmas[-1]`` in ``x``'s dtype (steps computed in fp32), or a ``Trajectory``.
    """
    sigmas = _check_sigmas(sigmas)

    def step(v, x_cur, sigma, sigma_next, _):
        x_cur = x_cur.astype(jnp.float32)
        return x_cur + (sigma_next - sigma) * v.astype(jnp.float32), jnp.float32(0)

    return _run(step, denoise, x, sigmas[:-1], sigmas[1:], None, return_trajectory)


def flow_sde_sample(denoise: Denoise, x: jax.Array, sigmas: jax.Array, *, key: jax.Array,
                    noise_level: float = 0.7, sde_window: tuple[int | jax.Array, int | jax.Array] | None = None,
                    return_trajectory: bool = False) -> jax.Array | Trajectory:
    """Flow-GRPO sampling: ``flow_sde_step`` at every step with ``sigma_max = sigmas[1]``.

    Args:
        denoise: velocity model ``(x, sigma) -> v``, ``sigma`` an fp32 scalar in [0, 1].
        x: ``[B, ...]`` initial noise.
        sigmas: ``[N + 1]`` decreasing noise levels ending at 0 (``flow_sigmas``).
        key: PRNG key for the per-step noise.
        noise_level: ``a`` >= 0 (Flow-GRPO: 0.7).
        sde_window: ``(start, stop)`` step indices (may be traced): SDE steps for
            ``start <= i < stop``, Euler ODE steps (log-prob 0) elsewhere, as Flow-GRPO-Fast.
            ``None``: SDE everywhere.
        return_trajectory: return a ``Trajectory`` instead of the final sample.
    Returns:
        ``[B, ...]`` sample in ``x``'s dtype, or a ``Trajectory``.
    """
    _check_key(key, "flow SDE sampling")
    if isinstance(noise_level, (int, float)) and noise_level < 0:
        raise ValueError(f"noise_level must be >= 0 (Flow-GRPO uses 0.7; 0 is the Euler ODE); got {noise_level}")
    sigmas = _check_sigmas(sigmas)
    levels = _window_levels(sigmas.shape[0] - 1, noise_level, sde_window)
    sigma_max = sigmas[1]

    def step(v, x_cur, sigma, sigma_next, level):
        return flow_sde_step(v, x_cur, sigma, sigma_next, sigma_max=sigma_max, noise_level=level)

    return _run(step, denoise, x, sigmas[:-1], sigmas[1:], key, return_trajectory, levels)


def _window_levels(n: int, noise_level, sde_window) -> jax.Array:
    """``[n]`` per-step noise levels: ``noise_level`` for steps ``start <= i < stop`` of
    ``sde_window`` (everywhere when it is None), 0 elsewhere."""
    levels = jnp.full((n,), noise_level, jnp.float32)
    if sde_window is None:
        return levels
    start, stop = sde_window
    steps = jnp.arange(n)
    return jnp.where((steps >= start) & (steps < stop), levels, 0.0)


def flow_cps_sample(denoise: Denoise, x: jax.Array, sigmas: jax.Array, *, key: jax.Array,
                    noise_level: float = 0.7, sde_window: tuple[int | jax.Array, int | jax.Array] | None = None,
                    return_trajectory: bool = False) -> jax.Array | Trajectory:
    """Flow-CPS sampling: :func:`flow_cps_step` at every step (Flow-GRPO's ``sde_type="cps"``).

    Args:
        denoise: velocity model ``(x, sigma) -> v``, ``sigma`` an fp32 scalar in [0, 1].
        x: ``[B, ...]`` initial noise.
        sigmas: ``[N + 1]`` decreasing noise levels ending at 0 (``flow_sigmas``).
        key: PRNG key for the per-step noise (drawn as in the module docstring).
        noise_level: ``a`` in ``[0, 1]``.
        sde_window: ``(start, stop)`` step indices (may be traced): CPS steps with noise for
            ``start <= i < stop``, Euler steps (``a = 0``, log-prob 0) elsewhere. ``None``:
            noise everywhere.
        return_trajectory: return a ``Trajectory`` whose ``log_probs`` are :func:`cps_log_prob`.
    Returns:
        ``[B, ...]`` sample in ``x``'s dtype, or a ``Trajectory``.
    """
    _check_key(key, "flow CPS sampling")
    if isinstance(noise_level, (int, float)) and not 0 <= noise_level <= 1:
        raise ValueError(f"noise_level must be in [0, 1] for CPS (std = sigma_next sin(a pi / 2)); got {noise_level}")
    sigmas = _check_sigmas(sigmas)
    levels = _window_levels(sigmas.shape[0] - 1, noise_level, sde_window)

    def step(v, x_cur, sigma, sigma_next, level):
        return flow_cps_step(v, x_cur, sigma, sigma_next, noise_level=level)

    return _run(step, denoise, x, sigmas[:-1], sigmas[1:], key, return_trajectory, levels, log_prob=cps_log_prob)
