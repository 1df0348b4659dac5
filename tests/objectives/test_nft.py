"""DiffusionNFT: r mapping, implicit velocities, the loss and its gradient against NumPy, the old-policy
update, NaN handling and train steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import optax
from flax import nnx

from jdpt.objectives.nft import NFT, nft_loss, nft_r, nft_velocities, update_old
from jdpt.parallel import make_mesh, make_train_step
from jdpt.world.adapter import world_velocity
from tests.objectives.fixtures_offline import (ToyDenoiser, perturbed, random_latents, tiny_world, toy_denoise,
                                               toy_frozen, toy_numpy, trainable_copy, train_two_steps,
                                               world_cond)


def numpy_r(a, clip=5.0):
    return np.clip((np.clip(a, -clip, clip) / clip) / 2 + 0.5, 0, 1)


def numpy_nft(v_theta, v_old, x_t, x0, t, adv, beta, v_ref=None, kl_beta=1e-4, clip=5.0):
    """NVlabs/DiffusionNFT train_nft_sd3.py's loss in float64; returns (loss, dL/dv_theta without KL)."""
    r = numpy_r(adv, clip)
    s = t[:, None, None]
    n = x0[0].size
    total, grad = 0.0, np.zeros_like(v_theta)
    for v, sign, weight_r in ((beta * v_theta + (1 - beta) * v_old, beta, r),
                              ((1 + beta) * v_old - beta * v_theta, -beta, 1 - r)):
        d = x_t - s * v - x0
        w = np.maximum(np.abs(d).mean(axis=(1, 2)), 1e-5)[:, None, None]
        per = (d**2 / w).mean(axis=(1, 2))
        total = total + weight_r * per
        # d per / d v_theta = sign * (-2 t d / (w n)); the weight is a constant (stop-gradient).
        grad += (clip / (beta * len(t))) * weight_r[:, None, None] * sign * (-2 * s * d / (w * n))
    loss = clip * np.mean(total / beta)
    if v_ref is not None:
        loss += kl_beta * np.mean((v_theta - v_ref) ** 2)
    return loss, grad


def arrays(seed, b=4, n=3, c=5):
    rng = np.random.default_rng(seed)
    v_theta, v_old, v_ref, x0, eps = rng.normal(size=(5, b, n, c))
    t = rng.uniform(0.05, 1.0, size=b)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    return v_theta, v_old, v_ref, x0, x_t, t


def test_r_mapping():
    a = np.array([-7.0, -5.0, -2.5, 0.0, 1.0, 5.0, 9.0])
    np.testing.assert_allclose(nft_r(jnp.asarray(a)), numpy_r(a), atol=1e-7)
    assert np.asarray(nft_r(jnp.asarray([5.0, -5.0]))).tolist() == [1.0, 0.0]
    assert float(nft_r(0.0)) == 0.5


def test_implicit_velocities():
    v_theta, v_old, *_ = arrays(0)
    pos, neg = nft_velocities(jnp.asarray(v_theta), jnp.asarray(v_old), 1.0)
    np.testing.assert_allclose(pos, v_theta, atol=1e-6)  # beta = 1: v+ = v_theta
    np.testing.assert_allclose(neg, 2 * v_old - v_theta, atol=1e-6)  # v- = 2 v_old - v_theta
    pos, neg = nft_velocities(jnp.asarray(v_theta), jnp.asarray(v_old), 0.1)
    np.testing.assert_allclose(pos, 0.1 * v_theta + 0.9 * v_old, atol=1e-6)
    np.testing.assert_allclose(neg, 1.1 * v_old - 0.1 * v_theta, atol=1e-6)
    # v_old is a constant: d v+/d v_old = 0.
    grad = jax.grad(lambda vo: nft_velocities(jnp.asarray(v_theta), vo, 0.5)[0].sum())(jnp.asarray(v_old))
    assert not np.asarray(grad).any()


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_loss_and_gradient_match_numpy(beta):
    v_theta, v_old, v_ref, x0, x_t, t = arrays(1)
    adv = np.array([-6.0, -1.0, 0.5, 3.0])
    f = lambda vt: nft_loss(vt, *map(jnp.asarray, (v_old, x_t, x0, t, adv)), beta=beta,  # noqa: E731
                            v_ref=jnp.asarray(v_ref), kl_beta=0.3)
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(v_theta, jnp.float32))
    want, _ = numpy_nft(v_theta, v_old, x_t, x0, t, adv, beta, v_ref=v_ref, kl_beta=0.3)
    np.testing.assert_allclose(loss, want, rtol=1e-5)  # fp32 vs float64
    np.testing.assert_allclose(metrics["kl"], np.mean((v_theta - v_ref) ** 2), rtol=1e-5)
    _, want_grad = numpy_nft(v_theta, v_old, x_t, x0, t, adv, beta)
    want_grad += 0.3 * 2 * (v_theta - v_ref) / v_theta.size
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)


