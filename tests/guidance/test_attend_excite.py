"""Attend-and-Excite: the loss vs an independent NumPy version, the refinement loop vs a plain
Python loop of the reference's, no-op when every subject is attended, a real update on a tiny
model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdpt.diffusion.samplers import euler_flow
from jdpt.diffusion.schedules import DDPMSchedule, flow_sigmas
from jdpt.guidance.attend_excite import (
    AttendExciteConfig,
    attend_excite_ddim,
    attend_excite_euler,
    attend_excite_loss,
    excite_step,
    unet_maps,
)
from jdpt.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jdpt.world.attend_excite import world_maps
from tests.objectives.fixtures_offline import tiny_world


def _loss_numpy(probs, token_ids, h, w, sigma=0.5):
    """The paper's loss in float64: drop token 0 and the last, x100, softmax, 3x3 smoothing with
    the reference's taps exp(-((x - 1) / (2 sigma))^2) (normalised), reflect pad, max, hinge."""
    taps = np.array([np.exp(-(((x - 1) / (2 * sigma)) ** 2)) for x in range(3)])
    kernel = np.outer(taps, taps) / np.outer(taps, taps).sum()
    out = []
    for b in range(probs.shape[0]):
        text = probs[b, :, 1:-1].astype(np.float64) * 100
        text = np.exp(text - text.max(-1, keepdims=True))
        text /= text.sum(-1, keepdims=True)
        losses = []
        for tok in token_ids[b]:
            m = np.pad(text[:, tok - 1].reshape(h, w), 1, mode="reflect")
            sm = np.array([[np.sum(m[i:i + 3, j:j + 3] * kernel) for j in range(w)] for i in range(h)])
            losses.append(max(0.0, 1.0 - sm.max()))
        out.append(max(losses))
    return np.array(out)


