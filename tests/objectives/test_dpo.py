"""Diffusion-DPO: the loss against NumPy (paper and diffusers forms), its spec properties, a train step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdpt.diffusion.schedules import DDPMSchedule
from jdpt.objectives.dpo import DPO, dpo_logits, dpo_loss
from jdpt.objectives.sft import ForwardProcess
from jdpt.world.adapter import world_velocity
from tests.objectives.fixtures_offline import (ToyDenoiser, perturbed, random_latents, tiny_world, toy_denoise,
                                               toy_frozen, toy_numpy, trainable_copy, train_two_steps,
                                               world_cond)
from tests.objectives.test_sft import numpy_noise_and_target


def numpy_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def numpy_dpo_paper(mse_w, mse_l, ref_w, ref_l, beta):
    """SalesforceAIResearch/DiffusionDPO train.py: -mean log sigmoid(-0.5 beta (d_model - d_ref))."""
    return -np.mean(numpy_log_sigmoid(-0.5 * beta * ((mse_w - mse_l) - (ref_w - ref_l))))


def numpy_dpo_diffusers(mse_w, mse_l, ref_w, ref_l, beta_d):
    """diffusers train_diffusion_dpo.py: -mean log sigmoid(beta_d (d_ref - d_model))."""
    return -np.mean(numpy_log_sigmoid(beta_d * ((ref_w - ref_l) - (mse_w - mse_l))))


def errors(seed, n=16, scale=1e-3):
    rng = np.random.default_rng(seed)
    return [1.0 + scale * rng.normal(size=n) for _ in range(4)]  # MSEs ~1 differing by ~1e-3


def test_loss_matches_paper_and_diffusers_forms():
    e = errors(0)
    got = dpo_loss(*map(jnp.asarray, e), beta=5000.0)
    np.testing.assert_allclose(got, numpy_dpo_paper(*e, 5000.0), rtol=1e-5)  # fp32 vs float64
    np.testing.assert_allclose(got, numpy_dpo_diffusers(*e, 2500.0), rtol=1e-5)
    assert abs(float(got) - math.log(2)) > 0.05  # the inputs are far from the trivial point


def test_policy_equal_reference_gives_log2():
    w, l_, _, _ = map(jnp.asarray, errors(1))
    assert float(dpo_loss(w, l_, w, l_)) == pytest.approx(math.log(2), abs=3e-7)  # 2 fp32 ulps


def test_lowering_only_the_winner_error_lowers_the_loss():
    w, l_, rw, rl = map(jnp.asarray, errors(2))
    base = float(dpo_loss(w, l_, rw, rl))
    losses = [float(dpo_loss(w - delta, l_, rw, rl)) for delta in (1e-4, 5e-4, 2e-3)]
    assert base > losses[0] > losses[1] > losses[2]
    grad = jax.grad(lambda e: dpo_loss(e, l_, rw, rl))(w)
    assert (np.asarray(grad) > 0).all()  # every pair: a smaller winner error is better
    # The margin rises by 0.5 * beta * delta.
    np.testing.assert_allclose(dpo_logits(w - 1e-3, l_, rw, rl, 5000.0) - dpo_logits(w, l_, rw, rl, 5000.0),
                               2.5, rtol=1e-3)


def pair_batch(seed, b=3, n=4, c=5, same=False):
    rng = np.random.default_rng(seed)
    x_w = rng.normal(size=(b, n, c)).astype(np.float32)
    x_l = x_w.copy() if same else rng.normal(size=(b, n, c)).astype(np.float32)
    return {"x0_w": x_w, "x0_l": x_l, "cond": {"c": rng.normal(size=(b, c)).astype(np.float32)}}


PROCESSES = {"flow": ForwardProcess(), "epsilon": ForwardProcess.ddpm(DDPMSchedule())}


@pytest.mark.parametrize("name", list(PROCESSES))
def test_objective_matches_numpy(name):
    process = PROCESSES[name]
    model = ToyDenoiser(5, seed=3)
    params, _ = toy_frozen(model)
    reference = perturbed(params, seed=4)
    params, frozen = toy_frozen(model, extra={"reference": reference})
    batch, key = pair_batch(5), jax.random.key(11)
    objective = DPO(denoise=toy_denoise, process=process, beta=50.0)
    loss, metrics = jax.jit(objective.loss)(params, frozen, batch, key)

    # Independent: one t and one eps per pair (the documented split of key), float64 forwards.
    key_t, key_eps = jax.random.split(key)
    t = np.asarray(process.sample_t(key_t, 3))
    eps = np.asarray(jax.random.normal(key_eps, (3, 4, 5)), np.float64)
    ref_model = ToyDenoiser(5)
    nnx.update(ref_model, reference)

    def mses(forward, x0):
        x_t, target = numpy_noise_and_target(process.prediction, x0.astype(np.float64), eps, t)
        return ((forward(x_t, t, batch["cond"]["c"]) - target) ** 2).mean(axis=(1, 2))

    policy, ref = toy_numpy(model), toy_numpy(ref_model)
    e = [mses(policy, batch["x0_w"]), mses(policy, batch["x0_l"]), mses(ref, batch["x0_w"]), mses(ref, batch["x0_l"])]
    np.testing.assert_allclose(loss, numpy_dpo_paper(*e, 50.0), rtol=1e-4)  # fp32 forwards, beta 50
    margin = -0.5 * 50.0 * ((e[0] - e[1]) - (e[2] - e[3]))
    np.testing.assert_allclose(metrics["margin"], margin.mean(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(margin > 0), rtol=1e-6)
    for name_, value in zip(("mse_w", "mse_l", "ref_mse_w", "ref_mse_l"), e):
        np.testing.assert_allclose(metrics[name_], value.mean(), rtol=1e-5)


@pytest.mark.parametrize("name", list(PROCESSES))
def test_identical_pair_gives_log2_and_zero_gradient(name):
    # x_w == x_l with the same t and noise: policy and reference differences are both 0.
    objective = DPO(denoise=toy_denoise, process=PROCESSES[name])
    params, _ = toy_frozen(ToyDenoiser(5, seed=6))
    params, frozen = toy_frozen(ToyDenoiser(5, seed=6), extra={"reference": perturbed(params, seed=7)})
    grad_fn = jax.jit(jax.grad(lambda p, b: objective.loss(p, frozen, b, jax.random.key(0))[0]))
    same = pair_batch(8, same=True)
    loss, metrics = jax.jit(objective.loss)(params, frozen, same, jax.random.key(0))
    # Equal errors up to the fp32 rounding of fused row reductions (~1e-7), which beta / 2 = 2500
    # amplifies; different t or noise for the two images would give a margin of order beta.
    np.testing.assert_allclose(metrics["mse_w"], metrics["mse_l"], rtol=1e-6)
    np.testing.assert_allclose(metrics["ref_mse_w"], metrics["ref_mse_l"], rtol=1e-6)
    assert float(loss) == pytest.approx(math.log(2), abs=2e-3)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_fn(params, pair_batch(8))))
    assert scale > 1e-3  # a distinct pair has a gradient
    # Identical rows give identical errors; only summation-order rounding may remain.
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_fn(params, same))) <= 1e-5 * scale


def test_policy_equal_reference_model_gives_log2():
    params, frozen = toy_frozen(ToyDenoiser(5, seed=9))
    frozen = frozen.replace(extra={"reference": jax.tree.map(jnp.copy, params)})
    loss, metrics = DPO(denoise=toy_denoise).loss(params, frozen, pair_batch(10), jax.random.key(1))
    assert float(loss) == pytest.approx(math.log(2), abs=3e-7)  # 2 fp32 ulps
    assert float(metrics["margin"]) == 0.0


def test_bad_batches():
    params, frozen = toy_frozen(ToyDenoiser(5))
    frozen = frozen.replace(extra={"reference": params})
    batch = pair_batch(0)
    objective = DPO(denoise=toy_denoise)
    with pytest.raises(ValueError, match=r"x0_w has shape \(3, 4, 5\) but x0_l has \(2, 4, 5\)"):
        objective.loss(params, frozen, {**batch, "x0_l": batch["x0_l"][:2]}, jax.random.key(0))
    with pytest.raises(ValueError, match="cond has an array of shape"):
        objective.loss(params, frozen, {**batch, "cond": {"c": batch["cond"]["c"][:2]}}, jax.random.key(0))
    _, no_reference = toy_frozen(ToyDenoiser(5))
    with pytest.raises(ValueError, match="needs a reference model"):
        objective.loss(params, no_reference, batch, jax.random.key(0))


# Full fine-tuning with a reference copy: one more ~10 s compile, so outside the default suite (the
# toy-model tests above cover the extra["reference"] path by default).
@pytest.mark.parametrize("trainable", ["lora", pytest.param("all", marks=pytest.mark.slow)])
def test_train_step_on_world(trainable):
    model = tiny_world(lora=trainable == "lora")
    batch = {"x0_w": random_latents(0, 2, model), "x0_l": random_latents(1, 2, model), "cond": world_cond(model, 2)}
    extra = {"reference": trainable_copy(model, "all")} if trainable == "all" else None
    first, second = train_two_steps(DPO(world_velocity), model, batch, trainable=trainable, extra=extra)
    # Step 1: policy == reference (zero adapters / the copy): equal MSEs up to the fp32 rounding
    # of separately fused forwards, and L = log 2 up to that rounding times beta / 2 = 2500.
    np.testing.assert_allclose([first["mse_w"], first["mse_l"]], [first["ref_mse_w"], first["ref_mse_l"]],
                               rtol=1e-6)
    assert float(first["loss"]) == pytest.approx(math.log(2), abs=2e-3)
    assert np.isfinite(second["loss"]) and second["loss"] != first["loss"]
    assert np.isfinite(first["grad_norm"]) and first["grad_norm"] > 0