def test_gradient_at_old_policy_is_proportional_to_one_minus_two_r():
    _, v_old, _, x0, x_t, t = arrays(2)
    adv = np.array([-5.0, -2.0, 0.0, 4.0])
    r = numpy_r(adv)
    grad = jax.grad(lambda vt: nft_loss(vt, *map(jnp.asarray, (v_old, x_t, x0, t, adv)), v_ref=None)[0])(
        jnp.asarray(v_old, jnp.float32))
    # With v_theta = v_old, v+ = v- and both terms share g = d l / d v: grad = 5 (2r - 1) g / B.
    s = t[:, None, None]
    d = x_t - s * v_old - x0
    w = np.abs(d).mean(axis=(1, 2))[:, None, None]
    g = -2 * s * d / (w * x0[0].size)
    want = 5.0 * (2 * r - 1)[:, None, None] * g / len(t)
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-8)
    assert not np.asarray(grad[2]).any()  # A = 0: r = 1/2, exactly zero
    # Per sample, grad / g is the constant -5 (1 - 2r) / B: proportional to (1 - 2r).
    for i in (0, 1, 3):
        np.testing.assert_allclose(np.asarray(grad[i]) / g[i], -5.0 * (1 - 2 * r[i]) / len(t), rtol=1e-4)


def test_update_old_matches_numpy():
    rng = np.random.default_rng(3)
    old = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    params = {"a": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=4).astype(np.float32)}
    for step, d in ((0, 0.0), (100, 0.1), (400, 0.4), (2000, 0.5)):
        got = update_old(old, params, step)
        for k in old:
            np.testing.assert_allclose(got[k], d * old[k] + (1 - d) * params[k], rtol=1e-6, atol=1e-7)
    # Works on nnx states as the objective stores them.
    state = nnx.state(ToyDenoiser(3), nnx.Param)
    got = update_old(state, jax.tree.map(jnp.zeros_like, state), 200)
    np.testing.assert_allclose(got["lin"]["kernel"][...], 0.2 * state["lin"]["kernel"][...], rtol=1e-6)


def test_objective_matches_numpy():
    model = ToyDenoiser(5, seed=4)
    params, _ = toy_frozen(model)
    old, reference = perturbed(params, 5, 0.05), perturbed(params, 6, 0.2)
    params, frozen = toy_frozen(model, extra={"reference": reference})
    frozen = frozen.replace(aux={"old": old})
    rng = np.random.default_rng(7)
    batch = {"x0": rng.normal(size=(4, 3, 5)).astype(np.float32),
             "cond": {"c": rng.normal(size=(4, 5)).astype(np.float32)},
             "advantage": np.array([-3.0, 0.0, 1.0, 8.0], np.float32)}
    objective = NFT(denoise=toy_denoise, kl_beta=0.5, timesteps=(0.25, 0.5, 0.75))
    key = jax.random.key(3)
    loss, metrics = jax.jit(objective.loss)(params, frozen, batch, key)
    key_t, key_eps = jax.random.split(key)  # the documented draws: t, then fresh noise
    t = np.asarray(objective.sample_t(key_t, 4), np.float64)
    assert set(t.tolist()) <= {0.25, 0.5, 0.75}
    eps = np.asarray(jax.random.normal(key_eps, (4, 3, 5)), np.float64)
    x0 = batch["x0"].astype(np.float64)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps

    def forward(state):
        m = ToyDenoiser(5)
        nnx.update(m, state)
        return toy_numpy(m)(x_t, t, batch["cond"]["c"])

    want, _ = numpy_nft(forward(params), forward(old), x_t, x0, t, batch["advantage"], 1.0,
                        v_ref=forward(reference), kl_beta=0.5)
    np.testing.assert_allclose(loss, want, rtol=1e-5)  # fp32 forwards
    np.testing.assert_allclose(metrics["r"], numpy_r(batch["advantage"]).mean(), rtol=1e-6)
    assert float(metrics["nonfinite_advantages"]) == 0


