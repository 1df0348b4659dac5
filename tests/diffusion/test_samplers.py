"""Samplers vs diffusers' schedulers step by step, log-probs vs the closed-form Gaussian, and the
Flow-GRPO SDE's defining properties (ODE limit, marginal preservation)."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdpt.diffusion.samplers import (
    Trajectory,
    cps_log_prob,
    ddim_sample,
    ddim_step,
    ddim_step_logprob,
    ddpm_sample,
    ddpm_step_logprob,
    euler_flow,
    flow_cps_sample,
    flow_cps_step,
    flow_cps_step_logprob,
    flow_sde_sample,
    flow_sde_step,
    flow_sde_step_logprob,
    gaussian_log_prob,
)
from jdpt.diffusion.schedules import DDPMSchedule, flow_sigmas
from tests.reference import assert_parity, torch_module

SHAPE = (2, 3, 4, 4)
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1)


def rng_key(seed: int) -> jax.Array:
    """An RBG key: a sampler drawing from it compiles ~2x faster on CPU than with threefry."""
    return jax.random.key(seed, impl="rbg")


def linear_model(time_scale: float, seed: int = 0):
    """The same model in JAX and torch: ``x @ W + u * sin(3 t / time_scale)``, ``W`` near 0.9 I
    (so that as a noise, velocity or x0 predictor it keeps every sampler's states O(1))."""
    rng = np.random.default_rng(seed)
    w = (0.9 * np.eye(SHAPE[-1]) + rng.normal(size=(SHAPE[-1],) * 2) * 0.1).astype(np.float32)
    u = (rng.normal(size=SHAPE[-1]) * 0.1).astype(np.float32)

    def jax_model(x, t):
        return (x @ w + u * jnp.sin(3 * jnp.asarray(t, jnp.float32) / time_scale)).astype(x.dtype)

    def torch_model(x, t):
        import torch

        return x @ torch.from_numpy(w) + torch.from_numpy(u) * math.sin(3 * float(t) / time_scale)

    return jax_model, torch_model


def step_noises(key, n, shape=SHAPE):
    """The noise the samplers draw (the contract in the samplers' module docstring)."""
    return [np.array(jax.random.normal(k, shape, jnp.float32)) for k in jax.random.split(key, n)]


def closed_form_log_prob(noise: np.ndarray, std: float) -> np.ndarray:
    """``[B]`` log-prob of ``mean + std * noise`` (DDPO's formula; 0 for a deterministic step)."""
    if std == 0:
        return np.zeros(noise.shape[0])
    return (-(noise.astype(np.float64) ** 2) / 2).mean(axis=(1, 2, 3)) - np.log(std) - 0.5 * np.log(2 * np.pi)


def posterior_std(ref, t: int, t_prev: int, final: float) -> float:
    """sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) from a diffusers scheduler's alphas."""
    a_t = float(ref.alphas_cumprod[t])
    a_prev = float(ref.alphas_cumprod[t_prev]) if t_prev >= 0 else final
    return math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))


def diffusers_config(schedule: DDPMSchedule) -> dict:
    config = dataclasses.asdict(schedule)
    clip = config.pop("clip_sample")
    return config | dict(clip_sample=clip is not None, clip_sample_range=clip or 1.0)


X_INIT = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
DDIM_CASES = [
    ("epsilon", dict(), 0.0, 10),
    ("epsilon", SD, 1.0, 10),  # DDPO's sampler
    ("v_prediction", SD | dict(clip_sample=1.0), 0.5, 8),
    ("sample", dict(timestep_spacing="trailing"), 0.5, 7),
    ("v_prediction", dict(timestep_spacing="linspace", beta_schedule="squaredcos_cap_v2"), 1.0, 6),
]


