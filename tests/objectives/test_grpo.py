"""Flow-GRPO: the SDE step against the spec's formula in NumPy, the KL term, the loss against a
plain per-step loop on a toy model, the Fast variant's window, and one online iteration on a tiny
Shapes world."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdpt.diffusion.samplers import flow_cps_step_logprob, flow_sde_step, flow_sde_step_logprob, gaussian_log_prob
from jdpt.objectives.advantages import group_advantages
from jdpt.objectives.grpo import FlowGRPO, ema_update, mean_kl
from jdpt.parallel.step import Frozen
from jdpt.world.adapter import world_velocity
from tests.objectives.test_ddpo import _fast_compiles, perturb

__all__ = ["_fast_compiles"]  # the module-scoped fixture applies here too


def np_sde_step(v, x, sigma, sigma_next, sigma_max, a):
    """The spec's Flow-GRPO step (sd3_sde_with_logprob), fp64."""
    dt = sigma_next - sigma
    s = a * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    mean = x + (v + s**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    return mean, s * math.sqrt(-dt)


@pytest.mark.parametrize("sigma", [1.0, 0.6])
def test_sde_step_and_logprob_closed_form(sigma):
    rng = np.random.default_rng(0)
    x, v = rng.normal(size=(2, 6, 3)), rng.normal(size=(2, 6, 3))
    eps = rng.normal(size=(2, 6, 3))
    mean, std = flow_sde_step(jnp.asarray(v, jnp.float32), jnp.asarray(x, jnp.float32), sigma, sigma - 0.25,
                              sigma_max=0.9, noise_level=0.7)
    want_mean, want_std = np_sde_step(v, x, sigma, sigma - 0.25, 0.9, 0.7)
    np.testing.assert_allclose(np.asarray(mean), want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(np.asarray(std).reshape(-1)[0]), want_std, rtol=1e-6)
    # known eps => logp = mean(-eps²/2) - log std - log sqrt(2 pi)
    x_next = want_mean + want_std * eps
    got = gaussian_log_prob(jnp.asarray(x_next, jnp.float32), mean, std)
    want = np.mean(-(eps**2) / 2, axis=(1, 2)) - math.log(want_std) - 0.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)  # x_next rounded to fp32


def test_zero_noise_level_is_the_euler_step():
    rng = np.random.default_rng(1)
    x, v = jnp.asarray(rng.normal(size=(2, 4)), jnp.float32), jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)
    mean, std = flow_sde_step(v, x, 0.7, 0.4, sigma_max=0.9, noise_level=0.0)
    np.testing.assert_allclose(np.asarray(mean), np.asarray(x + v * (0.4 - 0.7)), rtol=1e-6, atol=1e-7)
    assert float(np.max(std)) == 0.0


def test_mean_kl_matches_numpy():
    rng = np.random.default_rng(2)
    mean, ref = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 4, 2))
    std = np.array([0.5, 0.1, 0.0])
    got = mean_kl(jnp.asarray(mean, jnp.float32), jnp.asarray(ref, jnp.float32), jnp.asarray(std)[:, None, None])
    want = np.mean((mean - ref) ** 2, axis=(1, 2))[:2] / (2 * std[:2] ** 2)
    np.testing.assert_allclose(np.asarray(got)[:2], want, rtol=1e-5)
    assert float(got[2]) == 0.0  # deterministic transitions carry no KL


# ---------------------------------------------------------------- loss vs a plain loop (toy model)


def toy_velocity(model, x, sigma, cond):
    return model(x) * cond["s"][:, None, None]


@functools.cache
def toy_setup(window: int | None = None, sde: str = "flow"):
    model = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    objective = FlowGRPO(toy_velocity, num_steps=6, shift=1.0, cfg_scale=1.0, timestep_fraction=0.99,
                         sde_window_size=window, sde=sde)
    cond = {"s": jnp.linspace(0.5, 1.0, 4)}
    noise = jax.random.normal(jax.random.key(0), (4, 5, 3))
    batch, x0 = objective.rollout(model, cond, noise, jax.random.key(1))
    batch["advantages"] = jnp.asarray(group_advantages([0.1, 0.9, 0.3, 0.2], 2))
    return objective, graphdef, params, rest, batch


def test_rollout_records_the_trained_transitions():
    objective, graphdef, params, rest, batch = toy_setup()
    assert objective.num_train == 5 and batch["x_t"].shape == (4, 5, 5, 3)  # int(6 * 0.99) = 5 of 6 steps
    sigmas = objective.sigmas()
    np.testing.assert_allclose(np.asarray(batch["sigma"][0]), sigmas[:5])
    model = nnx.merge(graphdef, params, rest)
    for j in range(5):  # logp_old re-evaluated by the sampler's own step function (rtol: fp32 rounding)
        v = toy_velocity(model, batch["x_t"][:, j], None, batch["cond"])
        logp = flow_sde_step_logprob(v, batch["x_t"][:, j], batch["x_next"][:, j], batch["sigma"][:, j],
                                     batch["sigma_next"][:, j], sigma_max=sigmas[1], noise_level=0.7)
        np.testing.assert_allclose(np.asarray(logp), np.asarray(batch["logp_old"][:, j]), rtol=1e-4, atol=1e-5)


