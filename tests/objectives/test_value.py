"""DPOK's value baseline: the value net against a NumPy forward, its regression with
make_train_step, adv = r - V exactly, and the DPOK loss with it against a NumPy re-derivation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdpt.objectives.ddpo import DPOK
from jdpt.objectives.value import (ValueBaseline, ValueNet, ValueRegression, value_advantages, value_batch,
                                   value_loss)
from jdpt.parallel import make_mesh, make_train_step
from jdpt.parallel.step import Frozen
from tests.objectives.test_ddpo import SCHEDULE, _fast_compiles, perturb, toy_denoise, toy_setup

__all__ = ["_fast_compiles"]  # the module-scoped fixture applies here too

STEPS, TEXT = 3, 4


def np_value(net: ValueNet):
    """An independent float64 NumPy forward of dpok's ValueMulti: concat(flatten x, text) ->
    3 x relu((h W + b) * gamma[step]) -> h W + b."""
    layers = [(np.asarray(l.linear.kernel[...], np.float64), np.asarray(l.linear.bias[...], np.float64),
               np.asarray(l.gamma[...], np.float64)) for l in net.layers]
    w_out, b_out = np.asarray(net.out.kernel[...], np.float64), np.asarray(net.out.bias[...], np.float64)

    def forward(x, text, step):
        h = np.concatenate([np.asarray(x, np.float64).reshape(len(x), -1), np.asarray(text, np.float64)], axis=1)
        for w, b, gamma in layers:
            h = np.maximum((h @ w + b) * gamma[np.asarray(step)], 0.0)
        return (h @ w_out + b_out)[:, 0]

    return forward


def small_value(seed: int = 0) -> ValueNet:
    return ValueNet(5 * 3, TEXT, STEPS, hidden=16, rngs=nnx.Rngs(seed))  # states [5, 3] as the toy rollout's


def test_value_net_matches_numpy_forward():
    net = small_value()
    rng = np.random.default_rng(0)
    x, text, step = rng.normal(size=(6, 5, 3)), rng.normal(size=(6, TEXT)), np.array([0, 1, 2, 2, 1, 0])
    got = net(jnp.asarray(x, jnp.float32), jnp.asarray(text, jnp.float32), jnp.asarray(step))
    np.testing.assert_allclose(np.asarray(got), np_value(net)(x, text, step), rtol=1e-5, atol=1e-6)  # fp32 vs fp64
    with pytest.raises(ValueError, match=r"ValueNet\(state_size=15, text_size=4\) got x_t \(6, 4, 3\)"):
        net(jnp.zeros((6, 4, 3)), jnp.zeros((6, TEXT)), jnp.zeros(6, jnp.int32))


def test_value_regression_loss_decreases_with_make_train_step():
    """A fixed toy regression (reward = tanh of a projection of x_t plus a step term): 40 AdamW
    steps bring the MSE below a third of its start; the first step's loss is the NumPy MSE."""
    rng = np.random.default_rng(1)
    rows = {"x_t": rng.normal(size=(32, 5, 3)).astype(np.float32), "text": rng.normal(size=(32, TEXT)).astype(np.float32),
            "step": rng.integers(0, STEPS, size=32).astype(np.int32)}
    rows["reward"] = (np.tanh(rows["x_t"].reshape(32, -1) @ rng.normal(size=15) / 4) + 0.3 * rows["step"]
                      + 0.5).astype(np.float32)
    net = small_value()
    want_first = np.mean((np_value(net)(rows["x_t"], rows["text"], rows["step"]) - rows["reward"]) ** 2)
    init, step = make_train_step(ValueRegression(), optax.adamw(1e-2), make_mesh(devices=jax.devices()[:1]), model=net)
    state = init(net)
    losses = []
    for i in range(40):
        state, metrics = step(state, rows, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses[0], want_first, rtol=1e-5)
    assert losses[-1] < losses[0] / 3, losses


def rollout_with_rewards():
    graphdef, params, rest, batch = toy_setup()  # a DDIM (eta = 1) rollout of 4 samples x 3 steps on a toy model
    rewards = np.array([0.3, -1.2, 2.0, 0.5], np.float32)
    text = np.random.default_rng(2).normal(size=(4, TEXT)).astype(np.float32)
    return graphdef, params, rest, batch, rewards, text


