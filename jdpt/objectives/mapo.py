"""MaPO: margin-aware preference optimization without a reference model (Hong, Paul et al.,
"Margin-aware Preference Optimization for Aligning Diffusion Models without Reference", 2024;
mapo-t2i/mapo ``compute_loss``).

With per-pair regression errors ``L_w``, ``L_l`` ``[B]`` (one ``t``, one ``eps`` per pair) and
``f(x) = x / (e^x - 1)`` (``f(0) = 1``):

    logodds = f(lambda * L_w) - f(lambda * L_l)
    L = mean(L_w) - beta * mean(log sigmoid(T * logodds)),   beta = 0.1, lambda = 0.5, T = 1000.

``f`` decreases, so a smaller winner error raises ``logodds``; only the policy is evaluated.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jdpt.objectives.denoiser import Denoiser, check_prediction
from jdpt.objectives.dpo import pair_errors
from jdpt.objectives.sft import ForwardProcess
from jdpt.parallel.step import Frozen

Array = jax.Array
_SMALL = 0.1  # for |x| < _SMALL, f is its Taylor series 1 - x/2 + x^2/12 - x^4/720 (error < 4e-11):
# exact in fp32 and with an accurate gradient, where the closed forms lose digits to cancellation


def mapo_f(x: Array) -> Array:
    """``f(x) = x / expm1(x)`` elementwise with ``f(0) = 1``, finite with finite gradients for
    every finite ``x`` (``x > 0`` is evaluated as ``x e^-x / -expm1(-x)``: no overflow)."""
    x = jnp.asarray(x, jnp.float32)
    small = jnp.abs(x) < _SMALL
    pos = jnp.where(small | (x < 0), 1.0, x)  # safe inputs for each branch: the unselected
    neg = jnp.where(small | (x >= 0), -1.0, x)  # branch must not produce inf/nan gradients
    x2 = x * x
    taylor = 1.0 - x / 2 + x2 / 12 - x2 * x2 / 720
    f_pos = pos * jnp.exp(-pos) / -jnp.expm1(-pos)
    f_neg = neg / jnp.expm1(neg)
    return jnp.where(small, taylor, jnp.where(x >= 0, f_pos, f_neg))


def mapo_logodds(err_w: Array, err_l: Array, lam: float = 0.5) -> Array:
    """``f(lam * err_w) - f(lam * err_l)`` ``[B]`` from per-pair errors ``[B]``."""
    return mapo_f(lam * err_w) - mapo_f(lam * err_l)


def mapo_loss(err_w: Array, err_l: Array, beta: float = 0.1, lam: float = 0.5,
              temperature: float = 1000.0) -> Array:
    """MaPO's loss (a scalar) from per-pair policy errors ``[B]``; ``mean(err_w) + beta log 2``
    when ``err_w == err_l``."""
    logodds = mapo_logodds(err_w, err_l, lam)
    return err_w.mean() - beta * jnp.mean(jax.nn.log_sigmoid(temperature * logodds))


@dataclasses.dataclass(frozen=True)
class MaPO:
    """MaPO hyper-parameters (mapo-t2i/mapo defaults) and the model adapter.

    Attributes:
        denoise: the model's adapter (:data:`jdpt.objectives.denoiser.Denoiser`).
        beta: weight of the margin term (0.1).
        lam: scale ``lambda`` of the errors inside ``f`` (0.5).
        temperature: ``T`` multiplying the log-odds (1000).
        process: the model's training convention (eps / v targets for DDPM models via
            ``ForwardProcess.ddpm``; default: a flow model with uniform sigmas).

    Batch: ``{"x0_w": [B, ...], "x0_l": [B, ...], "cond": pytree of [B, ...]}``.
    Metrics: ``mse_w``, ``mse_l``, ``logodds`` (mean), ``accuracy`` (fraction with
    ``logodds > 0``, i.e. ``err_w < err_l``), ``margin_loss`` (``-mean log sigmoid(T logodds)``).
    """

    denoise: Denoiser
    beta: float = 0.1
    lam: float = 0.5
    temperature: float = 1000.0
    process: ForwardProcess = ForwardProcess()

    def __post_init__(self):
        check_prediction(self.denoise, self.process.prediction, "MaPO")

    def loss(self, params, frozen: Frozen, batch: dict, key: Array) -> tuple[Array, dict[str, Array]]:
        err_w, err_l = pair_errors(self.denoise, self.process, frozen.model(params), frozen, batch, key)
        logodds = mapo_logodds(err_w, err_l, self.lam)
        margin = -jnp.mean(jax.nn.log_sigmoid(self.temperature * logodds))
        loss = mapo_loss(err_w, err_l, self.beta, self.lam, self.temperature)
        metrics = {"mse_w": err_w.mean(), "mse_l": err_l.mean(), "logodds": logodds.mean(),
                   "accuracy": jnp.mean((logodds > 0).astype(jnp.float32)), "margin_loss": margin}
        return loss, metrics