def test_nan_advantages_and_missing_pieces():
    params, frozen = toy_frozen(ToyDenoiser(5), extra=None)
    frozen = frozen.replace(aux={"old": params})
    rng = np.random.default_rng(0)
    batch = {"x0": rng.normal(size=(2, 3, 5)).astype(np.float32), "cond": {"c": np.zeros((2, 5), np.float32)},
             "advantage": np.array([0.5, np.nan], np.float32)}
    objective = NFT(denoise=toy_denoise, kl_beta=0.0, timesteps="uniform")
    with pytest.raises(ValueError, match=r"advantage has 1 non-finite value\(s\) at rows \[1\]"):
        objective.loss(params, frozen, batch, jax.random.key(0))
    # Under jit it cannot raise: the loss is NaN and the metric counts the bad rows.
    loss, metrics = jax.jit(objective.loss)(params, frozen, batch, jax.random.key(0))
    assert np.isnan(loss) and float(metrics["nonfinite_advantages"]) == 1
    good = {**batch, "advantage": np.array([0.5, 1.0], np.float32)}
    with pytest.raises(ValueError, match=r"advantage has shape \(3,\); expected \(2,\)"):
        objective.loss(params, frozen, {**good, "advantage": np.zeros(3, np.float32)}, jax.random.key(0))
    with pytest.raises(ValueError, match="NFT needs the old policy in the train state"):
        objective.loss(params, frozen.replace(aux=None), good, jax.random.key(0))
    with pytest.raises(ValueError, match="needs a reference model"):  # KL on, full params, no reference
        NFT(denoise=toy_denoise).loss(params, frozen, good, jax.random.key(0))
    with pytest.raises(ValueError, match="beta > 0"):
        NFT(toy_denoise, beta=0.0)


# Full fine-tuning with a reference copy: one more ~10 s compile, so outside the default suite (the
# toy-model tests above cover extra["reference"]). The old policy is the train state's aux.
@pytest.mark.parametrize("trainable", ["lora", pytest.param("all", marks=pytest.mark.slow)])
def test_train_step_on_world(trainable):
    model = tiny_world(lora=trainable == "lora")
    batch = {"x0": random_latents(0, 2, model), "cond": world_cond(model, 2),
             "advantage": np.array([1.5, -0.7], np.float32)}
    extra = {"reference": trainable_copy(model, "all")} if trainable == "all" else None
    first, second = train_two_steps(NFT(world_velocity), model, batch, trainable=trainable, extra=extra)
    assert np.isfinite(first["loss"]) and np.isfinite(second["loss"]) and first["loss"] != second["loss"]
    # Step 1: policy == reference (zero adapters / the copy; separate XLA fusions may leave ~1e-14).
    assert float(first["kl"]) <= 1e-10 < 1e-8 < float(second["kl"])


def test_old_policy_lives_in_the_train_state():
    """init_aux copies the trainable params; each update moves the old policy by update_old with
    the step count (step 0: old = the updated params)."""
    model = tiny_world(lora=True)
    objective = NFT(world_velocity)
    mesh = make_mesh(devices=jax.devices()[:1])
    init, step = make_train_step(objective, optax.adam(1e-2), mesh, model=model, trainable="lora")
    state = init(model)
    start = jax.device_get(state.params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.aux["old"]), jax.tree.leaves(start)))
    batch = {"x0": random_latents(0, 2, model), "cond": world_cond(model, 2),
             "advantage": np.array([1.5, -0.7], np.float32)}
    olds = [start]
    for i in range(3):
        state, _ = step(state, batch, jax.random.key(i))
        want = update_old(olds[-1], jax.device_get(state.params), i)
        got = jax.device_get(state.aux["old"])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        olds.append(got)
    assert not np.array_equal(jax.tree.leaves(olds[1])[0], jax.tree.leaves(olds[3])[0])


def test_online_batch_repeats_samples_over_the_training_sigmas():
    """advantages(): group advantages per prompt id, every sample once per training sigma."""
    objective = NFT(toy_denoise, num_steps=10, shift=3.0)
    sigmas = objective.train_sigmas()
    assert len(sigmas) == 9 and np.allclose(sigmas, objective.sigmas()[:9])
    x0 = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    batch = {"x0": x0, "cond": {"c": np.arange(4, dtype=np.float32)[:, None]}}
    rewards, ids = np.array([1.0, 0.0, 2.0, 2.0], np.float32), np.array([7, 7, 3, 3], np.int32)
    _, rows, _ = jax.jit(objective.advantages)(None, batch, rewards, ids)
    assert rows["x0"].shape == (36, 3, 2) and rows["t"].shape == (36,) and rows["advantage"].shape == (36,)
    np.testing.assert_array_equal(rows["x0"][9:18], np.repeat(x0[1:2], 9, axis=0))
    np.testing.assert_allclose(rows["t"][:9], sigmas)
    adv = (rewards - np.array([0.5, 0.5, 2.0, 2.0])) / (rewards.std() + 1e-4)
    np.testing.assert_allclose(rows["advantage"], np.repeat(adv, 9), rtol=1e-5)