def test_value_batch_and_advantages_are_reward_minus_value():
    _, _, _, batch, rewards, text = rollout_with_rewards()
    net = small_value()
    rows = value_batch(batch, rewards, text)
    assert rows["x_t"].shape == (12, 5, 3) and rows["step"].tolist() == [0, 1, 2] * 4
    np.testing.assert_array_equal(np.asarray(rows["x_t"][4]), np.asarray(batch["x_t"][1, 1]))  # row b K + k
    adv = jax.jit(value_advantages)(net, batch, rewards, text)
    v = np_value(net)
    want = np.stack([rewards - v(np.asarray(batch["x_t"][:, k]), text, np.full(4, k)) for k in range(STEPS)], axis=1)
    assert adv.shape == (4, STEPS)
    np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-5, atol=1e-5)
    loss, _ = value_loss(net, rows)
    np.testing.assert_allclose(float(loss), np.mean(want**2), rtol=1e-5)  # MSE(V, r) = mean(adv²)
    with pytest.raises(ValueError, match=r"value_batch needs rewards \[B\] and text \[B, D\] for B = 4"):
        value_batch(batch, rewards[:3], text)


def np_dpok_loss(graphdef, rest, params, reference, batch, adv, clip_range, alpha=100.0, beta=0.01):
    """DPOK's loss in float64 NumPy: DDIM (eta = 1) log-probs of the recorded transitions under
    the toy model (pred = (x W + b) s), a plain ratio clamp, -alpha A r, + beta mean((pred - pred_ref)²)."""

    def linear(p):
        model = nnx.merge(graphdef, p, rest)
        return np.asarray(model.kernel[...], np.float64), np.asarray(model.bias[...], np.float64)

    (w, b), (w_ref, b_ref) = linear(params), linear(reference)
    s = np.asarray(batch["cond"]["s"], np.float64)[:, None, None]
    a_bar = SCHEDULE.alphas_cumprod.astype(np.float64)
    logps, kls = [], []
    for k in range(batch["x_t"].shape[1]):
        x, x_next = np.asarray(batch["x_t"][:, k], np.float64), np.asarray(batch["x_next"][:, k], np.float64)
        t, t_prev = int(batch["t"][0, k]), int(batch["t_next"][0, k])
        eps, eps_ref = (x @ w + b) * s, (x @ w_ref + b_ref) * s
        a_t, a_prev = a_bar[t], (a_bar[t_prev] if t_prev >= 0 else 1.0)
        std = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * eps
        if std == 0:
            logps.append(np.zeros(len(x)))
        else:
            logps.append(np.mean(-((x_next - mean) ** 2) / (2 * std**2), axis=(1, 2)) - math.log(std)
                         - 0.5 * math.log(2 * math.pi))
        kls.append(np.mean((eps - eps_ref) ** 2))
    ratio = np.clip(np.exp(np.stack(logps, 1) - np.asarray(batch["logp_old"], np.float64)), 1 - clip_range, 1 + clip_range)
    policy, kl = np.mean(-alpha * np.asarray(adv, np.float64) * ratio), np.mean(kls)
    return policy + beta * kl, policy, kl


@pytest.mark.parametrize("clip_range", [1e-4, 1.0])
def test_dpok_value_baseline_loss_matches_numpy(clip_range):
    graphdef, params, rest, batch, rewards, text = rollout_with_rewards()
    adv = value_advantages(small_value(), batch, rewards, text)
    batch = {**batch, "advantages": adv}
    reference, new = perturb(params, 0.1, 2), perturb(params, 0.02, 3)
    objective = DPOK(toy_denoise, schedule=SCHEDULE, num_steps=3, cfg_scale=1.0, clip_range=clip_range)
    assert objective.baseline == "value"  # the paper's default
    loss, metrics = objective.loss(new, Frozen(graphdef, rest, {"reference": reference}), batch, jax.random.key(0))
    want, policy, kl = np_dpok_loss(graphdef, rest, new, reference, batch, adv, clip_range)
    # rtol 1e-4: fp32 log-probs of the recorded states divide fp32 rounding by a small std
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["policy_loss"]), policy, rtol=1e-4)
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-5)  # the KL term on its own (fp32 vs fp64)


