"""Reward backprop (DRaFT-K, AlignProp, ReFL): truncated gradients against the closed form of a
per-step linear model, sampling against the library's samplers, ReFL's hinge, and 2 updates of
each on a tiny Shapes world."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdpt.diffusion.samplers import ddim_sample, euler_flow
from jdpt.diffusion.schedules import DDPMSchedule, flow_sigmas, inference_timesteps
from jdpt.objectives.reward_backprop import AlignProp, DRaFT, ReFL, refl_loss, refl_prediction, truncated_sample
from jdpt.parallel import make_mesh, make_train_step
from jdpt.parallel.step import Frozen
from jdpt.world.adapter import world_velocity
from tests.objectives.test_ddpo import PROMPTS, _fast_compiles, tiny_world, world_cond

__all__ = ["_fast_compiles"]  # the module-scoped fixture applies here too

N = 4
SIGMAS = flow_sigmas(N)  # 1, 0.75, 0.5, 0.25, 0
RNG = np.random.default_rng(0)
W = RNG.normal(scale=0.5, size=N).astype(np.float32)
X_T = RNG.normal(size=(2, 3, 2)).astype(np.float32)
TARGET = RNG.normal(size=(2, 3, 2)).astype(np.float32)


def index(sigma):
    """Step index of a noise level on the uniform grid."""
    return jnp.round((1 - sigma) * N).astype(jnp.int32)


def euler(v, x, sigma, sigma_next):
    return x + (sigma_next - sigma) * v


def closed_form(cut):
    """The per-step linear model v = w_i x: x0 = prod(1 + dt_i w_i) x_T; the loss
    mean((x0 - target)²) and its gradients wrt w (0 before ``cut``) and x_T (0 unless cut = 0)."""
    dt = np.diff(SIGMAS).astype(np.float64)
    factors = 1 + dt * W
    x0 = np.prod(factors) * X_T
    outer = 2 * (x0 - TARGET) / x0.size
    grad_w = np.array([np.sum(outer * x0) * dt[j] / factors[j] if j >= cut else 0.0 for j in range(N)])
    grad_x = outer * np.prod(factors) if cut == 0 else np.zeros_like(X_T)
    return np.mean((x0 - TARGET) ** 2), grad_w, grad_x


def sampled_loss(w, x, cut):
    def predict(x, sigma):
        return w[index(sigma)] * x

    def predict_nograd(x, sigma):
        return jax.lax.stop_gradient(w)[index(sigma)] * x

    x0 = truncated_sample(predict, predict_nograd, x, jnp.asarray(SIGMAS[:-1]), jnp.asarray(SIGMAS[1:]), euler, cut)
    return jnp.mean((x0 - TARGET) ** 2)


@pytest.mark.parametrize("cut", [0, 1, 3])
def test_truncated_gradients_match_closed_form(cut):
    want, grad_w, grad_x = closed_form(cut)
    loss, (gw, gx) = jax.value_and_grad(sampled_loss, argnums=(0, 1))(jnp.asarray(W), jnp.asarray(X_T), cut)
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), grad_w, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gx), grad_x, rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(gw)[:cut] == 0.0) and (cut == 0 or np.all(np.asarray(gx) == 0.0))
    # the same with a traced truncation point (AlignProp's random one), under jit
    traced = jax.jit(jax.grad(sampled_loss, argnums=(0, 1)))(jnp.asarray(W), jnp.asarray(X_T), jnp.int32(cut))
    np.testing.assert_allclose(np.asarray(traced[0]), grad_w, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(traced[1]), grad_x, rtol=1e-4, atol=1e-7)


def test_refl_prediction_and_its_gradient():
    m = 2
    w = jnp.asarray(W)

    def x0_hat(w):
        def predict(x, sigma):
            return w[index(sigma)] * x

        def predict_nograd(x, sigma):
            return jax.lax.stop_gradient(w)[index(sigma)] * x

        return refl_prediction(predict, predict_nograd, jnp.asarray(X_T), jnp.asarray(SIGMAS[:-1]),
                               jnp.asarray(SIGMAS[1:]), euler, lambda v, x, s: x - s * v, jnp.int32(m))

    dt = np.diff(SIGMAS).astype(np.float64)
    x_m = np.prod(1 + dt[:m] * W[:m]) * X_T
    np.testing.assert_allclose(np.asarray(x0_hat(w)), x_m * (1 - SIGMAS[m] * W[m]), rtol=1e-5)
    grad = np.asarray(jax.grad(lambda w: jnp.sum(x0_hat(w)))(w))
    np.testing.assert_allclose(grad[m], -SIGMAS[m] * np.sum(x_m), rtol=1e-5)
    assert np.all(np.delete(grad, m) == 0.0)  # only the one differentiated step


def test_refl_loss_is_a_hinge():
    r = jnp.asarray([2.5, 3.0, 2.1])
    assert float(refl_loss(r)) == 0.0 and np.all(np.asarray(jax.grad(refl_loss)(r)) == 0.0)  # r > 2: no gradient
    r = jnp.asarray([1.0, 3.0])
    np.testing.assert_allclose(float(refl_loss(r)), 1e-3 * 1.0 / 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(refl_loss)(r)), [-1e-3 / 2, 0.0], rtol=1e-6)


# ---------------------------------------------------------------- the objectives on toy models


class PerStep(nnx.Module):
    """A flow / epsilon model with one scalar per sampling step: prediction = w[step] * x."""

    def __init__(self, steps_of):
        self.w = nnx.Param(jnp.asarray(W))
        self.steps_of = steps_of

    def __call__(self, x, t):
        return self.w[self.steps_of(t)][:, None, None] * x


def per_step_denoise(model, x, t, cond):
    return model(x, t)


def toy(steps_of=index):
    graphdef, params, rest = nnx.split(PerStep(steps_of), nnx.Param, ...)
    return Frozen(graphdef, rest), params


def distance_reward(x0, cond):
    return -jnp.mean((x0 - cond["target"]) ** 2, axis=(1, 2))


BATCH = {"noise": jnp.asarray(X_T), "cond": {"target": jnp.asarray(TARGET)}}


def test_draft_flow_matches_euler_sampler_and_closed_form():
    frozen, params = toy()
    objective = DRaFT(per_step_denoise, distance_reward, num_steps=N, cfg_scale=1.0, schedule=None, truncation=2)
    loss, grads = jax.value_and_grad(lambda p: objective.loss(p, frozen, BATCH, jax.random.key(0))[0])(params)
    x0 = euler_flow(lambda x, s: jnp.asarray(W)[index(s)] * x, jnp.asarray(X_T), SIGMAS)
    np.testing.assert_allclose(float(loss), float(-distance_reward(x0, BATCH["cond"]).mean()), rtol=1e-5)
    # -mean(r) = mean((x0 - target)²): the closed form's loss; gradients only in the last K = 2 steps
    _, grad_w, _ = closed_form(N - 2)
    np.testing.assert_allclose(np.asarray(grads["w"][...]), grad_w, rtol=1e-4, atol=1e-7)


def test_draft_ddim_matches_ddim_sampler():
    schedule = DDPMSchedule()
    times = {int(t): i for i, t in enumerate(np.asarray(inference_timesteps(schedule, N)))}
    table = jnp.asarray([times.get(t, 0) for t in range(schedule.num_train_timesteps)])
    frozen, params = toy(lambda t: table[t])
    objective = DRaFT(per_step_denoise, distance_reward, num_steps=N, cfg_scale=1.0, schedule=schedule, truncation=N)
    loss, _ = objective.loss(params, frozen, BATCH, jax.random.key(0))
    x0 = ddim_sample(lambda x, t: jnp.asarray(W)[table[t]] * x, jnp.asarray(X_T), schedule, N, eta=0.0)
    np.testing.assert_allclose(float(loss), float(-distance_reward(x0, BATCH["cond"]).mean()), rtol=1e-5)


def np_draft_lv(n, key):
    """DRaFT-LV on the per-step linear flow model, fp64: x0 = prod(1 + dt_i w_i) x_T (no gradient),
    x_L^i = (1 - s) x0 + s eps_i at the last level s = sigmas[N-1], one Euler step to 0:
    x0^i = (1 - s w_L) x_L^i; loss = -mean r = mean((x0^i - target)²) and its gradient wrt w_L."""
    eps = np.asarray(jax.random.normal(key, (n, *X_T.shape), jnp.float32), np.float64)
    x0 = np.prod(1 + np.diff(SIGMAS).astype(np.float64) * W) * X_T
    s = float(SIGMAS[N - 1])
    x_last = (1 - s) * x0 + s * eps
    err = (1 - s * float(W[N - 1])) * x_last - TARGET
    return np.mean(err**2), np.mean(2 * err * (-s * x_last))


@pytest.mark.parametrize("n", [1, 2])
def test_draft_lv_matches_numpy_and_trains_only_the_final_step(n):
    frozen, params = toy()
    objective = DRaFT(per_step_denoise, distance_reward, num_steps=N, cfg_scale=1.0, schedule=None, lv_samples=n)
    key = jax.random.key(3)

    def loss(p, noise):
        return objective.loss(p, frozen, {**BATCH, "noise": noise}, key)[0]

    value, (grads, grad_noise) = jax.value_and_grad(loss, argnums=(0, 1))(params, BATCH["noise"])
    want, want_grad = np_draft_lv(n, key)
    np.testing.assert_allclose(float(value), want, rtol=1e-5)  # fp32 vs fp64
    g = np.asarray(grads["w"][...])
    np.testing.assert_allclose(g[N - 1], want_grad, rtol=1e-4)
    assert np.all(g[:N - 1] == 0.0) and np.all(np.asarray(grad_noise) == 0.0)  # only the final step


def test_draft_lv_ddim_trains_only_the_final_step():
    schedule = DDPMSchedule()
    times = {int(t): i for i, t in enumerate(np.asarray(inference_timesteps(schedule, N)))}
    table = jnp.asarray([times.get(t, 0) for t in range(schedule.num_train_timesteps)])
    frozen, params = toy(lambda t: table[t])
    objective = DRaFT(per_step_denoise, distance_reward, num_steps=N, cfg_scale=1.0, schedule=schedule, lv_samples=2)
    grads, metrics = jax.grad(lambda p: objective.loss(p, frozen, BATCH, jax.random.key(4)), has_aux=True)(params)
    g = np.asarray(grads["w"][...])
    assert g[N - 1] != 0 and np.all(g[:N - 1] == 0.0) and np.isfinite(float(metrics["reward"]))


def test_alignprop_gradient_starts_at_its_random_step():
    frozen, params = toy()
    objective = AlignProp(per_step_denoise, distance_reward, num_steps=N, cfg_scale=1.0, schedule=None,
                          truncation_range=(0, N))
    grad = jax.jit(jax.grad(lambda p, key: objective.loss(p, frozen, BATCH, key), has_aux=True))
    seen = set()
    for seed in range(5):
        grads, metrics = grad(params, jax.random.key(seed))
        first = int(metrics["first_grad_step"])
        seen.add(first)
        _, grad_w, _ = closed_form(first)
        np.testing.assert_allclose(np.asarray(grads["w"][...]), grad_w, rtol=1e-4, atol=1e-7)
    assert len(seen) > 1 and seen <= set(range(N))


def test_refl_objective_zero_gradient_above_threshold():
    frozen, params = toy()

    def high_reward(x0, cond):  # > 2 for these small states, and differentiable
        return 3.0 + 1e-3 * jnp.mean(x0, axis=(1, 2))

    objective = ReFL(per_step_denoise, high_reward, num_steps=N, cfg_scale=1.0, schedule=None)
    grads, metrics = jax.grad(lambda p: objective.loss(p, frozen, BATCH, jax.random.key(0)), has_aux=True)(params)
    assert np.all(np.asarray(grads["w"][...]) == 0.0) and float(metrics["reward"]) > 2
    low = ReFL(per_step_denoise, distance_reward, num_steps=N, cfg_scale=1.0, schedule=None)
    grads, metrics = jax.grad(lambda p: low.loss(p, frozen, BATCH, jax.random.key(0)), has_aux=True)(params)
    m = int(metrics["grad_step"])
    assert m == 3  # U{30..39} * 4 // 40
    g = np.asarray(grads["w"][...])
    assert g[m] != 0 and np.all(np.delete(g, m) == 0.0)


def test_bad_settings_and_batches_are_errors():
    frozen, params = toy()
    with pytest.raises(ValueError, match=r"truncation K=5 must be in \[1, num_steps=4\]"):
        DRaFT(per_step_denoise, distance_reward, num_steps=4, truncation=5)
    with pytest.raises(ValueError, match=r"DRaFT-LV \(lv_samples=2\) is the K = 1 estimator; got truncation K=2"):
        DRaFT(per_step_denoise, distance_reward, num_steps=4, truncation=2, lv_samples=2)
    with pytest.raises(ValueError, match="lv_samples=-1 must be >= 0"):
        DRaFT(per_step_denoise, distance_reward, num_steps=4, lv_samples=-1)
    with pytest.raises(ValueError, match="truncation_range=\\(3, 3\\)"):
        AlignProp(per_step_denoise, distance_reward, truncation_range=(3, 3))
    with pytest.raises(ValueError, match="grad_step_range"):
        ReFL(per_step_denoise, distance_reward, grad_step_range=(30, 50))
    objective = DRaFT(per_step_denoise, distance_reward, num_steps=N, cfg_scale=1.0, schedule=None)
    with pytest.raises(ValueError, match="the batch lacks 'noise'"):
        objective.loss(params, frozen, {"cond": BATCH["cond"]}, jax.random.key(0))
    with pytest.raises(ValueError, match=r"batch\['cond'\] leaves must all be \[B = 2"):
        objective.loss(params, frozen, {**BATCH, "cond": {"target": jnp.zeros((3, 3, 2))}}, jax.random.key(0))
    bad_reward = DRaFT(per_step_denoise, lambda x0, c: jnp.sum(x0), num_steps=N, cfg_scale=1.0, schedule=None)
    with pytest.raises(ValueError, match=r"reward_fn must return \[B\] = \[2\]"):
        bad_reward.loss(params, frozen, BATCH, jax.random.key(0))
    with pytest.raises(ValueError, match="cfg_scale=7.5 needs the unconditional input"):
        DRaFT(per_step_denoise, distance_reward, num_steps=N, schedule=None).loss(params, frozen, BATCH,
                                                                                   jax.random.key(0))


# ---------------------------------------------------------------- 2 updates on the tiny world


def world_updates(objective):
    model = tiny_world()
    init_state, step = make_train_step(objective, optax.adam(1e-2), make_mesh(), model=model, trainable="lora")
    state = init_state(model)
    cond, _ = world_cond(model, PROMPTS * 2)
    shape = (8, 64, 4 * model.config.codec().latent_channels)
    cond["target"] = np.asarray(jax.random.uniform(jax.random.key(0), shape, minval=-1, maxval=1))
    batch = {"noise": np.asarray(jax.random.normal(jax.random.key(1), shape)), "cond": cond}
    metrics = []
    for i in range(2):
        state, m = step(state, batch, jax.random.key(2 + i))
        metrics.append(jax.device_get(m))
    assert all(np.isfinite(float(m["loss"])) for m in metrics)
    assert float(metrics[0]["grad_norm"]) > 0
    return metrics


def world_reward(x0, cond):
    return -jnp.mean((x0.astype(jnp.float32) - cond["target"]) ** 2, axis=(1, 2))


def test_draft_updates_on_tiny_world():
    world_updates(DRaFT(world_velocity, world_reward, num_steps=2, cfg_scale=1.0, schedule=None))


@pytest.mark.slow
def test_draft_lv_updates_on_tiny_world():
    world_updates(DRaFT(world_velocity, world_reward, num_steps=2, cfg_scale=1.0, schedule=None, lv_samples=2))


@pytest.mark.slow
def test_alignprop_updates_on_tiny_world():
    world_updates(AlignProp(world_velocity, world_reward, num_steps=2, cfg_scale=1.0, schedule=None,
                            truncation_range=(0, 2)))


@pytest.mark.slow
def test_refl_updates_on_tiny_world():
    world_updates(ReFL(world_velocity, world_reward, num_steps=2, cfg_scale=1.0, schedule=None))
