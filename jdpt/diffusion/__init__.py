"""Noise schedules, samplers (with per-step log-probs) and the text-to-image pipeline."""

from jdpt.diffusion.pipeline import flux_generate, to_uint8
from jdpt.diffusion.samplers import (
    Trajectory,
    ddim_sample,
    ddim_step,
    ddim_step_logprob,
    ddpm_sample,
    ddpm_step,
    ddpm_step_logprob,
    euler_flow,
    flow_sde_sample,
    flow_sde_step,
    flow_sde_step_logprob,
    gaussian_log_prob,
)
from jdpt.diffusion.schedules import (
    DDPMSchedule,
    alpha_cumprod_at,
    flow_sigmas,
    flux_mu,
    inference_timesteps,
    prediction_to_x0_eps,
)

__all__ = [
    "DDPMSchedule",
    "Trajectory",
    "alpha_cumprod_at",
    "ddim_sample",
    "ddim_step",
    "ddim_step_logprob",
    "ddpm_sample",
    "ddpm_step",
    "ddpm_step_logprob",
    "euler_flow",
    "flow_sde_sample",
    "flow_sde_step",
    "flow_sde_step_logprob",
    "flow_sigmas",
    "flux_generate",
    "flux_mu",
    "gaussian_log_prob",
    "inference_timesteps",
    "prediction_to_x0_eps",
    "to_uint8",
]