def test_cps_rollout_records_cps_transitions():
    objective, graphdef, params, rest, batch = toy_setup(window=2, sde="cps")
    model = nnx.merge(graphdef, params, rest)
    assert batch["x_t"].shape == (4, 2, 5, 3) and np.all(np.asarray(batch["logp_old"]) < 0)
    for j in range(2):  # logp_old = -mean((x' - mu)²) of the CPS step (rtol: fp32 rounding)
        v = toy_velocity(model, batch["x_t"][:, j], None, batch["cond"])
        logp = flow_cps_step_logprob(v, batch["x_t"][:, j], batch["x_next"][:, j], batch["sigma"][:, j],
                                     batch["sigma_next"][:, j], noise_level=0.7)
        np.testing.assert_allclose(np.asarray(logp), np.asarray(batch["logp_old"][:, j]), rtol=1e-4, atol=1e-7)
        mean, std = plain_cps_step(v, batch["x_t"][:, j], batch["sigma"][:, j], batch["sigma_next"][:, j])
        z = (batch["x_next"][:, j] - mean) / std[:, None, None]  # the injected noise: N(0, 1)
        assert 0.7 < float(jnp.std(z)) < 1.3  # 60 unit normals per step: std 1 +- 0.1


def test_ema_update_matches_the_reference_loop():
    """flow_grpo EMAModuleWrapper.step(params, step) called after every update, in NumPy."""
    rng = np.random.default_rng(7)
    history = rng.normal(size=(40, 3, 2)).astype(np.float32)  # the params after each update
    ema_np = history[0].astype(np.float64)
    ema = {"w": jnp.asarray(history[0])}
    update = jax.jit(ema_update, static_argnames=("decay", "every"))
    for step in range(1, 40):
        decay = min((1 + step) / (10 + step), 0.9)
        if (step + 1) % 8 == 0:
            ema_np = ema_np + (1 - decay) * (history[step] - ema_np)
        ema = update(ema, {"w": jnp.asarray(history[step])}, step)
        np.testing.assert_allclose(np.asarray(ema["w"]), ema_np, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
    assert not np.allclose(ema_np, history[0]) and not np.allclose(ema_np, history[-1])
    once = ema_update({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, 7, decay=0.5, every=4)  # d = min(8/17, 0.5)
    np.testing.assert_allclose(np.asarray(once["w"]), 1 - 8 / 17, rtol=1e-6)
    with pytest.raises(ValueError, match="every >= 1 and 0 <= decay < 1"):
        ema_update(ema, ema, 0, every=0)


def test_fast_variant_trains_only_its_window():
    objective, _, _, _, batch = toy_setup(window=2)
    lo, hi = objective.window_range
    assert (lo, hi) == (0, 3) and batch["x_t"].shape == (4, 2, 5, 3)
    sigmas = objective.sigmas()
    start = int(np.flatnonzero(np.isclose(sigmas, float(batch["sigma"][0, 0])))[0])
    assert lo <= start <= hi - 2
    np.testing.assert_allclose(np.asarray(batch["sigma"][0]), sigmas[start:start + 2])
    assert np.all(np.asarray(batch["logp_old"]) != 0)  # SDE (noisy) steps, not ODE ones
    rollout = jax.jit(lambda key: objective.rollout(nnx.Linear(3, 3, rngs=nnx.Rngs(0)), batch["cond"],
                                                    jnp.zeros((4, 5, 3)), key)[0]["sigma"][0, 0])
    starts = {float(rollout(jax.random.key(seed))) for seed in range(6)}
    assert len(starts) > 1  # the window moves between rollouts


def plain_cps_step(v, x, s, sn, a=0.7):
    """The spec's CPS step written out (jnp, independent of flow_cps_step): (mean, std [B])."""
    s, sn = s[:, None, None], sn[:, None, None]
    std = sn * jnp.sin(a * jnp.pi / 2)
    mean = (x - s * v) * (1 - sn) + (x + (1 - s) * v) * jnp.sqrt(sn**2 - std**2)
    return mean, std.reshape(-1)


@pytest.mark.parametrize("beta,sde", [(0.0, "flow"), (0.04, "flow"), (0.04, "cps")])
def test_flow_grpo_loss_and_gradient_match_plain_loop(beta, sde):
    objective, graphdef, params, rest, batch = toy_setup(sde=sde)
    objective = FlowGRPO(toy_velocity, num_steps=6, shift=1.0, cfg_scale=1.0, beta=beta, sde=sde)
    reference = perturb(params, 0.1, 5)
    frozen = Frozen(graphdef, rest, {"reference": reference})
    new = perturb(params, 0.02, 6)
    sigma_max = float(objective.sigmas()[1])

    def ours(p):
        return objective.loss(p, frozen, batch, jax.random.key(0))

    def plain(p):
        policy, ref = nnx.merge(graphdef, p, rest), nnx.merge(graphdef, reference, rest)
        logps, kls = [], []
        for j in range(batch["logp_old"].shape[1]):
            x, xn, s, sn = (batch[k][:, j] for k in ("x_t", "x_next", "sigma", "sigma_next"))
            v, v_ref = toy_velocity(policy, x, None, batch["cond"]), toy_velocity(ref, x, None, batch["cond"])
            if sde == "cps":  # logp = -mean((x' - mu)²); KL over the CPS std
                (mean, std), (mean_ref, _) = plain_cps_step(v, x, s, sn), plain_cps_step(v_ref, x, s, sn)
                logps.append(-jnp.mean((xn - mean) ** 2, axis=(1, 2)))
            else:
                mean, std = flow_sde_step(v, x, s, sn, sigma_max=sigma_max)
                mean_ref, _ = flow_sde_step(v_ref, x, s, sn, sigma_max=sigma_max)
                logps.append(gaussian_log_prob(xn, mean, std))
                std = std / jnp.sqrt(s - sn)[:, None, None]  # flow_grpo divides by s_t², not s_t² |dt|
            kls.append(jnp.mean((mean - mean_ref) ** 2, axis=(1, 2)) / (2 * std.reshape(-1) ** 2))
        logp = jnp.stack(logps, 1)
        adv = jnp.clip(batch["advantages"], -5, 5)[:, None]
        ratio = jnp.exp(logp - batch["logp_old"])
        policy_loss = jnp.mean(jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - 1e-4, 1 + 1e-4)))
        return policy_loss + beta * jnp.mean(jnp.stack(kls)), jnp.mean(jnp.stack(kls))

    loss, metrics = ours(new)
    want, kl = plain(new)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    if beta:
        np.testing.assert_allclose(float(metrics["kl"]), float(kl), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 jax.grad(lambda p: ours(p)[0])(new), jax.grad(lambda p: plain(p)[0])(new))


