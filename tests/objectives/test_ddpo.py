"""DDPO and DPOK: the surrogates against NumPy, the DDIM log-prob's closed form, the losses against
a plain per-step loop on a toy model, and one online iteration of each on a tiny Shapes world."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdpt.diffusion.pipeline import to_uint8
from jdpt.diffusion.samplers import ddim_step, ddim_step_logprob
from jdpt.diffusion.schedules import DDPMSchedule
from jdpt.models.flux import unpack_latents
from jdpt.models.lora import add_lora
from jdpt.objectives.ddpo import (
    DDPO,
    DPOK,
    clipped_surrogate,
    ddim_rollout,
    dpok_surrogate,
    flow_as_epsilon,
    guided_prediction,
    select_steps,
)
from jdpt.parallel import make_mesh, make_train_step
from jdpt.parallel.step import Frozen
from jdpt.rewards.compressibility import jpeg_compressibility
from jdpt.train.online import make_online_step
from jdpt.world import WorldConfig, WorldModel, empty_prompt
from jdpt.world.adapter import world_velocity

# The smallest Shapes-world model the architecture allows (no pretraining: the smoke tests check
# the plumbing, not learning).
TINY_WORLD = WorldConfig(width=16, heads=2, text_layers=1, double_layers=1, single_layers=0)
PROMPTS = ["a red circle", "two squares", "a blue triangle", "a green square"]


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
    """XLA's optimisation passes dominate compile time on CPU; the numbers checked here do not
    depend on them."""
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


@functools.cache
def _tiny_world_state():
    model = WorldModel(TINY_WORLD, rngs=nnx.Rngs(0))
    add_lora(model, [r"attn\.to_[qv]"], rank=2, rngs=nnx.Rngs(1))
    return nnx.split(model)


def tiny_world() -> WorldModel:
    """A random tiny world model with rank-2 LoRA adapters, built once per session (shared by the
    objectives' tests), its arrays copied per call: ``make_train_step``'s ``init_state`` does not
    copy them on the device they sit on (jax 0.12 ``device_put(may_alias=False)``), so the first
    donating step would delete a shared model's adapters."""
    graphdef, state = _tiny_world_state()
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def world_images(model: WorldModel, x0) -> np.ndarray:
    """Packed latents [B, N, C] -> uint8 images [B, H, W, 3] (host side, for NumPy rewards)."""
    h, w = model.latent_size
    return np.asarray(to_uint8(model.config.codec().decode_latents(unpack_latents(jnp.asarray(x0), h, w))))


def world_cond(model: WorldModel, prompts) -> tuple[dict, dict]:
    ids = model.tokenize(prompts)
    return {"input_ids": ids}, {"input_ids": np.broadcast_to(empty_prompt(ids.shape[1]), ids.shape).copy()}


# ---------------------------------------------------------------- array-level cores vs NumPy


def np_clipped_surrogate(logp, logp_old, adv, clip_range, adv_clip):
    adv = np.clip(adv, -adv_clip, adv_clip)[:, None]
    ratio = np.exp(logp - logp_old)
    loss = np.mean(np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip_range, 1 + clip_range)))
    return loss, np.mean(np.abs(ratio - 1) > clip_range)


def test_clipped_surrogate_matches_numpy():
    rng = np.random.default_rng(0)
    logp_old = rng.normal(size=(6, 5)).astype(np.float32)
    logp = logp_old + rng.normal(scale=0.2, size=(6, 5)).astype(np.float32)
    adv = rng.normal(scale=4, size=6).astype(np.float32)  # some beyond the +-5 clip... and within
    adv[0] = 9.0
    for clip_range in (1e-4, 0.1, 10.0):
        loss, metrics = clipped_surrogate(jnp.asarray(logp), jnp.asarray(logp_old), jnp.asarray(adv), clip_range, 5.0)
        want, clipfrac = np_clipped_surrogate(logp, logp_old, adv, clip_range, 5.0)
        np.testing.assert_allclose(float(loss), want, rtol=1e-5)  # fp32 vs fp64
        np.testing.assert_allclose(float(metrics["clipfrac"]), clipfrac)
        np.testing.assert_allclose(float(metrics["approx_kl"]), 0.5 * np.mean((logp - logp_old) ** 2), rtol=1e-5)


