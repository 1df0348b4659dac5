"""DDPM schedules, inference timesteps, prediction conversions and flow sigmas vs diffusers."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jdpt.diffusion.schedules import (
    DDPMSchedule,
    alpha_cumprod_at,
    flow_sigmas,
    inference_timesteps,
    prediction_to_x0_eps,
)
from tests.reference import torch_module

BETAS = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="linear", num_train_timesteps=37, beta_start=0.001, beta_end=0.3),
]


@pytest.mark.parametrize("config", BETAS, ids=lambda c: f"{c['beta_schedule']}-{c.get('num_train_timesteps', 1000)}")
@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "DDIMScheduler"])
def test_betas_and_alphas_cumprod_match_diffusers(config, scheduler):
    torch_module()
    import diffusers

    ref = getattr(diffusers, scheduler)(**config)
    ours = DDPMSchedule(**config)
    assert ours.betas.dtype == ours.alphas_cumprod.dtype == np.float32
    # torch's fp32 linspace/cumprod round differently from one fp64 pass: a few ulps apart
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=3e-6)


def test_cosine_schedule_caps_betas():
    betas = DDPMSchedule(beta_schedule="squaredcos_cap_v2").betas
    assert betas.max() == np.float32(0.999) and betas[-1] == np.float32(0.999)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_final_alpha_matches_ddim(set_alpha_to_one):
    torch_module()
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        set_alpha_to_one=set_alpha_to_one)
    ours = DDPMSchedule.stable_diffusion(set_alpha_to_one=set_alpha_to_one)
    assert ours.final_alpha_cumprod == pytest.approx(float(ref.final_alpha_cumprod), rel=3e-6)
    t = jnp.array([-5, -1, 0, 17, 999])
    expected = np.concatenate([[ours.final_alpha_cumprod] * 2, ours.alphas_cumprod[[0, 17, 999]]])
    got = alpha_cumprod_at(ours, t, final=ours.final_alpha_cumprod)
    np.testing.assert_array_equal(got, expected.astype(np.float32))


@pytest.mark.parametrize("spacing,offset", [("leading", 0), ("leading", 1), ("trailing", 0), ("linspace", 0)])
@pytest.mark.parametrize("num_steps", [1, 3, 7, 50, 1000])
def test_inference_timesteps_match_diffusers(spacing, offset, num_steps):
    torch_module()
    from diffusers import DDIMScheduler, DDPMScheduler

    ours = inference_timesteps(DDPMSchedule(timestep_spacing=spacing, steps_offset=offset), num_steps)
    assert ours.dtype == np.int32 and ours.shape == (num_steps,)
    for cls in (DDIMScheduler, DDPMScheduler):
        ref = cls(timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(num_steps)
        np.testing.assert_array_equal(ours, ref.timesteps.numpy())


def test_stable_diffusion_preset():
    sd = DDPMSchedule.stable_diffusion()
    assert (sd.beta_schedule, sd.beta_start, sd.beta_end, sd.set_alpha_to_one, sd.steps_offset) == (
        "scaled_linear", 0.00085, 0.012, False, 1)
    np.testing.assert_array_equal(inference_timesteps(sd, 50)[[0, 1, -1]], [981, 961, 1])
    assert DDPMSchedule.stable_diffusion(prediction_type="v_prediction").prediction_type == "v_prediction"


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_prediction_conversions_invert_the_forward_process(prediction_type):
    rng = np.random.default_rng(0)
    x0, eps = rng.normal(size=(2, 2, 3, 5)).astype(np.float32)
    a = np.array([0.9, 0.2], np.float32)  # one alpha_cumprod per sample
    sa, sb = np.sqrt(a)[:, None, None], np.sqrt(1 - a)[:, None, None]
    x_t = sa * x0 + sb * eps
    target = {"epsilon": eps, "sample": x0, "v_prediction": sa * eps - sb * x0}[prediction_type]
    got_x0, got_eps = prediction_to_x0_eps(jnp.asarray(target), jnp.asarray(x_t), jnp.asarray(a), prediction_type)
    assert got_x0.dtype == got_eps.dtype == jnp.float32
    np.testing.assert_allclose(got_x0, x0, atol=3e-6)
    np.testing.assert_allclose(got_eps, eps, atol=3e-6)


@pytest.mark.parametrize("steps", [1, 4, 10, 40])
def test_sd3_default_sigmas_match_diffusers(steps):
    """The SD3 pipeline calls ``set_timesteps(N)`` on a static shift-3.0 scheduler."""
    torch_module()
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    np.testing.assert_allclose(flow_sigmas(steps, shift=3.0, num_train_timesteps=1000), sched.sigmas.numpy(),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("steps,mu", [(4, 0.5), (28, 1.15)])
def test_dynamic_shift_default_grid_matches_diffusers(steps, mu):
    torch_module()
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    sched.set_timesteps(steps, mu=mu)
    np.testing.assert_allclose(flow_sigmas(steps, mu=mu, num_train_timesteps=1000), sched.sigmas.numpy(),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs,message", [
    (dict(beta_schedule="cosine"), r"unknown beta_schedule 'cosine'; choose one of 'linear', 'scaled_linear'"),
    (dict(prediction_type="eps"), r"unknown prediction_type 'eps'; choose one of 'epsilon'"),
    (dict(timestep_spacing="uniform"), r"unknown timestep_spacing 'uniform'; choose one of 'leading'"),
    (dict(num_train_timesteps=0), r"num_train_timesteps must be >= 1; got 0"),
    (dict(clip_sample=0.0), r"clip_sample must be > 0 or None"),
])
def test_bad_schedule_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDPMSchedule(**kwargs)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, num_train_timesteps=1000\]; got 0"):
        inference_timesteps(DDPMSchedule(), 0)
    with pytest.raises(ValueError, match=r"got 1001"):
        inference_timesteps(DDPMSchedule(), 1001)
    with pytest.raises(ValueError, match=r"unknown prediction_type 'x0'; choose one of 'epsilon', 'v_prediction'"):
        prediction_to_x0_eps(jnp.zeros((1, 2)), jnp.zeros((1, 2)), 0.5, "x0")
    with pytest.raises(ValueError, match=r"scalar or a \[batch\] array; got shape \(2, 2\)"):
        prediction_to_x0_eps(jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.ones((2, 2)), "epsilon")
    with pytest.raises(ValueError, match=r"num_train_timesteps must be >= 1"):
        flow_sigmas(4, num_train_timesteps=0)
