"""Noise schedules for the two families of models jdpt post-trains.

**DDPM / DDIM** (Stable Diffusion 1.x/2.x, the toy UNet): ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``
with ``a_t = alphas_cumprod[t]``, ``t`` an integer in ``[0, num_train_timesteps)``. Matches
diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` (betas, ``alphas_cumprod``, ``set_timesteps``).

**Rectified flow** (SD3, Flux): ``x_sigma = (1 - sigma) x_0 + sigma * noise``, sigma from 1 to 0.
Matches diffusers' ``FlowMatchEulerDiscreteScheduler`` as the Flux and SD3 pipelines configure it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _check_choice(what: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(map(repr, options))}")


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
    """A discrete-time diffusion schedule (Ho et al. 2020, "Denoising Diffusion Probabilistic
    Models"; DDIM sampling: Song et al. 2021). Defaults are the DDPM paper's linear betas with
    diffusers' ``DDIMScheduler`` inference defaults; ``stable_diffusion()`` gives SD's settings.

    Frozen and hashable, so it can be a static argument of a jitted function.

    Attributes:
        num_train_timesteps: ``T``, the number of training noise levels.
        beta_start, beta_end: end points of ``linear`` / ``scaled_linear`` betas (unused by the
            cosine schedule).
        beta_schedule: ``"linear"`` (DDPM), ``"scaled_linear"`` (linear in sqrt(beta), latent
            diffusion) or ``"squaredcos_cap_v2"`` (cosine, Nichol & Dhariwal 2021, betas <= 0.999).
        prediction_type: what the model predicts: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        set_alpha_to_one: DDIM's ``alphas_cumprod`` "before" step 0 is 1 (True) or
            ``alphas_cumprod[0]`` (False, as SD configures it).
        steps_offset: added to ``leading`` inference timesteps (SD uses 1).
        timestep_spacing: how ``inference_timesteps`` picks ``num_steps`` of the ``T`` levels:
            ``"leading"``, ``"trailing"`` or ``"linspace"`` (Lin et al. 2024, Table 2).
        clip_sample: clip the predicted ``x_0`` to ``[-clip_sample, clip_sample]`` in the samplers;
            ``None`` (default, as latent models use) disables it. diffusers' default is 1.0.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    clip_sample: float | None = None

    def __post_init__(self):
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1; got {self.num_train_timesteps}")
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        if self.clip_sample is not None and self.clip_sample <= 0:
            raise ValueError(f"clip_sample must be > 0 or None (no clipping); got {self.clip_sample}")

    @classmethod
    def stable_diffusion(cls, **overrides) -> DDPMSchedule:
        """SD 1.x/2.x's scheduler config: scaled-linear betas 0.00085..0.012 over 1000 steps,
        ``set_alpha_to_one=False``, ``steps_offset=1``, no clipping. ``overrides`` replace fields
        (e.g. ``prediction_type="v_prediction"`` for SD 2.x 768)."""
        config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      set_alpha_to_one=False, steps_offset=1)
        return cls(**(config | overrides))

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """``[T]`` fp32 betas (computed in fp64, rounded once)."""
        t = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, t)
        elif self.beta_schedule == "scaled_linear":
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, t) ** 2
        else:
            def alpha_bar(s):
                return np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2

            steps = np.arange(t, dtype=np.float64)
            betas = np.minimum(1 - alpha_bar((steps + 1) / t) / alpha_bar(steps / t), 0.999)
        return betas.astype(np.float32)

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """``[T]`` fp32 ``prod_{s <= t} (1 - beta_s)``, the signal fraction ``a_t`` of ``x_t``."""
        return np.cumprod(1.0 - self.betas.astype(np.float64)).astype(np.float32)

    @property
    def final_alpha_cumprod(self) -> float:
        """``a`` used by DDIM for a previous timestep below 0 (see ``set_alpha_to_one``)."""
        return 1.0 if self.set_alpha_to_one else float(self.alphas_cumprod[0])