@pytest.mark.parametrize("prediction_type,config,eta,steps", DDIM_CASES)
def test_ddim_matches_diffusers_every_step(prediction_type, config, eta, steps):
    torch = torch_module()
    from diffusers import DDIMScheduler

    schedule = DDPMSchedule(prediction_type=prediction_type, **config)
    model, torch_model = linear_model(schedule.num_train_timesteps)
    key = rng_key(3)
    traj = ddim_sample(model, jnp.asarray(X_INIT), schedule, steps, eta=eta, key=key, return_trajectory=True)
    assert isinstance(traj, Trajectory) and traj.samples.shape == (steps + 1, *SHAPE)

    ref = DDIMScheduler(**diffusers_config(schedule))
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(traj.t, ref.timesteps.numpy())
    x = torch.from_numpy(X_INIT)
    for i, (t, noise) in enumerate(zip(ref.timesteps, step_noises(key, steps))):
        variance_noise = torch.from_numpy(noise) if eta else None
        x = ref.step(torch_model(x, t), t, x, eta=eta, variance_noise=variance_noise).prev_sample
        assert_parity(traj.samples[i + 1], x, rtol=1e-5, what=f"DDIM state after step {i} (t={int(t)})")
        t_prev = int(t) - ref.config.num_train_timesteps // steps  # diffusers' DDIM convention
        std = eta * posterior_std(ref, int(t), t_prev, float(ref.final_alpha_cumprod))
        np.testing.assert_allclose(traj.log_probs[i], closed_form_log_prob(noise, std), atol=1e-4)


@pytest.mark.parametrize("prediction_type,config,steps", [
    ("epsilon", dict(), 10),  # leading from 900 to 0: no noise at t = 0
    ("v_prediction", SD, 10),  # last t = 1 -> -1: no variance (diffusers: 1e-10 noise)
    ("sample", dict(num_train_timesteps=20, timestep_spacing="trailing", clip_sample=1.0), 20),  # full chain
])
def test_ddpm_matches_diffusers_every_step(prediction_type, config, steps, monkeypatch):
    torch = torch_module()
    from diffusers import DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm

    schedule = DDPMSchedule(prediction_type=prediction_type, **config)
    model, torch_model = linear_model(schedule.num_train_timesteps)
    key = rng_key(4)
    traj = ddpm_sample(model, jnp.asarray(X_INIT), schedule, steps, key=key, return_trajectory=True)

    ref_config = diffusers_config(schedule)
    del ref_config["set_alpha_to_one"]
    ref = DDPMScheduler(**ref_config, variance_type="fixed_small")
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(np.append(traj.t, traj.t_next[-1]), np.append(ref.timesteps.numpy(), -1))
    noises = step_noises(key, steps)
    x = torch.from_numpy(X_INIT)
    for i, t in enumerate(ref.timesteps):  # diffusers draws step noise with randn_tensor: hand it ours
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, _n=noises[i], **k: torch.from_numpy(_n))
        x = ref.step(torch_model(x, t), t, x).prev_sample
        assert_parity(traj.samples[i + 1], x, rtol=1e-5, what=f"DDPM state after step {i} (t={int(t)})")
        std = posterior_std(ref, int(t), int(traj.t_next[i]), 1.0)  # 0 at the last step (diffusers: 1e-10)
        np.testing.assert_allclose(traj.log_probs[i], closed_form_log_prob(noises[i], std), atol=1e-4)


def test_euler_matches_diffusers_every_step():
    torch = torch_module()
    from diffusers import FlowMatchEulerDiscreteScheduler

    model, torch_model = linear_model(1.0)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(8)
    sigmas = flow_sigmas(8, shift=3.0, num_train_timesteps=1000)
    traj = euler_flow(model, jnp.asarray(X_INIT), sigmas, return_trajectory=True)
    x = torch.from_numpy(X_INIT)
    for i, t in enumerate(ref.timesteps):
        x = ref.step(torch_model(x, ref.sigmas[i]), t, x).prev_sample
        assert_parity(traj.samples[i + 1], x, rtol=1e-5, what=f"Euler state after step {i}")
    np.testing.assert_array_equal(traj.log_probs, 0.0)


def reference_flow_sde(v, x, sigmas, noises, a):
    """Flow-GRPO's ``sd3_sde_with_logprob`` arithmetic, in float64 numpy."""
    x, sigmas = x.astype(np.float64), sigmas.astype(np.float64)
    states, log_probs = [x], []
    for sigma, sigma_next, z in zip(sigmas[:-1], sigmas[1:], noises):
        dt = sigma_next - sigma
        s = a * np.sqrt(sigma / (1 - (sigmas[1] if sigma == 1 else sigma)))
        vel = np.asarray(v(x.astype(np.float32), sigma), np.float64)
        mean = x * (1 + s**2 / (2 * sigma) * dt) + vel * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
        x = mean + s * np.sqrt(-dt) * z
        states.append(x)
        log_probs.append((-(z**2) / 2).mean(axis=(1, 2, 3)) - np.log(s * np.sqrt(-dt)) - 0.5 * np.log(2 * np.pi))
    return np.stack(states), np.stack(log_probs)