def test_ratio_one_gives_minus_mean_advantage():
    logp = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32)
    adv = jnp.asarray([1.0, -2.0, 7.0, 0.5])
    loss, metrics = clipped_surrogate(logp, logp, adv, 1e-4, 5.0)
    np.testing.assert_allclose(float(loss), -np.mean([1.0, -2.0, 5.0, 0.5]), rtol=1e-6)
    assert float(metrics["clipfrac"]) == 0.0 and float(metrics["ratio"]) == 1.0


def test_dpok_surrogate_matches_numpy_and_clamps_gradient():
    rng = np.random.default_rng(2)
    logp_old = rng.normal(size=(4, 3)).astype(np.float32)
    delta = np.array([[0.0, 1e-5, -1e-5], [0.3, -0.3, 0.0], [2e-5, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    adv = rng.normal(size=4).astype(np.float32)
    loss, _ = dpok_surrogate(jnp.asarray(logp_old + delta), jnp.asarray(logp_old), jnp.asarray(adv), 1e-4, 100.0)
    ratio = np.exp(delta.astype(np.float64))
    want = np.mean(-100.0 * adv[:, None] * np.clip(ratio, 1 - 1e-4, 1 + 1e-4))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    grad = jax.grad(lambda lp: dpok_surrogate(lp, jnp.asarray(logp_old), jnp.asarray(adv), 1e-4, 100.0)[0])(
        jnp.asarray(logp_old + delta))
    outside = np.abs(ratio - 1) > 1e-4  # a plain clamp: no gradient outside the range
    np.testing.assert_array_equal(np.asarray(grad)[outside], 0.0)
    assert np.all(np.asarray(grad)[~outside] != 0)


def test_ddim_logprob_closed_form_for_known_noise():
    schedule = DDPMSchedule.stable_diffusion()
    rng = np.random.default_rng(3)
    x_t = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    pred = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
    eps = rng.normal(size=(2, 4, 3)).astype(np.float32)
    mean, std = ddim_step(pred, x_t, 501, 481, schedule, eta=1.0)
    x_prev = mean + std * eps
    s = float(np.asarray(std).reshape(-1)[0])
    want = np.mean(-(eps.astype(np.float64) ** 2) / 2, axis=(1, 2)) - math.log(s) - 0.5 * math.log(2 * math.pi)
    got = ddim_step_logprob(pred, x_t, x_prev, 501, 481, schedule, 1.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)  # x_prev rounded to fp32 before re-evaluation


def test_flow_as_epsilon_recovers_the_noise():
    """An exact velocity (eps - x0) turned into an epsilon prediction gives eps back."""
    schedule = DDPMSchedule.stable_diffusion()
    rng = np.random.default_rng(4)
    x0 = rng.normal(size=(3, 5, 2)).astype(np.float32)
    eps = rng.normal(size=(3, 5, 2)).astype(np.float32)
    t = np.array([10, 500, 990])
    a = schedule.alphas_cumprod[t].astype(np.float64)[:, None, None]
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    seen = {}

    def velocity(model, x_s, sigma, cond):
        seen["x_s"], seen["sigma"] = x_s, sigma
        return jnp.asarray(eps - x0)

    got = flow_as_epsilon(velocity, schedule)(None, jnp.asarray(x_t, jnp.float32), jnp.asarray(t), None)
    np.testing.assert_allclose(np.asarray(got), eps, atol=1e-5)
    sigma = np.sqrt(1 - a) / (np.sqrt(a) + np.sqrt(1 - a))  # the flow state it was shown is (1-s) x0 + s eps
    np.testing.assert_allclose(np.asarray(seen["x_s"]), (1 - sigma) * x0 + sigma * eps, atol=1e-5)


def test_guided_prediction():
    def denoise(model, x, t, cond):
        return x * cond["s"][:, None]

    x = jnp.ones((2, 3))
    got = guided_prediction(denoise, None, x, jnp.zeros(2), {"s": jnp.asarray([2.0, 3.0])},
                            {"s": jnp.asarray([1.0, 1.0])}, 4.0)
    np.testing.assert_allclose(np.asarray(got), [[1 + 4 * 1.0] * 3, [1 + 4 * 2.0] * 3])
    with pytest.raises(ValueError, match="cfg_scale=4.0 needs the unconditional input"):
        guided_prediction(denoise, None, x, jnp.zeros(2), {"s": jnp.ones(2)}, None, 4.0)


# ---------------------------------------------------------------- losses vs a plain loop (toy model)

SCHEDULE = DDPMSchedule()


def toy_denoise(model, x, t, cond):
    return model(x) * cond["s"][:, None, None]


@functools.cache
def toy_setup():
    model = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    b = 4
    cond = {"s": jnp.linspace(0.5, 1.0, b)}
    noise = jax.random.normal(jax.random.key(0), (b, 5, 3))
    batch, _ = ddim_rollout(toy_denoise, model, cond, noise, jax.random.key(1), schedule=SCHEDULE, num_steps=3)
    batch["advantages"] = jnp.asarray([1.5, -0.5, 7.0, -1.0])
    return graphdef, params, rest, batch


def perturb(params, scale, seed):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def plain_logp(graphdef, rest, params, batch):
    """Per-step log-probs [B, K] by a Python loop over steps (no scan, no remat)."""
    model = nnx.merge(graphdef, params, rest)
    cols = []
    for j in range(batch["logp_old"].shape[1]):
        pred = toy_denoise(model, batch["x_t"][:, j], None, batch["cond"])
        cols.append(ddim_step_logprob(pred, batch["x_t"][:, j], batch["x_next"][:, j], batch["t"][:, j],
                                      batch["t_next"][:, j], SCHEDULE, 1.0))
    return jnp.stack(cols, axis=1)


def test_rollout_logprobs_are_re_evaluated_exactly():
    graphdef, params, rest, batch = toy_setup()
    # rtol 1e-4: the sampler's scan and the eager loop round the fp32 mean differently, and the
    # log-density divides that rounding by a small std (the samplers module's docstring).
    np.testing.assert_allclose(np.asarray(plain_logp(graphdef, rest, params, batch)), np.asarray(batch["logp_old"]),
                               rtol=1e-4, atol=1e-5)
    assert batch["x_t"].shape == (4, 3, 5, 3) and batch["t"].shape == (4, 3)
    np.testing.assert_array_equal(np.asarray(batch["x_t"][:, 1:]), np.asarray(batch["x_next"][:, :-1]))


@pytest.mark.parametrize("clip_range", [1e-4, 1.0])
def test_ddpo_loss_and_gradient_match_plain_loop(clip_range):
    graphdef, params, rest, batch = toy_setup()
    objective = DDPO(toy_denoise, schedule=SCHEDULE, num_steps=3, cfg_scale=1.0, clip_range=clip_range)
    new = perturb(params, 0.05, 1)  # off-policy: some ratios leave the clip range

    def ours(p):
        return objective.loss(p, Frozen(graphdef, rest), batch, jax.random.key(0))[0]

    def plain(p):
        logp = plain_logp(graphdef, rest, p, batch)
        adv = jnp.clip(batch["advantages"], -5, 5)[:, None]
        ratio = jnp.exp(logp - batch["logp_old"])
        return jnp.mean(jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - clip_range, 1 + clip_range)))

    np.testing.assert_allclose(float(ours(new)), float(plain(new)), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 jax.grad(ours)(new), jax.grad(plain)(new))


def test_ddpo_sf_gradient_equals_is_gradient_on_policy():
    graphdef, params, rest, batch = toy_setup()
    frozen = Frozen(graphdef, rest)
    grads = {}
    for estimator in ("is", "sf"):
        objective = DDPO(toy_denoise, schedule=SCHEDULE, num_steps=3, cfg_scale=1.0, estimator=estimator)
        loss, metrics = objective.loss(params, frozen, batch, jax.random.key(0))
        np.testing.assert_allclose(float(loss), -np.mean(np.clip([1.5, -0.5, 7.0, -1.0], -5, 5)), rtol=1e-5)
        grads[estimator] = jax.grad(lambda p: objective.loss(p, frozen, batch, jax.random.key(0))[0])(params)
    # rtol 5e-4: on-policy ratios are 1 only up to the fp32 re-evaluation of logp (~1e-4 here),
    # and the IS gradient is -A r grad logp.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=5e-4, atol=1e-7),
                 grads["is"], grads["sf"])