def inference_timesteps(schedule: DDPMSchedule, num_steps: int) -> np.ndarray:
    """The ``num_steps`` decreasing integer timesteps a sampler visits (diffusers'
    ``set_timesteps``).

    ``leading``: ``arange(N) * (T // N)`` reversed, plus ``steps_offset``; ``trailing``:
    ``round(arange(T, 0, -T / N)) - 1``; ``linspace``: ``round(linspace(0, T - 1, N))`` reversed.

    Returns:
        ``[num_steps]`` int32 array.
    """
    t = schedule.num_train_timesteps
    if not 1 <= num_steps <= t:
        raise ValueError(f"num_steps must be in [1, num_train_timesteps={t}]; got {num_steps}")
    if schedule.timestep_spacing == "leading":
        steps = np.arange(num_steps)[::-1] * (t // num_steps) + schedule.steps_offset
    elif schedule.timestep_spacing == "trailing":
        steps = np.round(np.arange(t, 0, -t / num_steps)) - 1
    else:
        steps = np.round(np.linspace(0, t - 1, num_steps))[::-1]
    return steps.astype(np.int32)


def alpha_cumprod_at(schedule: DDPMSchedule, t: jax.Array, *, final: float = 1.0) -> jax.Array:
    """``alphas_cumprod[t]`` in fp32 for integer timesteps ``t`` (any shape), ``final`` where
    ``t < 0`` (the "previous" timestep of a sampler's last step)."""
    t = jnp.asarray(t)
    table = jnp.asarray(schedule.alphas_cumprod)
    return jnp.where(t >= 0, table[jnp.clip(t, 0, schedule.num_train_timesteps - 1)], jnp.float32(final))


def prediction_to_x0_eps(prediction: jax.Array, x_t: jax.Array, alpha_cumprod: jax.Array,
                         prediction_type: str) -> tuple[jax.Array, jax.Array]:
    """Convert a model output at ``x_t`` to the predicted clean sample and noise (fp32).

    With ``a = alpha_cumprod``: ``epsilon``: ``x0 = (x_t - sqrt(1-a) out) / sqrt(a)``, ``eps = out``;
    ``sample``: ``x0 = out``, ``eps = (x_t - sqrt(a) x0) / sqrt(1-a)``;
    ``v_prediction``: ``x0 = sqrt(a) x_t - sqrt(1-a) out``, ``eps = sqrt(a) out + sqrt(1-a) x_t``.

    Args:
        prediction: ``[B, ...]`` model output.
        x_t: ``[B, ...]`` the noisy input the model saw.
        alpha_cumprod: ``a_t``, a scalar or ``[B]`` (one per sample).
        prediction_type: one of ``PREDICTION_TYPES``.
    Returns:
        ``(x0, eps)``, each ``[B, ...]`` fp32.
    """
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    out = jnp.asarray(prediction, jnp.float32)
    x_t = jnp.asarray(x_t, jnp.float32)
    a = _per_sample(jnp.asarray(alpha_cumprod, jnp.float32), x_t)
    sqrt_a, sqrt_b = jnp.sqrt(a), jnp.sqrt(1 - a)
    if prediction_type == "epsilon":
        return (x_t - sqrt_b * out) / sqrt_a, out
    if prediction_type == "sample":
        return out, (x_t - sqrt_a * out) / sqrt_b
    return sqrt_a * x_t - sqrt_b * out, sqrt_a * out + sqrt_b * x_t


def _per_sample(value: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape a scalar or ``[B]`` array to broadcast against ``x: [B, ...]``."""
    value = jnp.asarray(value)
    if value.ndim not in (0, 1):
        raise ValueError(f"expected a scalar or a [batch] array; got shape {value.shape}")
    return value.reshape(value.shape + (1,) * (x.ndim - value.ndim))


FLOW_PREDICTIONS = ("velocity", "sample")
FLOW_SIGMA_FLOOR = 0.05
"""Smallest noise level a sample-predicting flow model divides by (Li & He 2025, "Back to Basics:
Let Denoising Generative Models Denoise", clip the same denominator at 0.05)."""


def flow_velocity(out: jax.Array, x_t: jax.Array, sigma: jax.Array, prediction: str) -> jax.Array:
    """A flow model's output -> the velocity ``eps - x0`` at ``x_t = (1 - sigma) x0 + sigma eps``.

    ``prediction="velocity"``: the output is the velocity. ``"sample"``: the output is ``x0``
    and the velocity is ``(x_t - x0) / max(sigma, FLOW_SIGMA_FLOOR)`` (exact for sigma at or
    above the floor, the smallest level of a 20-step grid). ``sigma``: scalar or ``[B]``.
    """
    _check_choice("prediction", prediction, FLOW_PREDICTIONS)
    if prediction == "velocity":
        return out
    sigma = jnp.maximum(_per_sample(sigma, x_t), FLOW_SIGMA_FLOOR)
    return ((x_t.astype(jnp.float32) - out.astype(jnp.float32)) / sigma).astype(out.dtype)


def flux_mu(image_seq_len: int, *, base_seq_len: int = 256, max_seq_len: int = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent shift exponent ``mu`` (diffusers ``calculate_shift``): linear in the
    number of image tokens between ``base_shift`` at ``base_seq_len`` and ``max_shift`` at
    ``max_seq_len``."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def flow_sigmas(num_steps: int, *, shift: float = 1.0, mu: float | None = None,
                num_train_timesteps: int | None = None) -> np.ndarray:
    """``num_steps + 1`` decreasing noise levels ending at 0 (fp32).

    The base grid is ``linspace(1, 1/num_steps, num_steps)``, what the Flux pipeline (and
    Flow-GRPO's Flux code) passes to ``set_timesteps(sigmas=...)``. With ``num_train_timesteps=T``
    it is instead diffusers' own ``set_timesteps(num_steps)`` grid ``linspace(1, s_min, num_steps)``,
    ``s_min`` the scheduler's smallest training sigma (``1/T``, shifted by ``shift`` unless ``mu``
    is given): the SD3 pipeline's default (``shift=3.0, num_train_timesteps=1000``).

    With ``mu`` (Flux's dynamic shifting) each sigma becomes ``e^mu / (e^mu + 1/sigma - 1)``;
    otherwise the static shift ``shift * sigma / (1 + (shift - 1) * sigma)`` applies (SD3: 3.0).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")

    def shifted(sigmas):
        if mu is not None:
            return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
        return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)

    if num_train_timesteps is None:
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
    elif num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1 (diffusers' default is 1000); got {num_train_timesteps}")
    else:
        s_min = 1.0 / num_train_timesteps
        sigmas = np.linspace(1.0, s_min if mu is not None else shifted(s_min), num_steps)
    return np.append(shifted(sigmas), 0.0).astype(np.float32)