def test_flow_sde_matches_reference_formula_and_closed_form_logprob():
    model, _ = linear_model(1.0)
    sigmas = flow_sigmas(6, shift=3.0)
    key = rng_key(5)
    traj = flow_sde_sample(model, jnp.asarray(X_INIT), sigmas, key=key, return_trajectory=True)
    states, log_probs = reference_flow_sde(model, X_INIT, sigmas, step_noises(key, 6), 0.7)
    for i in range(6):
        assert_parity(traj.samples[i + 1], states[i + 1], rtol=1e-5, what=f"SDE state after step {i}")
    assert traj.log_probs.shape == (6, 2) and traj.log_probs.dtype == jnp.float32
    np.testing.assert_allclose(traj.log_probs, log_probs, atol=1e-5)


@pytest.mark.parametrize("dtype,kinds", [(jnp.float32, ("flow", "ddim", "ddpm")), (jnp.bfloat16, ("flow", "ddim"))])
def test_recorded_logprobs_are_reproduced_by_reevaluation(dtype, kinds):
    """What DDPO / Flow-GRPO do at their first update: same parameters -> ratio 1. The sampler's
    scan and this separately compiled re-evaluation may fuse differently: equal to ~1 ulp."""
    x = jnp.asarray(X_INIT, dtype)
    flow_model, _ = linear_model(1.0)
    model, _ = linear_model(1000.0)
    sigmas, schedule = flow_sigmas(5, shift=3.0), DDPMSchedule(**SD)
    batch = jnp.ones(SHAPE[0], jnp.int32)  # per-sample times, as a shuffled training batch has them
    runs = {
        "flow": (lambda: flow_sde_sample(flow_model, x, sigmas, key=rng_key(6), return_trajectory=True),
                 lambda traj, xs, xn, i: flow_sde_step_logprob(
                     flow_model(xs, traj.t[i]), xs, xn, traj.t[i] * batch, traj.t_next[i], sigma_max=sigmas[1])),
        "ddim": (lambda: ddim_sample(model, x, schedule, 5, eta=1.0, key=rng_key(7), return_trajectory=True),
                 lambda traj, xs, xn, i: ddim_step_logprob(
                     model(xs, traj.t[i]), xs, xn, traj.t[i] * batch, traj.t_next[i] * batch, schedule, 1.0)),
        "ddpm": (lambda: ddpm_sample(model, x, schedule, 5, key=rng_key(8), return_trajectory=True),
                 lambda traj, xs, xn, i: ddpm_step_logprob(
                     model(xs, traj.t[i]), xs, xn, traj.t[i], traj.t_next[i], schedule)),
    }
    for kind in kinds:
        sample, logprob = runs[kind]
        traj = sample()
        assert traj.samples.dtype == dtype and traj.log_probs.dtype == jnp.float32
        reevaluate = jax.jit(lambda i: logprob(traj, traj.samples[i], traj.samples[i + 1], i))
        for i in range(5):
            np.testing.assert_allclose(reevaluate(i), traj.log_probs[i], rtol=1e-6, atol=1e-6,
                                       err_msg=f"{kind} step {i}")


def test_ddim_logprob_closed_form_for_known_noise():
    """DDPO's check: x_prev = mean + std * eps => logp = mean(-eps² / 2) - log std - log sqrt(2 pi)."""
    schedule = DDPMSchedule(**SD)
    rng = np.random.default_rng(2)
    x_t, prediction, eps = (jnp.asarray(rng.normal(size=SHAPE), jnp.float32) for _ in range(3))
    mean, std = jax.jit(ddim_step, static_argnums=4)(prediction, x_t, 501, 481, schedule, 1.0)
    a_t, a_prev = schedule.alphas_cumprod[501].astype(np.float64), schedule.alphas_cumprod[481].astype(np.float64)
    expected_std = np.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    np.testing.assert_allclose(std, expected_std, rtol=1e-5)
    got = jax.jit(ddim_step_logprob, static_argnums=5)(prediction, x_t, mean + std * eps, 501, 481, schedule, 1.0)
    eps64 = np.asarray(eps, np.float64)
    expected = (-(eps64**2) / 2).mean(axis=(1, 2, 3)) - np.log(expected_std) - 0.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    scipy_form = jax.jit(jax.scipy.stats.norm.logpdf)(mean + std * eps, mean, std).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(got, scipy_form, atol=1e-5)