def test_dpok_kl_term_matches_plain_loop():
    graphdef, params, rest, batch = toy_setup()
    reference = perturb(params, 0.1, 2)
    objective = DPOK(toy_denoise, schedule=SCHEDULE, num_steps=3, cfg_scale=1.0, baseline="batch")
    _, metrics = objective.loss(params, Frozen(graphdef, rest, {"reference": reference}), batch, jax.random.key(0))
    policy, ref = nnx.merge(graphdef, params, rest), nnx.merge(graphdef, reference, rest)
    kl = np.mean([np.mean((np.asarray(toy_denoise(policy, batch["x_t"][:, j], None, batch["cond"]))
                           - np.asarray(toy_denoise(ref, batch["x_t"][:, j], None, batch["cond"]))) ** 2)
                  for j in range(3)])
    np.testing.assert_allclose(float(metrics["kl"]), kl, rtol=1e-5)
    _, same = objective.loss(params, Frozen(graphdef, rest, {"reference": params}), batch, jax.random.key(0))
    assert float(same["kl"]) == 0.0  # policy == pretrained


def test_timestep_fraction_keeps_a_random_subset_per_sample():
    _, _, _, batch = toy_setup()
    sub = select_steps(batch, 2, jax.random.key(3))
    assert sub["t"].shape == (4, 2) and sub["x_t"].shape == (4, 2, 5, 3)
    for row, full in zip(np.asarray(sub["t"]), np.asarray(batch["t"])):
        assert len(set(row)) == 2 and set(row) <= set(full)
    # the transitions stay aligned: each kept (t, x_t, logp_old) is one of the sample's own
    for b in range(4):
        for k in range(2):
            j = int(np.flatnonzero(np.asarray(batch["t"][b]) == int(sub["t"][b, k]))[0])
            np.testing.assert_array_equal(np.asarray(sub["x_t"][b, k]), np.asarray(batch["x_t"][b, j]))
            assert float(sub["logp_old"][b, k]) == float(batch["logp_old"][b, j])