def test_dpok_value_baseline_selects_advantages_with_their_steps():
    """timestep_fraction < 1 keeps a random subset of each sample's steps: advantages equal across a
    sample's steps must give exactly the per-sample (baseline='batch') loss with the same key."""
    graphdef, params, rest, batch, _, _ = rollout_with_rewards()
    frozen = Frozen(graphdef, rest, {"reference": perturb(params, 0.1, 2)})
    per_sample = jnp.asarray([1.5, -0.5, 2.0, -1.0])
    common = dict(schedule=SCHEDULE, num_steps=3, cfg_scale=1.0, clip_range=1.0, timestep_fraction=2 / 3)
    value_loss_, _ = DPOK(toy_denoise, **common).loss(
        params, frozen, {**batch, "advantages": jnp.repeat(per_sample[:, None], 3, axis=1)}, jax.random.key(5))
    batch_loss, _ = DPOK(toy_denoise, baseline="batch", **common).loss(
        params, frozen, {**batch, "advantages": per_sample}, jax.random.key(5))
    np.testing.assert_allclose(float(value_loss_), float(batch_loss), rtol=1e-6)
    with pytest.raises(ValueError, match=r"DPOK\(baseline='value'\) needs per-transition advantages \[B, K\]"):
        DPOK(toy_denoise, **common).loss(params, frozen, {**batch, "advantages": per_sample}, jax.random.key(5))
    with pytest.raises(ValueError, match="baseline='critic'"):
        DPOK(toy_denoise, baseline="critic")


@pytest.mark.slow  # ~30 s of compiles: the value net's and DPOK's steps on the tiny world
def test_dpok_with_value_net_online_iteration_on_tiny_world():
    """Through the online step: rollout -> JPEG rewards -> the value net (in the train state's
    aux) takes one AdamW step on the transitions -> A = r - V -> two DPOK updates (LoRA). The
    value step and the advantages are checked against a value net trained by hand."""
    from jdpt.rewards.compressibility import jpeg_compressibility
    from jdpt.world.adapter import world_velocity
    from tests.objectives.test_ddpo import CFG, ROLLOUT_STEPS, WORLD_EPS, online_iteration, tiny_world, world_images

    model = tiny_world()
    n, c = world_velocity.latent_shape(model)
    baseline = ValueBaseline(n * c, model.config.width, lambda m, cond: m.encode_prompts(cond["input_ids"])[1],
                             num_steps=ROLLOUT_STEPS, seed=3)
    objective = DPOK(WORLD_EPS, num_steps=ROLLOUT_STEPS, cfg_scale=CFG, value=baseline)
    batch, (first, second), state = online_iteration(objective, 0, with_state=True)
    assert batch["advantages"].shape == (8, ROLLOUT_STEPS)
    rewards = jpeg_compressibility(world_images(model, batch["x_next"][:, -1]))
    value = ValueNet(n * c, model.config.width, ROLLOUT_STEPS, rngs=nnx.Rngs(3))
    init_value, value_step = make_train_step(ValueRegression(), optax.adamw(1e-4), make_mesh(devices=jax.devices()[:1]),
                                             model=value)
    value_state, _ = value_step(init_value(value), value_batch(batch, rewards, batch["text"]), jax.random.key(0))
    trained = value_state.frozen.model(value_state.params)
    for a, b in zip(jax.tree.leaves(state.aux["value"]["params"]), jax.tree.leaves(value_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    want = np.asarray(value_advantages(trained, batch, rewards, batch["text"]))
    np.testing.assert_allclose(batch["advantages"], want, rtol=1e-4, atol=1e-4)
    # on-policy, policy == pretrained: loss = -alpha mean(A) (clamped ratio 1), KL 0
    np.testing.assert_allclose(float(first["loss"]), -100 * batch["advantages"].mean(), rtol=1e-3, atol=1e-3)
    assert float(first["kl"]) < 1e-10 and np.isfinite(float(second["loss"])) and float(second["kl"]) > 0
