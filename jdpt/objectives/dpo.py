"""Diffusion-DPO (Wallace et al., "Diffusion Model Alignment Using Direct Preference
Optimization", CVPR 2024).

Per pair (winner ``w``, loser ``l``), one ``t`` and one noise ``eps`` shared by both images:
``d = mse(policy, w) - mse(policy, l)``, ``d_ref`` the same with the frozen reference, and

    L = -mean log sigmoid(-0.5 * beta * (d - d_ref)),    beta = 5000

(the paper's code, SalesforceAIResearch/DiffusionDPO; ``T * omega(lambda_t)`` folded into
``beta``). diffusers' port writes ``-log sigmoid(beta_d * (d_ref - d))`` with ``beta_d = beta / 2 =
2500``: the same loss. For flow models the errors are velocity MSEs (same form).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jdpt.objectives.denoiser import Denoiser, check_prediction, reference_model
from jdpt.objectives.sft import ForwardProcess, check_cond, denoising_errors
from jdpt.parallel.step import Frozen

Array = jax.Array


def dpo_logits(err_w: Array, err_l: Array, ref_err_w: Array, ref_err_l: Array, beta: float) -> Array:
    """The implicit reward margin ``-0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))``
    ``[B]`` of each pair (positive: the policy prefers the winner more than the reference does).

    Args: per-pair regression errors ``[B]`` of the policy and of the reference.
    """
    return -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))


def dpo_loss(err_w: Array, err_l: Array, ref_err_w: Array, ref_err_l: Array, beta: float = 5000.0) -> Array:
    """Diffusion-DPO's loss ``-mean log sigmoid(dpo_logits)`` (a scalar) from per-pair errors
    ``[B]``; ``log 2`` when the policy equals the reference."""
    return -jnp.mean(jax.nn.log_sigmoid(dpo_logits(err_w, err_l, ref_err_w, ref_err_l, beta)))


def _pair_batch(batch: dict) -> tuple[Array, Array, object]:
    """``x0_w, x0_l, cond`` of a preference batch, shapes checked (shared by DPO and MaPO)."""
    x_w, x_l, cond = batch["x0_w"], batch["x0_l"], batch["cond"]
    if x_w.shape != x_l.shape:
        raise ValueError(f"x0_w has shape {x_w.shape} but x0_l has {x_l.shape}; a preference batch "
                         "needs winner and loser latents of the same shape")
    check_cond(cond, x_w.shape[0], "x0_w")
    return x_w, x_l, cond


def pair_errors(denoise: Denoiser, process: ForwardProcess, model, frozen: Frozen, batch: dict,
                key: Array) -> tuple[Array, Array]:
    """Per-pair errors ``(err_w, err_l)`` ``[B]`` of ``model`` with one ``t`` and one ``eps`` per
    pair (drawn from ``key``), in one forward pass on the ``2B`` stacked latents."""
    x_w, x_l, cond = _pair_batch(batch)
    b = x_w.shape[0]
    key_t, key_eps = jax.random.split(key)
    t = process.sample_t(key_t, b)
    eps = jax.random.normal(key_eps, x_w.shape, jnp.float32)
    twice = lambda x: jnp.concatenate([x, x], axis=0)  # noqa: E731
    errors = denoising_errors(denoise, process, model, frozen, jnp.concatenate([x_w, x_l], axis=0),
                              jax.tree.map(twice, cond), twice(t), twice(eps))
    return errors[:b], errors[b:]


@dataclasses.dataclass(frozen=True)
class DPO:
    """Diffusion-DPO hyper-parameters (Wallace et al. 2024) and the model adapter.

    Attributes:
        denoise: the model's adapter (:data:`jdpt.objectives.denoiser.Denoiser`).
        beta: KL strength ``beta`` of the paper's code (5000; diffusers' ``beta_dpo`` is half).
        process: the model's training convention; the paper trains SD1.5/SDXL eps-models with
            ``ForwardProcess.ddpm(DDPMSchedule.stable_diffusion())`` and ``t ~ U{0..999}``.
            The default is a flow model with uniform sigmas.

    The reference is :func:`jdpt.objectives.denoiser.reference_model`: with LoRA the base model,
    with full fine-tuning ``init_state(model, extra={"reference": params_copy})``.

    Batch: ``{"x0_w": [B, ...], "x0_l": [B, ...], "cond": pytree of [B, ...]}``.
    Metrics: ``accuracy`` (fraction of pairs with a positive implicit margin), ``margin`` (mean
    ``dpo_logits``), ``mse_w`` / ``mse_l`` (policy) and ``ref_mse_w`` / ``ref_mse_l``.
    """

    denoise: Denoiser
    beta: float = 5000.0
    process: ForwardProcess = ForwardProcess()

    def __post_init__(self):
        check_prediction(self.denoise, self.process.prediction, "DPO")

    def loss(self, params, frozen: Frozen, batch: dict, key: Array) -> tuple[Array, dict[str, Array]]:
        err_w, err_l = pair_errors(self.denoise, self.process, frozen.model(params), frozen, batch, key)
        reference = reference_model(frozen, params)
        ref_w, ref_l = jax.lax.stop_gradient(
            pair_errors(self.denoise, self.process, reference, frozen, batch, key))
        logits = dpo_logits(err_w, err_l, ref_w, ref_l, self.beta)
        loss = dpo_loss(err_w, err_l, ref_w, ref_l, self.beta)
        metrics = {"accuracy": jnp.mean((logits > 0).astype(jnp.float32)), "margin": logits.mean(),
                   "mse_w": err_w.mean(), "mse_l": err_l.mean(),
                   "ref_mse_w": ref_w.mean(), "ref_mse_l": ref_l.mean()}
        return loss, metrics
