"""Flow schedules and the Euler ODE sampler against diffusers' FlowMatchEulerDiscreteScheduler."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jdpt.diffusion.samplers import euler_flow
from jdpt.diffusion.schedules import FLOW_SIGMA_FLOOR, flow_sigmas, flow_velocity, flux_mu
from tests.reference import torch_module


@pytest.mark.parametrize("steps,seq_len", [(4, 256), (28, 1024), (50, 4096)])
def test_flux_dynamic_shift_matches_diffusers(steps, seq_len):
    torch_module()
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                            max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    mu = calculate_shift(seq_len)
    assert flux_mu(seq_len) == pytest.approx(mu, rel=1e-12)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    np.testing.assert_allclose(flow_sigmas(steps, mu=mu), sched.sigmas.numpy(), atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_static_shift_matches_diffusers(shift):
    torch_module()
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 10, 10))
    np.testing.assert_allclose(flow_sigmas(10, shift=shift), sched.sigmas.numpy(), atol=1e-6)


def test_euler_steps_match_diffusers():
    torch = torch_module()
    from diffusers import FlowMatchEulerDiscreteScheduler

    rng = np.random.default_rng(0)
    x0 = rng.normal(size=(2, 5, 3)).astype(np.float32)
    w = rng.normal(size=(3, 3)).astype(np.float32) * 0.3

    def velocity(x, sigma):  # a nonlinear field depending on the noise level
        return np.tanh(x @ w) * (1 + sigma)

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6))
    x = torch.from_numpy(x0)
    for t in sched.timesteps:
        sigma = float(t) / 1000
        x = sched.step(torch.from_numpy(velocity(x.numpy(), sigma)), t, x).prev_sample
    ours = euler_flow(lambda x, s: jnp.tanh(x @ w) * (1 + s), jnp.asarray(x0), flow_sigmas(6, shift=3.0))
    np.testing.assert_allclose(ours, x.numpy(), atol=1e-5)


def test_euler_is_exact_for_straight_paths():
    """With the exact velocity of a straight path the Euler ODE lands on x_0 for any grid."""
    x0 = jnp.arange(6.0).reshape(2, 3)
    noise = jnp.ones((2, 3))
    out = euler_flow(lambda x, s: noise - x0, noise, flow_sigmas(7, mu=0.8))
    np.testing.assert_allclose(out, x0, atol=1e-5)


def test_flow_velocity_of_a_sample_prediction():
    """An exact x0 prediction gives the exact velocity eps - x0 at every level above the floor,
    and (x_t - x0) / floor below it; a velocity prediction passes through unchanged."""
    rng = np.random.default_rng(0)
    x0, eps = rng.normal(size=(2, 2, 4, 5)).astype(np.float32)
    sigma = np.array([0.9, 0.2], np.float32)[:, None, None]
    x_t = (1 - sigma) * x0 + sigma * eps
    v = flow_velocity(jnp.asarray(x0), jnp.asarray(x_t), sigma[:, 0, 0], "sample")
    np.testing.assert_allclose(v, eps - x0, rtol=1e-5, atol=1e-5)
    low = np.float32(0.01)
    x_low = (1 - low) * x0 + low * eps
    np.testing.assert_allclose(flow_velocity(jnp.asarray(x0), jnp.asarray(x_low), low, "sample"),
                               (x_low - x0) / FLOW_SIGMA_FLOOR, rtol=1e-5)
    np.testing.assert_array_equal(flow_velocity(jnp.asarray(eps), jnp.asarray(x_t), 0.5, "velocity"), eps)
    with pytest.raises(ValueError, match="unknown prediction 'epsilon'"):
        flow_velocity(jnp.asarray(eps), jnp.asarray(x_t), 0.5, "epsilon")


def test_bad_steps():
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        flow_sigmas(0)