def test_bad_batches_and_settings_are_errors():
    graphdef, params, rest, batch = toy_setup()
    objective = DDPO(toy_denoise, schedule=SCHEDULE, num_steps=3, cfg_scale=1.0)
    frozen = Frozen(graphdef, rest)
    with pytest.raises(ValueError, match=r"lacks \['advantages'\]"):
        objective.loss(params, frozen, {k: v for k, v in batch.items() if k != "advantages"}, jax.random.key(0))
    with pytest.raises(ValueError, match=r"batch\['advantages'\] has shape \(3,\); expected \(4,\)"):
        objective.loss(params, frozen, {**batch, "advantages": jnp.zeros(3)}, jax.random.key(0))
    with pytest.raises(ValueError, match=r"batch\['x_next'\] has shape"):
        objective.loss(params, frozen, {**batch, "x_next": batch["x_next"][:, :2]}, jax.random.key(0))
    with pytest.raises(ValueError, match="cfg_scale=5.0 needs the unconditional input"):
        DDPO(toy_denoise, schedule=SCHEDULE, num_steps=3).loss(params, frozen, batch, jax.random.key(0))
    with pytest.raises(ValueError, match="estimator='ppo'"):
        DDPO(toy_denoise, estimator="ppo")
    with pytest.raises(ValueError, match="eta=0.0"):
        DDPO(toy_denoise, eta=0.0)
    with pytest.raises(ValueError, match="timestep_fraction=0"):
        DPOK(toy_denoise, timestep_fraction=0)
    with pytest.raises(ValueError, match="prediction_type='epsilon'"):
        flow_as_epsilon(world_velocity, DDPMSchedule(prediction_type="v_prediction"))


