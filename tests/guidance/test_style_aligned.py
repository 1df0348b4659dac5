"""StyleAligned: shared attention vs a slow NumPy re-implementation of google/style-aligned's
``sa_handler.py``, AdaIN moments, the reference left unchanged, inversion round trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdpt.diffusion.samplers import ddim_sample, euler_flow
from jdpt.diffusion.schedules import DDPMSchedule, flow_sigmas
from jdpt.guidance.style_aligned import (
    StyleAlignedConfig,
    ddim_invert,
    ddim_sample_pinned,
    euler_flow_pinned,
    euler_invert,
    style_aligned_plans,
)
from jdpt.models.attention import (
    AttentionPlan,
    SharedReference,
    TokenGrid,
    _share_reference,
    attention,
    attention_layer_names,
)
from jdpt.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from tests.objectives.fixtures_offline import tiny_world


def _qkv(seed, b=4, t=6, h=2, d=4):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(b, t, h, d)).astype(np.float32) * s + o for s, o in ((1.0, 0.3), (1.5, -0.2), (1.0, 0.0))]


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _sa_handler_numpy(q, k, v, shift, scale):
    """sa_handler.SharedAttentionProcessor on [B, T, H, D] (float64): AdaIN q, k with torch's
    unbiased variance, eps 1e-5; K = [k, scale * k_ref] (no scale on the reference's own copy),
    V = [v, v_ref]; logits of the second half + shift for every row, the reference included."""
    q, k, v = (x.astype(np.float64).transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, T, D]
    b = q.shape[0]
    ref = np.array([0] * (b // 2) + [b // 2] * (b // 2))

    def adain(x):
        mean = x.mean(2, keepdims=True)
        std = np.sqrt(x.var(2, ddof=1, keepdims=True) + 1e-5)
        return (x - mean) / std * std[ref] + mean[ref]

    q, k = adain(q), adain(k)
    k_ref = k[ref] * np.where(np.arange(b) == ref, 1.0, scale)[:, None, None, None]
    kk = np.concatenate([k, k_ref], 2)
    vv = np.concatenate([v, v[ref]], 2)
    logits = np.einsum("bhtd,bhsd->bhts", q, kk) / np.sqrt(q.shape[-1])
    logits[..., q.shape[2]:] += shift
    return np.einsum("bhts,bhsd->bhtd", _softmax(logits), vv).transpose(0, 2, 1, 3)


def test_shared_attention_matches_sa_handler():
    """All image tokens (UNet self-attention), CFG groups: every row equals the NumPy
    sa_handler, the reference rows included (masking their duplicate keys is exact there).
    Tolerance: 1e-5 absolute (fp32 vs float64)."""
    q, k, v = _qkv(0)
    shift, scale = 0.7, 0.8
    plan = AttentionPlan(shared_reference=SharedReference(score_shift=shift, score_scale=scale, groups=2))
    out, probs = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), plan=plan)
    np.testing.assert_allclose(out, _sa_handler_numpy(q, k, v, shift, scale), atol=1e-5)
    assert probs is None


def _joint_numpy(q, k, v, n_text, shift, scale, groups):
    """The joint-sequence rule, one query at a time (float64): AdaIN over image tokens only,
    image queries of non-reference rows also attend to the reference's image keys/values."""
    q, k, v = (x.astype(np.float64).copy() for x in (q, k, v))
    b, t, h, d = q.shape
    n = b // groups
    img = slice(n_text, t)
    for x in (q, k):
        styled = x.copy()
        for row in range(b):
            r = row // n * n
            for head in range(h):
                for c in range(d):
                    a, ref = x[row, img, head, c], x[r, img, head, c]
                    sa, sr = np.sqrt(a.var(ddof=1) + 1e-5), np.sqrt(ref.var(ddof=1) + 1e-5)
                    styled[row, img, head, c] = (a - a.mean()) / sa * sr + ref.mean()
            if row == r:
                styled[row] = x[row]
        x[...] = styled
    out = np.zeros_like(q)
    for row in range(b):
        r = row // n * n
        for head in range(h):
            for i in range(t):
                keys, vals = k[row, :, head], v[row, :, head]
                logits = keys @ q[row, i, head] / np.sqrt(d)
                if row != r and i >= n_text:
                    extra = scale * k[r, img, head] @ q[row, i, head] / np.sqrt(d) + shift
                    logits = np.concatenate([logits, extra])
                    vals = np.concatenate([vals, v[r, img, head]])
                out[row, i, head] = _softmax(logits) @ vals
    return out


@pytest.mark.parametrize("groups", [1, 2])
def test_joint_sequence_shares_image_tokens_only(groups):
    """Flux layout [text (2), image (2x2)]: matches the per-query NumPy rule; the reference rows
    equal plain attention, the other rows' image tokens do not. Tolerance 1e-5."""
    q, k, v = _qkv(1, b=4, t=6)
    grid = TokenGrid(2, 2, image_first=False)
    plan = AttentionPlan(grid=grid, shared_reference=SharedReference(score_shift=0.4, score_scale=1.3, groups=groups))
    out, _ = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), plan=plan)
    np.testing.assert_allclose(out, _joint_numpy(q, k, v, 2, 0.4, 1.3, groups), atol=1e-5)
    plain, _ = attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    refs = np.arange(4) % (4 // groups) == 0
    np.testing.assert_allclose(np.asarray(out)[refs], np.asarray(plain)[refs], atol=1e-6)
    assert not np.allclose(np.asarray(out)[~refs, 2:], np.asarray(plain)[~refs, 2:], atol=1e-3)


def test_adain_moments_match_the_reference():
    """After the transform, each non-reference row's image queries and keys have the reference
    row's per-(head, channel) mean and unbiased std (to 1e-4); values and text tokens untouched."""
    q, k, v = _qkv(2, b=4, t=7)
    plan = AttentionPlan(grid=TokenGrid(5, 1, image_first=True), shared_reference=SharedReference(groups=2))
    q2, k2, v2, _, _ = _share_reference(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None, None, plan, False)
    for before, after in ((q, np.asarray(q2)), (k, np.asarray(k2)[:, :7])):
        img = after[:, :5]
        for row, ref in ((1, 0), (3, 2)):
            np.testing.assert_allclose(img[row].mean(0), img[ref].mean(0), atol=1e-4)
            np.testing.assert_allclose(np.sqrt(img[row].var(0, ddof=1) + 1e-5),
                                       np.sqrt(img[ref].var(0, ddof=1) + 1e-5), atol=1e-4)
        np.testing.assert_array_equal(after[:, 5:], before[:, 5:])
        np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
    np.testing.assert_array_equal(np.asarray(v2)[:, :7], v)
    np.testing.assert_array_equal(np.asarray(k2)[:, 7:], np.asarray(k2)[[0, 0, 2, 2], :5])


def test_plan_errors_name_the_problem():
    q, k, v = (jnp.asarray(x) for x in _qkv(3, b=3))
    with pytest.raises(ValueError, match="groups=2 must divide the batch 3"):
        attention(q, k, v, plan=AttentionPlan(shared_reference=SharedReference(groups=2)))
    with pytest.raises(ValueError, match="T == S"):
        attention(q, k[:, :4], v[:, :4], plan=AttentionPlan(shared_reference=SharedReference(groups=1)))


@pytest.fixture(scope="module")
def world():
    return tiny_world(0)


def test_world_reference_prediction_unchanged(world):
    """Tiny Shapes-world Flux, CFG batch of 2 prompts x [uncond, cond] with shared attention on
    every (joint) layer and shift ln 2: the reference rows' velocities equal the plain model's on
    the reference alone (to 1e-5); the other rows change."""
    model = world
    h, w = model.latent_size
    ids = model.tokenize(["a red circle", "a blue square", "", ""])
    ids = jnp.asarray(ids[[2, 3, 0, 1]])  # [uncond, uncond, cond ref, cond target]
    x = jax.random.normal(jax.random.key(0), (4, h * w // 4, model.config.flux_config().in_channels))
    x = x.at[1].set(x[0]).at[3].set(x[2])
    sigma = jnp.full((4,), 0.6)
    plans = style_aligned_plans(model.transformer, (h, w), groups=2, config=StyleAlignedConfig(score_shift=np.log(2)))
    assert set(plans.layers) == set(attention_layer_names(model.transformer))  # every (joint) layer

    @jax.jit
    def run(x, ids, sigma, plans):
        context, pooled = model.encode_prompts(ids)
        shared = model(x, sigma, context, pooled, plans=plans)
        alone = model(x[::2], sigma[::2], context[::2], pooled[::2])
        return shared, alone

    shared, alone = (np.asarray(a) for a in run(x, ids, sigma, plans))
    np.testing.assert_allclose(shared[::2], alone, atol=1e-5)
    assert np.abs(shared[1::2] - alone).max() > 1e-3


def test_unet_plans_cover_self_attention_only():
    config = UNet2DConditionConfig(block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
                                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                   cross_attention_dim=8, attention_head_dim=2)
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0)))
    plans = style_aligned_plans(unet, (8, 8), groups=2)
    assert plans.layers and all(name.endswith(".self") for name in plans.layers)
    assert all(p.shared_reference.groups == 2 for p in plans.layers.values())


