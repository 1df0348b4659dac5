"""MaPO: the safe f(x) = x / expm1(x), the loss against NumPy, its spec properties, a train step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdpt.diffusion.schedules import DDPMSchedule
from jdpt.objectives.mapo import MaPO, mapo_f, mapo_logodds, mapo_loss
from jdpt.objectives.sft import ForwardProcess
from jdpt.world.adapter import world_velocity
from tests.objectives.fixtures_offline import (ToyDenoiser, random_latents, tiny_world, toy_denoise, toy_frozen,
                                               toy_numpy, train_two_steps, world_cond)
from tests.objectives.test_dpo import numpy_log_sigmoid, pair_batch
from tests.objectives.test_sft import numpy_noise_and_target


def numpy_f(x):
    x = np.asarray(x, np.float64)
    return np.where(x == 0, 1.0, x / np.where(x == 0, 1.0, np.expm1(x)))


def numpy_mapo(err_w, err_l, beta=0.1, lam=0.5, temperature=1000.0):
    """mapo-t2i/mapo compute_loss, in float64."""
    logodds = numpy_f(lam * err_w) - numpy_f(lam * err_l)
    return np.mean(err_w) - beta * np.mean(numpy_log_sigmoid(temperature * logodds))


X = np.array([-30.0, -2.0, -0.2, -1e-3, -1e-5, 0.0, 1e-6, 5e-5, 2e-4, 0.0999, 0.1, 0.3, 1.0, 7.0, 60.0, 100.0, 300.0])


def test_f_matches_numpy_and_is_safe():
    got = np.asarray(mapo_f(jnp.asarray(X)))
    assert float(mapo_f(0.0)) == 1.0
    np.testing.assert_allclose(got, numpy_f(X), rtol=2e-6, atol=1e-30)  # fp32 relative rounding
    # Gradient f'(x) = (expm1(x) - x e^x) / expm1(x)^2, -1/2 at 0: finite everywhere, large x too.
    grads = np.asarray(jax.vmap(jax.grad(mapo_f))(jnp.asarray(X, jnp.float32)))
    assert np.isfinite(grads).all()
    with np.errstate(over="ignore", invalid="ignore"):
        want = np.where(X == 0, -0.5, (np.expm1(X) - X * np.exp(X)) / np.expm1(X) ** 2)
    want = np.where(np.isfinite(want), want, 0.0)  # float64 overflows at 300: the limit is 0
    np.testing.assert_allclose(grads, want, rtol=1e-4, atol=1e-12)


def test_loss_matches_numpy():
    rng = np.random.default_rng(0)
    err_w, err_l = 0.5 + rng.uniform(size=(2, 16)) * 1e-2
    np.testing.assert_allclose(mapo_loss(jnp.asarray(err_w), jnp.asarray(err_l)), numpy_mapo(err_w, err_l), rtol=1e-5)
    np.testing.assert_allclose(mapo_loss(jnp.asarray(err_w), jnp.asarray(err_l), beta=2.0, lam=3.0, temperature=10.0),
                               numpy_mapo(err_w, err_l, 2.0, 3.0, 10.0), rtol=1e-5)


def test_equal_errors_give_mean_plus_beta_log2():
    err = jnp.asarray(np.random.default_rng(1).uniform(0.1, 2.0, size=8))
    for beta in (0.1, 1.0):
        np.testing.assert_allclose(mapo_loss(err, err, beta=beta), float(err.mean()) + beta * math.log(2), rtol=1e-6)


def test_smaller_winner_error_raises_logodds():
    err_l = jnp.full((5,), 0.8)
    err_w = jnp.asarray([0.9, 0.8, 0.6, 0.3, 0.0])
    logodds = np.asarray(mapo_logodds(err_w, err_l))
    assert (np.diff(logodds) > 0).all() and logodds[1] == 0.0 and logodds[0] < 0


PROCESSES = {"flow": ForwardProcess(),
             "v_prediction": ForwardProcess.ddpm(DDPMSchedule(prediction_type="v_prediction"))}


@pytest.mark.parametrize("name", list(PROCESSES))
def test_objective_matches_numpy(name):
    process = PROCESSES[name]
    model = ToyDenoiser(5, seed=2)
    params, frozen = toy_frozen(model)  # no reference anywhere: MaPO is reference-free
    batch, key = pair_batch(3), jax.random.key(5)
    loss, metrics = jax.jit(MaPO(denoise=toy_denoise, process=process).loss)(params, frozen, batch, key)
    key_t, key_eps = jax.random.split(key)  # one t and one eps per pair
    t = np.asarray(process.sample_t(key_t, 3))
    eps = np.asarray(jax.random.normal(key_eps, (3, 4, 5)), np.float64)
    forward = toy_numpy(model)

    def mses(x0):
        x_t, target = numpy_noise_and_target(process.prediction, x0.astype(np.float64), eps, t)
        return ((forward(x_t, t, batch["cond"]["c"]) - target) ** 2).mean(axis=(1, 2))

    err_w, err_l = mses(batch["x0_w"]), mses(batch["x0_l"])
    np.testing.assert_allclose(loss, numpy_mapo(err_w, err_l), rtol=1e-5)  # fp32 forwards
    np.testing.assert_allclose(metrics["mse_w"], err_w.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["mse_l"], err_l.mean(), rtol=1e-5)


def test_train_step_on_world_lora():
    model = tiny_world(lora=True)
    batch = {"x0_w": random_latents(0, 2, model), "x0_l": random_latents(1, 2, model), "cond": world_cond(model, 2)}
    first, second = train_two_steps(MaPO(world_velocity), model, batch, trainable="lora")
    assert np.isfinite(first["loss"]) and np.isfinite(second["loss"]) and first["loss"] != second["loss"]
    assert np.isfinite(first["grad_norm"]) and first["grad_norm"] > 0
