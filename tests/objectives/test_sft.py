"""SFT and the shared forward process: noising, targets, timestep laws, loss values, a train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdpt.diffusion.schedules import DDPMSchedule
from jdpt.objectives.sft import SFT, ForwardProcess, per_sample_mse
from jdpt.world.adapter import world_velocity
from tests.objectives.fixtures_offline import (ToyDenoiser, random_latents, tiny_world, toy_denoise,
                                               toy_frozen, toy_numpy, train_two_steps, world_cond)

SCHEDULE = DDPMSchedule()  # linear betas 1e-4 .. 0.02 over 1000 steps
PROCESSES = {
    "flow": ForwardProcess(),
    "epsilon": ForwardProcess.ddpm(SCHEDULE),
    "v_prediction": ForwardProcess.ddpm(DDPMSchedule(prediction_type="v_prediction")),
}


def numpy_alphas_cumprod():
    return np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))


def numpy_noise_and_target(prediction, x0, eps, t):
    """Independent float64 forward process: (x_t, target)."""
    if prediction == "velocity":
        s = t[:, None, None].astype(np.float64)
        return (1 - s) * x0 + s * eps, eps - x0
    a = numpy_alphas_cumprod()[t][:, None, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    return x_t, (eps if prediction == "epsilon" else np.sqrt(a) * eps - np.sqrt(1 - a) * x0)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_noise_and_target_match_numpy(name):
    process = PROCESSES[name]
    rng = np.random.default_rng(0)
    x0, eps = rng.normal(size=(2, 4, 3, 5))
    t = np.array([0.1, 0.9, 0.0, 1.0], np.float32) if process.is_flow else np.array([0, 10, 500, 999])
    want_xt, want_target = numpy_noise_and_target(process.prediction, x0, eps, t)
    got_xt = process.noise(jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32), jnp.asarray(t))
    got_target = process.target(jnp.asarray(x0, jnp.float32), jnp.asarray(eps, jnp.float32), jnp.asarray(t))
    np.testing.assert_allclose(got_xt, want_xt, atol=1e-5)  # fp32 rounding of O(1) values
    np.testing.assert_allclose(got_target, want_target, atol=1e-5)


def test_timestep_laws():
    key = jax.random.key(0)
    uniform = np.asarray(ForwardProcess().sample_t(key, 4096))
    assert uniform.dtype == np.float32 and 0 <= uniform.min() and uniform.max() <= 1
    assert abs(uniform.mean() - 0.5) < 0.02  # 4096 draws: std of the mean ~0.0045
    logit = np.asarray(ForwardProcess(timesteps="logit_normal", logit_mean=0.5, logit_std=2.0).sample_t(key, 4096))
    z = np.log(logit / (1 - logit))
    assert abs(z.mean() - 0.5) < 0.1 and abs(z.std() - 2.0) < 0.1  # std of the mean ~0.03
    ddpm = np.asarray(PROCESSES["epsilon"].sample_t(key, 4096))
    assert ddpm.dtype == np.int32 and ddpm.min() >= 0 and ddpm.max() <= 999 and len(np.unique(ddpm)) > 900


def test_bad_process_configs():
    with pytest.raises(ValueError, match="takes no DDPM schedule"):
        ForwardProcess(schedule=SCHEDULE)
    with pytest.raises(ValueError, match="needs the model's DDPM schedule"):
        ForwardProcess(prediction="epsilon")
    with pytest.raises(ValueError, match="make them agree"):
        ForwardProcess(prediction="v_prediction", schedule=SCHEDULE)
    with pytest.raises(ValueError, match="prediction='x0'"):
        ForwardProcess(prediction="x0")


@pytest.mark.parametrize("name", ["flow_logit_normal", "epsilon"])
def test_sft_loss_matches_numpy(name):
    process = ForwardProcess(timesteps="logit_normal") if name == "flow_logit_normal" else PROCESSES["epsilon"]
    model = ToyDenoiser(5, seed=1)
    params, frozen = toy_frozen(model)
    rng = np.random.default_rng(1)
    batch = {"x0": rng.normal(size=(3, 4, 5)).astype(np.float32),
             "cond": {"c": rng.normal(size=(3, 5)).astype(np.float32)}}
    key = jax.random.key(7)
    loss, metrics = jax.jit(SFT(denoise=toy_denoise, process=process).loss)(params, frozen, batch, key)
    # The documented draws: t from the first half of split(key), eps ~ N(0, 1) from the second.
    key_t, key_eps = jax.random.split(key)
    t = np.asarray(process.sample_t(key_t, 3))
    eps = np.asarray(jax.random.normal(key_eps, (3, 4, 5)), np.float64)
    x_t, target = numpy_noise_and_target(process.prediction, batch["x0"].astype(np.float64), eps, t)
    want = np.mean((toy_numpy(model)(x_t, t, batch["cond"]["c"]) - target) ** 2)
    np.testing.assert_allclose(loss, want, rtol=1e-5)  # fp32 vs float64
    np.testing.assert_allclose(metrics["mse"], want, rtol=1e-5)


def test_per_sample_mse_and_cond_check():
    a, b = np.ones((2, 3, 4)), np.zeros((2, 3, 4))
    b[1] = 3.0
    np.testing.assert_array_equal(per_sample_mse(jnp.asarray(a), jnp.asarray(b)), [1.0, 4.0])
    params, frozen = toy_frozen(ToyDenoiser(4))
    bad = {"x0": np.zeros((2, 3, 4), np.float32), "cond": {"c": np.zeros((3, 4), np.float32)}}
    with pytest.raises(ValueError, match=r"cond has an array of shape \(3, 4\) but x0 has batch 2"):
        SFT(denoise=toy_denoise).loss(params, frozen, bad, jax.random.key(0))


def test_sft_train_step_on_world_lora():
    model = tiny_world(lora=True)
    batch = {"x0": random_latents(0, 2, model), "cond": world_cond(model, 2)}
    first, second = train_two_steps(SFT(world_velocity), model, batch, trainable="lora")
    assert np.isfinite(first["loss"]) and np.isfinite(second["loss"])
    assert first["loss"] != second["loss"]  # same batch and key: only the adapters changed