def test_bad_settings_and_batches_are_errors():
    objective, graphdef, params, rest, batch = toy_setup()
    with pytest.raises(ValueError, match="sde_window_size=4 must fit in sde_window_range=\\(0, 3\\)"):
        FlowGRPO(toy_velocity, num_steps=6, sde_window_size=4)
    with pytest.raises(ValueError, match="noise_level=0"):
        FlowGRPO(toy_velocity, noise_level=0)
    with pytest.raises(ValueError, match="sde='ode'"):
        FlowGRPO(toy_velocity, sde="ode")
    with pytest.raises(ValueError, match=r"noise_level=1.5: CPS's a must be in \(0, 1\]"):
        FlowGRPO(toy_velocity, sde="cps", noise_level=1.5)
    with pytest.raises(ValueError, match=r"batch\['sigma'\] has shape"):
        objective.loss(params, Frozen(graphdef, rest), {**batch, "sigma": batch["sigma"][:, :1]}, jax.random.key(0))
    with pytest.raises(ValueError, match="this objective needs a reference model"):
        objective.loss(params, Frozen(graphdef, rest), batch, jax.random.key(0))


# ---------------------------------------------------------------- online iteration on the tiny world


def test_flow_grpo_online_iteration_on_tiny_world():
    """Through the online step: G = 2 samples per prompt, group advantages on the device (zero
    sum per prompt), then two updates."""
    from tests.objectives.test_ddpo import online_iteration

    objective = FlowGRPO(world_velocity, num_steps=2, shift=1.0, cfg_scale=1.0, timestep_fraction=1.0)
    batch, (first, second) = online_iteration(objective, 0, group_size=2)
    adv = batch["advantages"]  # fp32 on the device: zero sum up to rounding of the group mean
    np.testing.assert_allclose(adv.reshape(4, 2).sum(axis=1), 0.0, atol=1e-5 * np.abs(adv).max())
    # r = 1 and KL = 0 at init (tolerances: fp32 re-evaluation; XLA fusion of the zero adapters)
    assert float(first["clipfrac"]) == 0.0 and abs(float(first["ratio"]) - 1) < 1e-5
    assert float(first["kl"]) < 1e-10
    np.testing.assert_allclose(float(first["loss"]), -np.clip(batch["advantages"], -5, 5).mean(), atol=1e-4)
    assert np.isfinite(float(second["loss"])) and float(second["kl"]) > 0


def test_ema_lives_in_the_train_state_when_asked():
    """FlowGRPO(ema=True): aux["ema"] starts as the params and follows ema_update with the step
    count after the update (flow_grpo's global_step); off by default (no aux)."""
    params = {"w": jnp.arange(4.0)}
    assert FlowGRPO(world_velocity).init_aux(params) is None
    objective = FlowGRPO(world_velocity, ema=True)
    aux = objective.init_aux(params)
    moved = {"w": jnp.arange(4.0) + 10}
    for step in range(16):
        got = objective.update_aux(aux, moved, jnp.int32(step))
        np.testing.assert_allclose(got["ema"]["w"], ema_update(aux["ema"], moved, step + 1)["w"], rtol=1e-6)
        aux = got
    assert float(aux["ema"]["w"][0]) > 0  # two updates happened (steps 7 and 15: every 8)