def test_deterministic_steps_have_zero_logprob_and_finite_gradients():
    """DDIM's last step with set_alpha_to_one has std = 0: log-prob 0, gradient 0, never NaN."""
    schedule = DDPMSchedule()
    x = jnp.asarray(X_INIT)
    _, std = jax.jit(ddim_step, static_argnums=4)(x, x, 99, -1, schedule, 1.0)
    np.testing.assert_array_equal(std, 0.0)
    grad = jax.jit(jax.grad(lambda p: ddim_step_logprob(p, x, x * 0.5, 99, -1, schedule, 1.0).sum()))(x)
    np.testing.assert_array_equal(grad, 0.0)
    np.testing.assert_array_equal(jax.jit(gaussian_log_prob)(x, x + 1, jnp.zeros(())), 0.0)


def test_flow_sde_noise_level_zero_is_the_euler_step():
    rng = np.random.default_rng(3)
    x, v = (jnp.asarray(rng.normal(size=SHAPE), jnp.float32) for _ in range(2))
    mean, std = jax.jit(flow_sde_step)(v, x, 0.7, 0.55, sigma_max=0.9, noise_level=0.0)
    np.testing.assert_allclose(mean, x + v * (0.55 - 0.7), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(std, 0.0)


def test_flow_sde_converges_to_the_ode_as_noise_vanishes():
    model, _ = linear_model(1.0)
    x, sigmas = jnp.asarray(X_INIT), flow_sigmas(8, shift=3.0)
    ode = np.asarray(euler_flow(model, x, sigmas))
    sde = jax.jit(lambda a: flow_sde_sample(model, x, sigmas, key=rng_key(9), noise_level=a))  # a traced
    errors = [float(np.abs(np.asarray(sde(jnp.float32(a))) - ode).max()) for a in (1e-2, 1e-3, 1e-4)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-3, errors


def test_flow_sde_preserves_the_marginal_variance():
    """Data ~ N(0, s0²), x_sigma = (1 - sigma) x0 + sigma eps has variance
    V(sigma) = (1 - sigma)² s0² + sigma², and the exact velocity E[eps - x0 | x] is
    (sigma - (1 - sigma) s0²) / V(sigma) * x. Started on the exact marginal at sigma = 0.9 (away
    from Flow-GRPO's coarse sigma = 1 step), the SDE keeps var(x) = V(sigma) at every step up to
    O(dt) discretisation (~1% here) and sampling error (0.45% std with 1e5 samples), while
    Euler + the same noise without the score correction drifts far from it."""
    s0, n = 0.5, 100

    def variance(sigma):
        return (1 - sigma) ** 2 * s0**2 + sigma**2

    def velocity(x, sigma):
        return (sigma - (1 - sigma) * s0**2) / variance(sigma) * x

    sigmas = np.linspace(0.9, 0.0, n + 1).astype(np.float32)
    x = jax.random.normal(rng_key(10), (100_000, 1)) * np.sqrt(variance(0.9))
    traj = flow_sde_sample(velocity, x, sigmas, key=rng_key(11), return_trajectory=True)
    ratio = np.var(np.asarray(traj.samples[..., 0], np.float64), axis=1) / variance(sigmas.astype(np.float64))
    assert np.abs(ratio - 1).max() < 0.03, ratio

    naive_x, rng = np.asarray(x, np.float64), np.random.default_rng(0)  # Euler + SDE noise, no correction
    for sigma, sigma_next in zip(sigmas[:-1].astype(np.float64), sigmas[1:].astype(np.float64)):
        noise = 0.7 * np.sqrt(sigma / (1 - sigma) * (sigma - sigma_next)) * rng.normal(size=naive_x.shape)
        naive_x = naive_x + velocity(naive_x, sigma) * (sigma_next - sigma) + noise
    assert np.var(naive_x) / variance(0.0) > 1.5


def test_sde_window_injects_noise_only_inside():
    model, _ = linear_model(1.0)
    x, sigmas = jnp.asarray(X_INIT), flow_sigmas(6, shift=3.0)
    sample = jax.jit(functools.partial(flow_sde_sample, model, sigmas=sigmas, return_trajectory=True))
    traj = sample(x, key=rng_key(12), sde_window=(jnp.int32(2), jnp.int32(4)))  # traced window
    inside = np.array([False, False, True, True, False, False])
    assert np.all(traj.log_probs[inside] != 0) and np.all(traj.log_probs[~inside] == 0)
    for i in range(6):
        euler = traj.samples[i] + (sigmas[i + 1] - sigmas[i]) * model(traj.samples[i], sigmas[i])
        assert np.allclose(traj.samples[i + 1], euler, atol=1e-5) != inside[i], f"step {i}"


# ---------------------------------------------------------------- Flow-CPS


def np_cps_step(v, x, sigma, sigma_next, a):
    """The spec's CPS step (flow_grpo sde_type='cps'), fp64: returns (mean, std)."""
    v, x = np.asarray(v, np.float64), np.asarray(x, np.float64)
    std = sigma_next * math.sin(a * math.pi / 2)
    x0_hat, x1_hat = x - sigma * v, x + (1 - sigma) * v
    return x0_hat * (1 - sigma_next) + x1_hat * math.sqrt(sigma_next**2 - std**2), std


@pytest.mark.parametrize("sigma,sigma_next,a", [(1.0, 0.75, 0.7), (0.6, 0.35, 0.3), (0.4, 0.0, 0.7)])
def test_flow_cps_step_closed_form_for_known_noise(sigma, sigma_next, a):
    rng = np.random.default_rng(20)
    x, v, z = (rng.normal(size=SHAPE).astype(np.float32) for _ in range(3))
    mean, std = flow_cps_step(jnp.asarray(v), jnp.asarray(x), sigma, sigma_next, noise_level=a)
    want_mean, want_std = np_cps_step(v, x, sigma, sigma_next, a)
    np.testing.assert_allclose(mean, want_mean, rtol=1e-5, atol=1e-6)  # fp32 vs fp64
    np.testing.assert_allclose(np.broadcast_to(std, SHAPE)[:, 0, 0, 0], want_std, rtol=1e-6, atol=1e-7)
    # x' = mean + std z  =>  logp = -mean((std z)²) (no constants, no 1 / (2 std²))
    x_next = want_mean + want_std * z.astype(np.float64)
    want = -np.mean((want_std * z.astype(np.float64)) ** 2, axis=(1, 2, 3))
    got = flow_cps_step_logprob(jnp.asarray(v), jnp.asarray(x), jnp.asarray(x_next, jnp.float32), sigma, sigma_next,
                                noise_level=a)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)  # x_next rounded to fp32
    np.testing.assert_allclose(cps_log_prob(jnp.asarray(x_next, jnp.float32), mean), want, rtol=1e-4, atol=1e-6)


def test_flow_cps_noise_level_zero_is_the_euler_step():
    """a = 0: x0_hat (1 - s') + x1_hat s' = x + (s' - s) v, the deterministic DDIM-like step."""
    rng = np.random.default_rng(21)
    x, v = (jnp.asarray(rng.normal(size=SHAPE), jnp.float32) for _ in range(2))
    sigma = jnp.asarray([0.7, 1.0])  # per-sample levels
    mean, std = flow_cps_step(v, x, sigma, 0.45, noise_level=0.0)
    np.testing.assert_allclose(mean, x + (0.45 - sigma)[:, None, None, None] * v, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.broadcast_to(std, SHAPE), 0.0)
    np.testing.assert_array_equal(flow_cps_step_logprob(v, x, mean, sigma, 0.45, noise_level=0.0), 0.0)


def test_flow_cps_sampler_draws_the_documented_noise_and_records_logprobs():
    model, _ = linear_model(1.0)
    sigmas, key = flow_sigmas(4, shift=3.0), rng_key(22)
    traj = jax.jit(lambda x: flow_cps_sample(model, x, sigmas, key=key, noise_level=0.7, sde_window=(1, 3),
                                             return_trajectory=True))(jnp.asarray(X_INIT))
    x = X_INIT.astype(np.float64)
    for i, z in enumerate(step_noises(key, 4)):
        a = 0.7 if 1 <= i < 3 else 0.0  # the window: noise on steps 1 and 2 only
        mean, std = np_cps_step(model(jnp.asarray(x, jnp.float32), sigmas[i]), x, float(sigmas[i]),
                                float(sigmas[i + 1]), a)
        x = mean + std * z
        np.testing.assert_allclose(traj.samples[i + 1], x, rtol=1e-4, atol=1e-5, err_msg=f"state after step {i}")
        np.testing.assert_allclose(traj.log_probs[i], -np.mean((std * z) ** 2, axis=(1, 2, 3)), rtol=1e-4,
                                   atol=1e-7, err_msg=f"log-prob of step {i}")
    assert np.all(np.asarray(traj.log_probs)[[0, 3]] == 0) and np.all(np.asarray(traj.log_probs)[1:3] < 0)


def test_flow_cps_keeps_the_forward_coefficients_on_a_coarse_grid():
    """Data at a point mu: the exact velocity gives x0_hat = mu and x1_hat = eps exactly, so CPS
    puts x_{s'} = (1 - s') mu + s' * (unit noise) at EVERY step, whatever the step size: mean
    (1 - s) mu and variance s² (tolerance 3%: 4 steps of 1e5 samples, std of a variance estimate
    0.45%), where the Flow-GRPO SDE's first-order noise on the same 4-step grid is > 25% too large."""
    mu = np.array([0.8, -0.5], np.float32)

    def velocity(x, sigma):
        return (x - (1 - sigma) * mu) / sigma - mu

    sigmas = np.linspace(1.0, 0.0, 5).astype(np.float32)
    x = jax.random.normal(rng_key(23), (100_000, 2))
    for sampler, ok in ((flow_cps_sample, True), (flow_sde_sample, False)):
        states = np.asarray(sampler(velocity, x, sigmas, key=rng_key(24), return_trajectory=True).samples, np.float64)
        s = sigmas[1:-1, None].astype(np.float64)
        var_ratio = states[1:-1].var(axis=1) / s**2
        if ok:
            np.testing.assert_allclose(states[1:-1].mean(axis=1), (1 - s) * mu, atol=0.01)
            assert np.abs(var_ratio - 1).max() < 0.03, var_ratio
            np.testing.assert_allclose(states[-1], np.broadcast_to(mu, states[-1].shape), atol=1e-5)  # s' = 0: mu
        else:
            assert var_ratio.max() > 1.25, var_ratio


def test_samplers_jit_and_match_eager():
    schedule = DDPMSchedule(**SD)
    model, _ = linear_model(1000.0)
    x, key = jnp.asarray(X_INIT), rng_key(13)
    jitted = jax.jit(ddim_sample, static_argnums=(0, 2, 3), static_argnames=("eta", "return_trajectory"))
    traj = jitted(model, x, schedule, 4, eta=1.0, key=key, return_trajectory=True)
    assert traj.samples.shape == (5, *SHAPE) and traj.log_probs.shape == (4, 2) and traj.t.shape == (4,)
    np.testing.assert_allclose(traj.samples[-1], ddim_sample(model, x, schedule, 4, eta=1.0, key=key), atol=1e-5)


def test_bad_inputs():
    schedule, x, key = DDPMSchedule(), jnp.zeros(SHAPE), rng_key(0)
    model, _ = linear_model(1.0)
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, num_train_timesteps=1000\]; got 0"):
        ddim_sample(model, x, schedule, 0)
    with pytest.raises(ValueError, match=r"eta must be >= 0 .*; got -0.5"):
        ddim_sample(model, x, schedule, 4, eta=-0.5, key=key)
    with pytest.raises(ValueError, match=r"eta must be >= 0"):
        ddim_step_logprob(x, x, x, 10, 0, schedule, -1.0)
    with pytest.raises(ValueError, match=r"DDIM with eta=1.0 is stochastic: pass key="):
        ddim_sample(model, x, schedule, 4, eta=1.0)
    with pytest.raises(ValueError, match=r"DDPM sampling is stochastic: pass key="):
        ddpm_sample(model, x, schedule, 4, key=None)
    with pytest.raises(ValueError, match=r"noise_level must be >= 0 .*; got -0.1"):
        flow_sde_sample(model, x, flow_sigmas(4), key=key, noise_level=-0.1)
    with pytest.raises(ValueError, match=r"noise_level must be in \[0, 1\] for CPS .*got 1.5"):
        flow_cps_sample(model, x, flow_sigmas(4), key=key, noise_level=1.5)
    with pytest.raises(ValueError, match=r"flow CPS sampling is stochastic: pass key="):
        flow_cps_sample(model, x, flow_sigmas(4), key=None)
    with pytest.raises(ValueError, match=r"sigmas must be \[num_steps \+ 1\] noise levels .*got shape \(1,\)"):
        euler_flow(model, x, jnp.ones(1))