def test_loss_matches_numpy():
    """Random maps [2, 4x5, 7]; tolerance 1e-5 absolute."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(7) * 0.3, size=(2, 20)).astype(np.float32)
    ids = np.array([[2, 4], [1, 5]])
    got = attend_excite_loss(jnp.asarray(probs), jnp.asarray(ids), (4, 5))
    want = _loss_numpy(probs, ids, 4, 5)
    assert want.min() > 0.01  # the case is not trivially zero
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_schedule_is_the_papers_and_scales_with_steps():
    size, excite, thr = AttendExciteConfig().schedule(50)
    np.testing.assert_allclose(size, 20 * np.sqrt(np.linspace(1, 0.5, 50)), rtol=1e-6)
    assert excite.sum() == 25 and excite[:25].all()
    assert {i: float(thr[i]) for i in np.flatnonzero(thr >= 0)} == pytest.approx({0: 0.05, 10: 0.5, 20: 0.8})
    _, excite, thr = AttendExciteConfig().schedule(20)
    assert excite.sum() == 10 and list(np.flatnonzero(thr >= 0)) == [0, 4, 8]


def _attended_probs():
    """[1, 4x4, 5] maps where token 1 owns the left half and token 3 the right half."""
    probs = np.zeros((1, 4, 4, 5), np.float32)
    probs[0, :, :2, 1] = 1.0
    probs[0, :, 2:, 3] = 1.0
    return jnp.asarray(probs.reshape(1, 16, 5))


def test_all_attended_means_zero_loss_and_no_update():
    """Every A_s = 1 (each subject owns a region): L = 0 and excite_step, even at a refinement
    step, returns the latents bit for bit; so does the whole Euler sampler vs ``euler_flow``."""
    probs = _attended_probs()
    ids = jnp.asarray([[1, 3]])
    assert float(attend_excite_loss(probs, ids, (4, 4))[0]) == 0.0

    def maps(z, t):
        return probs + 0.0 * jnp.sum(z) * probs  # depends on z, gradient exactly 0 at the hinge

    z = jax.random.normal(jax.random.key(0), (1, 16, 3))
    new, losses = excite_step(lambda x: attend_excite_loss(maps(x, 0), ids, (4, 4)), z, jnp.float32(20.0),
                              jnp.bool_(True), jnp.float32(0.8))
    np.testing.assert_array_equal(new, z)
    assert float(losses[0]) == 0.0

    def velocity(x, sigma):
        return x * (1 - sigma)

    sigmas = flow_sigmas(4)
    out, losses = attend_excite_euler(maps, velocity, z, sigmas, ids, (4, 4))
    np.testing.assert_array_equal(out, euler_flow(velocity, z, sigmas))
    assert losses.shape == (4, 1) and float(losses.max()) == 0.0


def test_refinement_follows_the_reference_loop():
    """Toy loss L = max(0, 1 - mean(z)) per sample (grad -1/n): the batched while_loop equals the
    reference's per-sample Python loop (update with the loss seen before it, stop once that loss
    is <= 1 - threshold or after max_refinement_steps updates, then one more excite update)."""
    def loss_fn(z):
        return jnp.maximum(0.0, 1.0 - z.mean(axis=(1, 2)))

    z = jnp.asarray(np.array([-2.0, 0.5, 3.0, 0.0]).reshape(4, 1, 1) * np.ones((4, 2, 3)), jnp.float32)
    step, thr, cap = 0.5, 0.8, 3

    def reference(x):
        x = x.copy()
        loss = max(0.0, 1 - x.mean())
        if loss > 1 - thr:
            it = 0
            while loss > 1 - thr:
                it += 1
                loss = max(0.0, 1 - x.mean())
                if loss != 0:
                    x = x + step / x.size
                if it >= cap:
                    break
        if max(0.0, 1 - x.mean()) != 0:
            x = x + step / x.size
        return x

    got, _ = excite_step(loss_fn, z, jnp.float32(step), jnp.bool_(True), jnp.float32(thr), max_refinement_steps=cap)
    want = np.stack([reference(np.asarray(z[i], np.float64)) for i in range(4)])
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.fixture(scope="module")
def world():
    return tiny_world(2)


def test_update_lowers_the_loss_on_a_tiny_world_model(world):
    """One Attend-and-Excite update (with refinement) on the tiny random Flux lowers L for both
    two-object prompts."""
    model = world
    ids = jnp.asarray(model.tokenize(["a red circle and a blue square", "a green triangle and a red circle"]))
    subjects = jnp.asarray([[3, 7], [3, 7]])  # "circle"/"square", "triangle"/"circle" (BOS at 0)
    text_mask = np.asarray(ids) > 2  # the words only (the reference's normalize_eot)
    h, w = model.latent_size
    z = jax.random.normal(jax.random.key(1), (2, h * w // 4, model.config.flux_config().in_channels))

    @jax.jit
    def run(z):
        context, pooled = model.encode_prompts(ids)
        maps = world_maps(model, context, pooled)

        def loss_fn(x):
            return attend_excite_loss(maps(x, jnp.float32(0.8)), subjects, (h // 2, w // 2), text_mask=text_mask)

        new, _ = excite_step(loss_fn, z, jnp.float32(20.0), jnp.bool_(True), jnp.float32(0.8))
        return loss_fn(z), loss_fn(new)

    before, after = run(z)
    assert np.all(np.asarray(before) > 0)
    assert np.all(np.asarray(after) < np.asarray(before)), (before, after)


def test_unet_ddim_wrapper_shapes():
    """The UNet path traces end to end (abstractly): maps at the 4x4 cross-attention level."""
    config = UNet2DConditionConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                   up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                   cross_attention_dim=8, attention_head_dim=2)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0))))
    context = jnp.zeros((2, 6, 8))

    def run(state, z):
        unet = nnx.merge(graphdef, state)
        maps = unet_maps(unet, context, (4, 4))
        assert maps(z, jnp.int32(10)).shape == (2, 16, 6)
        denoise = lambda x, t: unet(x, t, context)  # noqa: E731
        return attend_excite_ddim(maps, denoise, z, DDPMSchedule.stable_diffusion(), 4, jnp.asarray([[1, 2], [2, 3]]),
                                  (4, 4))

    out, losses = jax.eval_shape(run, state, jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.float32))
    assert out.shape == (2, 8, 8, 4) and losses.shape == (4, 2)