# ---------------------------------------------------------------- online iterations on the tiny world

WORLD_SCHEDULE = DDPMSchedule.stable_diffusion()
WORLD_EPS = flow_as_epsilon(world_velocity, WORLD_SCHEDULE)
ROLLOUT_STEPS, CFG = 2, 2.0


def online_iteration(objective, seed, group_size=2, with_state=False):
    """One online step's rollout -> JPEG rewards -> on-device advantages
    (``make_online_step(...).prepare``), then 2 updates on those trajectories; returns the
    trajectories (host copy) and both updates' metrics (and the state, its aux as after the
    rollout, with ``with_state``)."""
    model = tiny_world()
    mesh = make_mesh()
    init_state, update = make_train_step(objective, optax.adam(1e-2), mesh, model=model, trainable="lora")
    step = make_online_step(objective, update, reward=jpeg_compressibility,
                            decode=lambda m, frozen, x0: world_velocity.images(m, x0),
                            latent_shape=world_velocity.latent_shape(model), group_size=group_size)
    cond, uncond = world_cond(model, PROMPTS)
    state, batch, key, _ = step.prepare(init_state(model), {"cond": cond, "uncond": uncond,
                                                            "prompt": np.asarray(PROMPTS)}, jax.random.key(seed))
    host = jax.device_get(batch)
    assert host["x_t"].shape[:2] == (4 * group_size, ROLLOUT_STEPS) and np.isfinite(host["logp_old"]).all()
    aux = jax.device_get(state.aux)
    metrics = []
    for i in range(2):
        state, m = update(state, batch, jax.random.fold_in(key, i))
        metrics.append(jax.device_get(m))
    return (host, metrics, state.replace(aux=aux)) if with_state else (host, metrics)


def test_ddpo_online_iteration_on_tiny_world():
    batch, (first, second) = online_iteration(DDPO(WORLD_EPS, num_steps=ROLLOUT_STEPS, cfg_scale=CFG), 0)
    # the first update is on-policy: every ratio is 1 (tolerance: fp32 re-evaluation)
    assert float(first["clipfrac"]) == 0.0 and abs(float(first["ratio"]) - 1) < 1e-5
    np.testing.assert_allclose(float(first["loss"]), -np.clip(batch["advantages"], -5, 5).mean(), atol=1e-4)
    assert np.isfinite(float(second["loss"])) and float(second["approx_kl"]) > 0  # the policy moved


@pytest.mark.slow  # DPOK's KL term is checked on the toy model above; this adds ~15 s of compiles
def test_dpok_online_iteration_on_tiny_world():
    _, (first, second) = online_iteration(DPOK(WORLD_EPS, num_steps=ROLLOUT_STEPS, cfg_scale=CFG, baseline="batch"), 10)
    # policy == pretrained (zero LoRA B) at init; 1e-10 (predictions are O(1)): XLA may fuse the
    # base layer differently when the adapters are the constant zeros of the reference.
    assert float(first["kl"]) < 1e-10
    assert np.isfinite(float(second["loss"])) and float(second["kl"]) > 0
