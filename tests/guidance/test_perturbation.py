"""PAG / SoftPAG / SEG: combination rules, the attention plans they build, and HeadHunter's search.

Attention-level properties run on every registered implementation (``available_implementations``:
``"xla"`` always, ``"pallas"`` once ``jdpt.kernels`` registers it) against a NumPy attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jdpt.guidance.cfg import cfg
from jdpt.guidance.head_search import HeadSearchConfig, head_hunter, weights_for
from jdpt.guidance.perturbation import (PAG, SEG, SoftPAG, adaptive_scale, attention_layers, pag, pag_plans,
                                        perturbed_rows)
from jdpt.models.attention import AttentionPlan, TokenGrid, attention, available_implementations, blur_matrix
from jdpt.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from jdpt.models.unet_blocks import Attention

IMPLS = available_implementations()
RNG = np.random.default_rng(0)
ATOL = 1e-5  # fp32 attention vs float64 NumPy


def _np_attention(q, k, v, keep=None):
    """q [B, T, H, D], k/v [B, S, H, D]; keep [B, T, S] bool or None. float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(q.shape[-1])
    if keep is not None:
        logits = np.where(keep[:, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", p, v)


def _qkv(b=3, t=10, h=2, d=8):
    return tuple(RNG.normal(size=(b, t, h, d)).astype(np.float32) for _ in range(3))


# --- combinations ---------------------------------------------------------------------------

def test_pag_scale_zero_is_cfg_and_formula():
    e_u, e_c, e_p = (RNG.normal(size=(2, 4, 4, 3)).astype(np.float32) for _ in range(3))
    np.testing.assert_allclose(pag(e_c, e_p, 0.0, e_u=e_u, w=7.5), cfg(e_u, e_c, 7.5), rtol=1e-6, atol=1e-6)
    ref = e_u + 7.5 * (e_c - e_u) + 3.0 * (e_c - e_p)
    np.testing.assert_allclose(pag(e_c, e_p, 3.0, e_u=e_u, w=7.5), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pag(e_c, e_p, 3.0), e_c + 3.0 * (e_c - e_p), rtol=1e-6, atol=1e-6)
    # ADM form e_p + 4 (e_c - e_p) == diffusers s = 3
    np.testing.assert_allclose(pag(e_c, e_p, 3.0), e_p + 4.0 * (e_c - e_p), rtol=1e-5, atol=1e-5)


def test_adaptive_scale():
    """max(0, s - s_ad (1000 - t)) (diffusers _get_pag_scale)."""
    t = np.array([1000.0, 990.0, 801.0, 0.0])
    np.testing.assert_allclose(adaptive_scale(3.0, 0.01, t), np.maximum(0, 3.0 - 0.01 * (1000 - t)), rtol=1e-6)
    np.testing.assert_allclose(adaptive_scale(3.0, 0.0, t), 3.0)


def test_guidance_objects_combine():
    e_u, e_c, e_p = (RNG.normal(size=(2, 3)).astype(np.float32) for _ in range(3))
    stacked = np.concatenate([e_u, e_c, e_p])
    ref = e_u + 5.0 * (e_c - e_u) + 2.0 * (e_c - e_p)
    for g in (PAG(scale=2.0, cfg_scale=5.0), SEG(scale=2.0, cfg_scale=5.0),
              SoftPAG({}, scale=2.0, cfg_scale=5.0)):
        assert g.branches == ("uncond", "cond", "perturbed")
        np.testing.assert_allclose(g.combine(stacked, step=0, timestep=500.0), ref, rtol=1e-5, atol=1e-5)
    g = PAG(scale=2.0, adaptive_scale=0.005, use_cfg=False)
    assert g.branches == ("cond", "perturbed")
    s = max(0.0, 2.0 - 0.005 * (1000 - 801))
    np.testing.assert_allclose(g.combine(np.concatenate([e_c, e_p]), step=3, timestep=801.0),
                               e_c + s * (e_c - e_p), rtol=1e-5, atol=1e-5)


# --- attention plans, every implementation --------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_softpag_u1_is_value_and_u0_is_attention(impl):
    q, k, v = _qkv()
    out1, _ = attention(q, k, v, plan=AttentionPlan(head_weight=jnp.ones(2), impl=impl))
    np.testing.assert_allclose(out1, v, atol=ATOL)
    out0, _ = attention(q, k, v, plan=AttentionPlan(head_weight=jnp.zeros(2), impl=impl))
    np.testing.assert_allclose(out0, _np_attention(q, k, v), atol=ATOL)
    u = np.array([[0.0, 1.0], [0.3, 0.0], [1.0, 1.0]], np.float32)  # per-row, per-head
    out, _ = attention(q, k, v, plan=AttentionPlan(head_weight=jnp.asarray(u), impl=impl))
    ref = (1 - u[:, None, :, None]) * _np_attention(q, k, v) + u[:, None, :, None] * v
    np.testing.assert_allclose(out, ref, atol=ATOL)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("image_first", [True, False])
def test_infinite_blur_gives_identical_outputs_at_every_image_query(impl, image_first):
    """sigma > 9999: every image query is the spatial mean, so every image token of a perturbed
    row has the same output; other rows and the text queries are untouched (atol 1e-5)."""
    q, k, v = _qkv(t=14)
    grid = TokenGrid(3, 4, image_first=image_first)
    rows = np.array([False, True, True])
    plan = AttentionPlan(query_blur=1e7, grid=grid, perturbed_rows=jnp.asarray(rows), impl=impl)
    out = np.asarray(attention(q, k, v, plan=plan)[0])
    image = slice(0, 12) if image_first else slice(2, 14)
    text = slice(12, 14) if image_first else slice(0, 2)
    for r in (1, 2):
        np.testing.assert_allclose(out[r, image], np.broadcast_to(out[r, image][:1], out[r, image].shape), atol=ATOL)
        assert np.abs(out[r, image][0] - out[0, image][0]).max() > 1e-3
    q_mean = q.copy()
    q_mean[:, image] = q[:, image].mean(axis=1, keepdims=True)
    ref = _np_attention(np.where(rows[:, None, None, None], q_mean, q), k, v)
    np.testing.assert_allclose(out, ref, atol=ATOL)
    np.testing.assert_allclose(out[:, text], _np_attention(q, k, v)[:, text], atol=ATOL)


def _np_blur(x, sigma):
    """SEG reference blur of x [h, w, C] (square grid): kernel ceil(6 sigma)+1 made odd, clamped
    to the side, reflect padding, explicit 2-D convolution in float64."""
    side = x.shape[0]
    size = math.ceil(6 * sigma) + 1 - math.ceil(6 * sigma) % 2
    size = min(size, side - (side % 2 - 1))
    half = (size - 1) / 2
    taps = np.exp(-0.5 * (np.linspace(-half, half, size) / sigma) ** 2)
    kern = np.outer(taps, taps) / taps.sum() ** 2
    pad = size // 2
    xp = np.pad(x.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    out = np.zeros(x.shape, np.float64)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[i, j] = np.einsum("ab,abc->c", kern, xp[i:i + size, j:j + size])
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sigma", [0.6, 1.0, 3.0])
def test_finite_blur_matches_numpy_reference(impl, sigma):
    """SEG with sigma 0.6 / 1 / 3 (kernel 5 / 7 / clamped to 7) on a 6x6 grid: the queries are
    blurred exactly as the reference's gaussian_blur_2d (atol 1e-5 on the attention output)."""
    b, side, h, d = 2, 6, 2, 4
    q, k, v = _qkv(b=b, t=side * side, h=h, d=d)
    plan = AttentionPlan(query_blur=sigma, grid=TokenGrid(side, side), impl=impl)
    out = attention(q, k, v, plan=plan)[0]
    q_blur = np.stack([_np_blur(q[i].reshape(side, side, h * d), sigma).reshape(side * side, h, d)
                       for i in range(b)])
    np.testing.assert_allclose(out, _np_attention(q_blur, k, v), atol=ATOL)


def test_blur_matrix_rows_sum_to_one_and_reflect():
    m = blur_matrix(5, 1.0, 5)
    np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-12)
    x = RNG.normal(size=5)
    taps = np.exp(-0.5 * np.linspace(-2, 2, 5) ** 2)
    taps /= taps.sum()
    np.testing.assert_allclose(m @ x, np.convolve(np.pad(x, 2, mode="reflect"), taps[::-1], mode="valid"),
                               rtol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("image_first", [True, False])
def test_joint_identity_image_token_sees_own_key_and_text(impl, image_first):
    """MMDiT PAG (PAGCFGJointAttnProcessor2_0): a perturbed image token's output is the softmax
    over {its own key, the text keys}; text tokens and unperturbed rows are plain attention."""
    n_img, n_txt = 6, 3
    q, k, v = _qkv(t=n_img + n_txt)
    rows = np.array([True, False, True])
    plan = AttentionPlan(joint_identity=True, grid=TokenGrid(2, 3, image_first=image_first),
                         perturbed_rows=jnp.asarray(rows), impl=impl)
    out = np.asarray(attention(q, k, v, plan=plan)[0])
    image = np.arange(n_img) + (0 if image_first else n_txt)
    text = np.setdiff1d(np.arange(n_img + n_txt), image)
    plain = _np_attention(q, k, v)
    for r in range(3):
        if not rows[r]:
            np.testing.assert_allclose(out[r], plain[r], atol=ATOL)
            continue
        np.testing.assert_allclose(out[r, text], plain[r, text], atol=ATOL)
        for i in image:  # explicit softmax over the allowed keys only
            keys = np.concatenate([[i], text])
            ref = _np_attention(q[r:r + 1, i:i + 1], k[r:r + 1, keys], v[r:r + 1, keys])[0, 0]
            np.testing.assert_allclose(out[r, i], ref, atol=ATOL)


def test_plan_errors_are_clear():
    q, k, v = _qkv(t=6)
    with pytest.raises(ValueError, match="need the plan's grid=TokenGrid"):
        attention(q, k, v, plan=AttentionPlan(query_blur=1.0))
    with pytest.raises(ValueError, match="has 9 image tokens but the attention sequence has only 6"):
        attention(q, k, v, plan=AttentionPlan(query_blur=1.0, grid=TokenGrid(3, 3)))
    with pytest.raises(ValueError, match=r"perturbed_rows must be \[B\] = \[3\]"):
        attention(q, k, v, plan=AttentionPlan(query_blur=1.0, grid=TokenGrid(2, 3), perturbed_rows=jnp.ones(2)))
    with pytest.raises(ValueError, match="needs self-attention over the joint sequence"):
        attention(q, k[:, :4], v[:, :4], plan=AttentionPlan(joint_identity=True, grid=TokenGrid(2, 2)))
    with pytest.raises(ValueError, match="must be > 0"):
        attention(q, k, v, plan=AttentionPlan(query_blur=0.0, grid=TokenGrid(2, 3)))


def test_identity_attention_module_outputs_to_out_of_to_v():
    """u = 1 in a UNet attention module: output == to_out(to_v(x)) (PAG's definition; atol 1e-5)."""
    layer = Attention(16, 4, 16, "test.self", rngs=nnx.Rngs(0), param_dtype=jnp.float32)
    x = jnp.asarray(RNG.normal(size=(2, 9, 16)), jnp.float32)
    out = layer(x, plans=AttentionPlan(head_weight=jnp.ones(4)))
    np.testing.assert_allclose(out, layer.to_out[0](layer.to_v(x)), atol=ATOL)


# --- plans built for a model ----------------------------------------------------------------

UNET = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8, attention_head_dim=2)


def _abstract_unet():
    return nnx.eval_shape(lambda: UNet2DConditionModel(UNet2DConditionConfig(**UNET), rngs=nnx.Rngs(0)))


def test_layer_grids_and_pag_plans_on_unet():
    model = _abstract_unet()
    info = attention_layers(model, (8, 12))
    assert info["down.0.attn.0.self"].grid == TokenGrid(8, 12)
    assert info["mid.attn.0.self"].grid == TokenGrid(4, 6)
    assert info["up.1.attn.1.self"].grid == TokenGrid(8, 12)
    rows = perturbed_rows(("uncond", "cond", "perturbed"), 2)
    np.testing.assert_array_equal(rows, [0, 0, 0, 0, 1, 1])
    plans = PAG().plans(model, 2, (8, 12))
    assert list(plans.layers) == ["mid.attn.0.self"]
    np.testing.assert_array_equal(plans.layers["mid.attn.0.self"].head_weight, np.repeat(rows[:, None], 2, 1))
    # SoftPAG with u = 1 on every head of the layer is exactly the PAG plan
    soft = SoftPAG({"mid.attn.0.self": np.ones(2)}).plans(model, 2, (8, 12))
    np.testing.assert_array_equal(soft.layers["mid.attn.0.self"].head_weight,
                                  plans.layers["mid.attn.0.self"].head_weight)
    seg_plan = SEG(sigma=2.0, layers=r"down\..*").plans(model, 2, (8, 12)).layers
    assert list(seg_plan) == ["down.0.attn.0.self"]  # cross-attention is never perturbed
    assert seg_plan["down.0.attn.0.self"].grid == TokenGrid(8, 12)
    with pytest.raises(ValueError, match="matches no self-attention layer"):
        PAG(layers=r"nope").plans(model, 2, (8, 12))
    with pytest.raises(ValueError, match=r"head_weights\['mid.attn.0.self'\] must be \[H\] = \[2\]"):
        pag_plans(model, rows, (8, 12), head_weights={"mid.attn.0.self": np.ones(3)})
    with pytest.raises(ValueError, match="needs a 'perturbed' branch"):
        perturbed_rows(("uncond", "cond"), 2)


# --- HeadHunter -----------------------------------------------------------------------------

def test_head_hunter_greedy_on_a_toy_reward():
    """Additive toy reward: head values plus a penalty for more than 2 heads. Greedy picks the
    two best heads, in order, then stops (a third head would lower the reward)."""
    heads = {"a": 3, "b": 2}
    value = {("a", 0): 0.1, ("a", 1): -0.5, ("a", 2): 0.7, ("b", 0): 0.4, ("b", 1): 0.05}
    calls = []

    def reward(weights):
        calls.append(weights)
        chosen = [(layer, h) for layer, u in weights.items() for h in np.flatnonzero(u)]
        return sum(value[c] for c in chosen) - 1.0 * max(0, len(chosen) - 2)

    result = head_hunter(reward, heads, HeadSearchConfig(max_heads=4, budget=100))
    assert result.selected == [("a", 2), ("b", 0)]
    np.testing.assert_allclose(result.rewards, [0.0, 0.7, 1.1])
    assert result.evaluations == len(calls) == 1 + 5 + 4 + 3
    w = result.head_weights()
    np.testing.assert_array_equal(w["a"], [0, 0, 1])
    np.testing.assert_array_equal(w["b"], [1, 0])
    # a budget of 4 evaluations: the empty set, then 3 candidates of round 1 -> best among them
    small = head_hunter(reward, heads, HeadSearchConfig(budget=4))
    assert small.evaluations == 4 and small.selected == [("a", 2)]
    with pytest.raises(ValueError, match="is not a head"):
        weights_for([("a", 3)], heads)
    with pytest.raises(ValueError, match="must be finite"):
        head_hunter(lambda w: float("nan") if w else 0.0, heads)


# --- a guidance object drives a pipeline ----------------------------------------------------

@pytest.mark.slow  # three compiles of the sampling loop: ~35 s of CPU
def test_flux_pipeline_with_pag_scale_zero_equals_true_cfg():
    """flux_generate(guidance=PAG(scale=0)) runs one forward over [uncond, cond, perturbed] with
    the joint identity plan on transformer_blocks.0 and must reproduce true_cfg_scale's images
    (max 1 uint8 level: fp32 summation order differs); with scale 3 the images change."""
    from jdpt.diffusion.pipeline import flux_generate
    from jdpt.models.flux import FluxConfig, FluxTransformer
    from jdpt.models.pixels import PixelCodec

    cfg_model = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                     joint_attention_dim=8, pooled_projection_dim=4, axes_dims_rope=(2, 2, 4))
    model = FluxTransformer(FluxConfig(**cfg_model), rngs=nnx.Rngs(0))
    codec = PixelCodec(factor=1, channels=4)
    prompt, neg = (RNG.normal(size=(1, 3, 8)).astype(np.float32) for _ in range(2))
    pooled, neg_pooled = (RNG.normal(size=(1, 4)).astype(np.float32) for _ in range(2))
    kw = dict(key=jax.random.key(0), height=8, width=8, num_inference_steps=2,
              negative_prompt_embeds=neg, negative_pooled_prompt_embeds=neg_pooled)
    ref = np.asarray(flux_generate(model, codec, prompt, pooled, true_cfg_scale=2.5, **kw)).astype(int)
    layers = r"transformer_blocks\.0\.attn"
    ours = np.asarray(flux_generate(model, codec, prompt, pooled,
                                    guidance=PAG(scale=0.0, cfg_scale=2.5, layers=layers), **kw)).astype(int)
    assert np.abs(ours - ref).max() <= 1
    pagged = np.asarray(flux_generate(model, codec, prompt, pooled,
                                      guidance=PAG(scale=3.0, cfg_scale=2.5, layers=layers), **kw)).astype(int)
    assert np.abs(pagged - ref).max() > 1