def test_ddim_inversion_round_trip():
    """With an x-independent eps, DDIM inversion then DDIM sampling returns x0 (to 1e-4), and the
    pinned sampler leaves rows 1.. as the plain sampler and ends row 0 at trajectory[N]."""
    schedule = DDPMSchedule.stable_diffusion()
    rng = np.random.default_rng(0)
    pattern = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)

    def eps(x, t):
        return pattern[: x.shape[0]] * jnp.cos(t.astype(jnp.float32) / 300.0)

    x0 = jnp.asarray(rng.normal(size=(1, 4, 4, 2)), jnp.float32) * 0.5
    traj = ddim_invert(eps, x0, schedule, 10)
    assert traj.shape == (11, 1, 4, 4, 2)
    np.testing.assert_array_equal(traj[-1], x0)
    np.testing.assert_allclose(ddim_sample(eps, traj[0], schedule, 10), x0, atol=1e-4)

    noise = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)
    pinned = ddim_sample_pinned(eps, noise, schedule, 10, traj)
    np.testing.assert_array_equal(pinned[0], traj[-1, 0])
    np.testing.assert_allclose(pinned[1:], ddim_sample(eps, noise, schedule, 10)[1:], atol=1e-5)


def test_euler_inversion_round_trip():
    """Same for the flow ODE: Euler inversion then ``euler_flow`` returns x0 (to 1e-5) when the
    velocity does not depend on x; the model's Euler inversion reconstructs approximately."""
    sigmas = flow_sigmas(8, shift=3.0)
    rng = np.random.default_rng(1)
    pattern = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)

    def velocity(x, sigma):
        return pattern[: x.shape[0]] * (1 + sigma**2)

    x0 = jnp.asarray(rng.normal(size=(1, 5, 3)), jnp.float32)
    traj = euler_invert(velocity, x0, sigmas)
    np.testing.assert_allclose(euler_flow(velocity, traj[0], sigmas), x0, atol=1e-5)
    noise = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
    pinned = euler_flow_pinned(velocity, noise, sigmas, traj[:, 0], offset=2)
    np.testing.assert_array_equal(pinned[0], x0[0])
    np.testing.assert_allclose(pinned[1], euler_flow(velocity, noise, sigmas)[1], atol=1e-5)
    with pytest.raises(ValueError, match="trajectory must be"):
        euler_flow_pinned(velocity, noise, sigmas, traj[:4])
