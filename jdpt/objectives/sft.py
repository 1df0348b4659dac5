"""Supervised fine-tuning: the denoising regression loss of flow-matching and DDPM models.

:class:`ForwardProcess` is the model's training convention (how ``x_t`` is made from a clean
``x0``, which ``t`` is drawn, what the network regresses); the preference objectives
(:mod:`jdpt.objectives.dpo`, :mod:`jdpt.objectives.mapo`) reuse it.

- Flow matching (rectified flow: Liu et al. 2023; Lipman et al. 2023; SD3: Esser et al. 2024,
  "Scaling Rectified Flow Transformers"): ``x_t = (1 - t) x0 + t eps``, target ``v = eps - x0``,
  ``t`` ~ logit-normal(0, 1) (SD3's default) or U(0, 1).
- DDPM (Ho et al. 2020): ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with ``t ~ U{0..T-1}``,
  target ``eps`` (``"epsilon"``) or ``v = sqrt(a_t) eps - sqrt(1 - a_t) x0`` (``"v_prediction"``,
  Salimans & Ho 2022).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jdpt.diffusion.schedules import DDPMSchedule, alpha_cumprod_at
from jdpt.objectives.denoiser import Denoiser, check_prediction
from jdpt.parallel.step import Frozen

Array = jax.Array
PREDICTIONS = ("velocity", "epsilon", "v_prediction")
FLOW_TIMESTEPS = ("uniform", "logit_normal")


def per_sample_mse(prediction: Array, target: Array) -> Array:
    """Squared error averaged over every axis but the first: ``[B, ...]`` x2 -> ``[B]`` (fp32)."""
    err = jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32))
    return err.reshape(err.shape[0], -1).mean(axis=1)


def _per_sample(value: Array, x: Array) -> Array:
    return value.reshape(value.shape + (1,) * (x.ndim - value.ndim))


@dataclasses.dataclass(frozen=True)
class ForwardProcess:
    """How a model is trained to denoise: noising, timestep distribution and regression target.

    Attributes:
        prediction: what the denoiser outputs: ``"velocity"`` (flow models, ``t`` = sigma in
            ``[0, 1]``), ``"epsilon"`` or ``"v_prediction"`` (DDPM models, integer ``t``).
        schedule: the DDPM schedule of an ``"epsilon"`` / ``"v_prediction"`` model (its
            ``prediction_type`` must agree); ``None`` for flow models.
        timesteps: flow models' sigma distribution: ``"uniform"`` (U(0, 1)) or ``"logit_normal"``
            (``sigmoid(N(logit_mean, logit_std**2))``, SD3). DDPM models always draw
            ``t ~ U{0..T-1}``.
        logit_mean, logit_std: the logit-normal's parameters (SD3: 0 and 1).
    """

    prediction: str = "velocity"
    schedule: DDPMSchedule | None = None
    timesteps: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction={self.prediction!r}; choose one of {PREDICTIONS}")
        if self.timesteps not in FLOW_TIMESTEPS:
            raise ValueError(f"timesteps={self.timesteps!r}; choose one of {FLOW_TIMESTEPS}")
        if self.prediction == "velocity" and self.schedule is not None:
            raise ValueError("prediction='velocity' is a flow model and takes no DDPM schedule; "
                             "pass schedule=None (or prediction='epsilon' / 'v_prediction')")
        if self.prediction != "velocity":
            if self.schedule is None:
                raise ValueError(f"prediction={self.prediction!r} needs the model's DDPM schedule: "
                                 "pass schedule=jdpt.diffusion.schedules.DDPMSchedule(...)")
            if self.schedule.prediction_type != self.prediction:
                raise ValueError(
                    f"prediction={self.prediction!r} but schedule.prediction_type="
                    f"{self.schedule.prediction_type!r}; make them agree")
        if self.logit_std <= 0:
            raise ValueError(f"logit_std={self.logit_std} must be > 0")

    @classmethod
    def ddpm(cls, schedule: DDPMSchedule) -> ForwardProcess:
        """The process of a DDPM model trained with ``schedule`` (its ``prediction_type``)."""
        return cls(prediction=schedule.prediction_type, schedule=schedule)

    @property
    def is_flow(self) -> bool:
        return self.prediction == "velocity"

    def sample_t(self, key: Array, batch: int) -> Array:
        """``[batch]`` timesteps: fp32 sigmas (flow) or int32 ``t`` in ``[0, T)`` (DDPM)."""
        if not self.is_flow:
            return jax.random.randint(key, (batch,), 0, self.schedule.num_train_timesteps, jnp.int32)
        if self.timesteps == "uniform":
            return jax.random.uniform(key, (batch,), jnp.float32)
        return jax.nn.sigmoid(self.logit_mean + self.logit_std * jax.random.normal(key, (batch,), jnp.float32))

    def _coefficients(self, t: Array) -> tuple[Array, Array]:
        """``(signal, noise)`` scales ``[B]`` of ``x_t = signal * x0 + noise * eps``."""
        if self.is_flow:
            t = t.astype(jnp.float32)
            return 1.0 - t, t
        a = alpha_cumprod_at(self.schedule, t)
        return jnp.sqrt(a), jnp.sqrt(1.0 - a)

    def noise(self, x0: Array, eps: Array, t: Array) -> Array:
        """``x_t`` ``[B, ...]`` (fp32) from clean ``x0``, noise ``eps`` (same shape) and ``t`` ``[B]``."""
        signal, noise = self._coefficients(t)
        return _per_sample(signal, x0) * x0.astype(jnp.float32) + _per_sample(noise, x0) * eps.astype(jnp.float32)

    def target(self, x0: Array, eps: Array, t: Array) -> Array:
        """What the denoiser regresses at ``x_t``: ``eps - x0``, ``eps`` or ``v`` (fp32)."""
        x0, eps = x0.astype(jnp.float32), eps.astype(jnp.float32)
        if self.prediction == "velocity":
            return eps - x0
        if self.prediction == "epsilon":
            return eps
        signal, noise = self._coefficients(t)
        return _per_sample(signal, x0) * eps - _per_sample(noise, x0) * x0


def denoising_errors(denoise: Denoiser, process: ForwardProcess, model, frozen: Frozen, x0: Array,
                     cond: Any, t: Array, eps: Array) -> Array:
    """Per-sample regression errors ``[B]`` of ``model`` on ``x0`` ``[B, ...]`` at ``t`` ``[B]``
    with noise ``eps`` (the model sees ``frozen.cast`` of its inputs; the error is fp32)."""
    x_t = process.noise(x0, eps, t)
    prediction = denoise(model, frozen.cast(x_t), t, cond)
    return per_sample_mse(prediction, process.target(x0, eps, t))


def check_cond(cond: Any, batch: int, what: str) -> None:
    """Raise a ValueError unless every array of ``cond`` has leading dimension ``batch``."""
    for leaf in jax.tree.leaves(cond):
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != batch:
            raise ValueError(f"cond has an array of shape {jnp.shape(leaf)} but {what} has batch {batch}; "
                             "give every cond array the same leading (batch) dimension")


@dataclasses.dataclass(frozen=True)
class SFT:
    """Denoising regression on clean data: ``L = mean mse(model(x_t, t, c), target)``.

    Attributes:
        denoise: the model's adapter (:data:`jdpt.objectives.denoiser.Denoiser`).
        process: the model's training convention. Default: a flow model with SD3's
            logit-normal(0, 1) sigmas (Esser et al. 2024); DDPM models pass
            ``ForwardProcess.ddpm(schedule)``.

    Batch: ``{"x0": [B, ...] clean latents, "cond": pytree of [B, ...] model conditions}``.
    Metrics: ``mse`` (the loss) and ``t`` (mean timestep drawn).
    """

    denoise: Denoiser
    process: ForwardProcess = ForwardProcess(timesteps="logit_normal")

    def __post_init__(self):
        check_prediction(self.denoise, self.process.prediction, "SFT")

    def loss(self, params, frozen: Frozen, batch: dict, key: Array) -> tuple[Array, dict[str, Array]]:
        x0, cond = batch["x0"], batch["cond"]
        check_cond(cond, x0.shape[0], "x0")
        key_t, key_eps = jax.random.split(key)
        t = self.process.sample_t(key_t, x0.shape[0])
        eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
        errors = denoising_errors(self.denoise, self.process, frozen.model(params), frozen, x0, cond, t, eps)
        loss = errors.mean()
        return loss, {"mse": loss, "t": t.astype(jnp.float32).mean()}
