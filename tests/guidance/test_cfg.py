"""CFG and CFG-Zero* combinations: the spec's unit properties against NumPy re-implementations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdpt.diffusion.branches import split_branches, stack_branches, step_index
from jdpt.diffusion.samplers import euler_flow
from jdpt.guidance.cfg import CFG, CFGZeroStar, cfg, cfg_zero_star, cfg_zero_star_scale

RNG = np.random.default_rng(0)
SHAPE = (3, 4, 5, 2)


def _pair():
    return RNG.normal(size=SHAPE).astype(np.float32), RNG.normal(size=SHAPE).astype(np.float32)


def _np_scale(v_c, v_u):
    """s* = <v_c, v_u> / (||v_u||^2 + 1e-8) per sample, in float64."""
    c, u = v_c.reshape(len(v_c), -1).astype(np.float64), v_u.reshape(len(v_u), -1).astype(np.float64)
    return (c * u).sum(1) / ((u * u).sum(1) + 1e-8)


def test_cfg_endpoints_and_formula():
    """w = 0 -> e_u, w = 1 -> e_c exactly; w = 7.5 equals e_u + w (e_c - e_u) (rtol 1e-6)."""
    e_u, e_c = _pair()
    np.testing.assert_array_equal(cfg(e_u, e_c, 0.0), e_u)
    np.testing.assert_allclose(cfg(e_u, e_c, 1.0), e_c, rtol=0, atol=1e-6)
    np.testing.assert_allclose(cfg(e_u, e_c, 7.5), e_u + 7.5 * (e_c - e_u), rtol=1e-6, atol=1e-5)


def test_cfg_rescale_matches_numpy():
    """Lin et al. rescale: phi * g * std(e_c)/std(g) + (1 - phi) * g, per sample (tol 1e-5)."""
    e_u, e_c = _pair()
    g = e_u + 5.0 * (e_c - e_u)
    std = lambda x: x.reshape(len(x), -1).std(1)[:, None, None, None]  # noqa: E731
    ref = 0.7 * g * std(e_c) / std(g) + 0.3 * g
    np.testing.assert_allclose(cfg(e_u, e_c, 5.0, rescale=0.7), ref, rtol=1e-5, atol=1e-5)


def test_zero_star_scale_properties():
    v_c, v_u = _pair()
    s = np.asarray(cfg_zero_star_scale(v_c, v_u))
    assert s.shape == (SHAPE[0],) and s.dtype == np.float32
    np.testing.assert_allclose(s, _np_scale(v_c, v_u), rtol=1e-5)
    # v_c = v_u => s* = 1 (up to the 1e-8 regulariser)
    np.testing.assert_allclose(cfg_zero_star_scale(v_u, v_u), 1.0, rtol=1e-6)
    # s*(k v_c, v_u) = k s*
    np.testing.assert_allclose(cfg_zero_star_scale(-2.5 * v_c, v_u), -2.5 * s, rtol=1e-5)
    # the residual v_c - s* v_u is orthogonal to v_u (relative to ||v_c|| ||v_u||)
    resid = (v_c - s[:, None, None, None] * v_u).reshape(len(v_c), -1)
    flat_u = v_u.reshape(len(v_u), -1)
    cos = (resid * flat_u).sum(1) / (np.linalg.norm(v_c.reshape(len(v_c), -1), axis=1) * np.linalg.norm(flat_u, axis=1))
    assert np.abs(cos).max() < 1e-5


def test_zero_star_scale_is_fp32_for_bf16_inputs():
    """bf16 predictions: the reductions run in fp32 (within bf16 rounding of the inputs, 1e-5)."""
    v_c, v_u = (jnp.asarray(x, jnp.bfloat16) for x in _pair())
    s = cfg_zero_star_scale(v_c, v_u)
    assert s.dtype == jnp.float32
    ref = _np_scale(np.asarray(v_c, np.float32), np.asarray(v_u, np.float32))
    np.testing.assert_allclose(s, ref, rtol=1e-5)


@pytest.mark.parametrize("w", [0.0, 1.0, 4.0, 7.5])
def test_zero_star_identical_branches_give_cond(w):
    """v_c = v_u => s* = 1 and the output is v_c for any w (tol 1e-5)."""
    v, _ = _pair()
    np.testing.assert_allclose(cfg_zero_star(v, v, w, step=3, zero_steps=1), v, rtol=1e-5, atol=1e-5)


def test_zero_star_formula_w1_and_zero_init():
    v_u, v_c = _pair()
    s = _np_scale(v_c, v_u)[:, None, None, None]
    ref = s * v_u + 4.0 * (v_c - s * v_u)
    np.testing.assert_allclose(cfg_zero_star(v_u, v_c, 4.0, step=2, zero_steps=2), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cfg_zero_star(v_u, v_c, 1.0, step=5), v_c, rtol=1e-5, atol=1e-5)  # w = 1
    for step in (0, 1):  # zeroed while step < zero_steps
        np.testing.assert_array_equal(cfg_zero_star(v_u, v_c, 4.0, step=step, zero_steps=2), 0.0)
    assert np.abs(np.asarray(cfg_zero_star(v_u, v_c, 4.0, step=0, zero_steps=0))).max() > 0.1  # 0: off


def test_zero_init_euler_step_leaves_latent_unchanged():
    """CFGZeroStar driving euler_flow over [uncond, cond] predictions of a toy velocity model:
    the first step (zero-init) keeps x, the second moves it, as the plain formula says."""
    guidance = CFGZeroStar(scale=3.0, zero_steps=1)
    sigmas = jnp.asarray([1.0, 0.7, 0.4], jnp.float32)
    shift = jnp.asarray(RNG.normal(size=(2, 4)), jnp.float32)

    def denoise(x, sigma):
        stacked = jnp.concatenate([x * sigma, x * sigma + shift])  # [uncond, cond]
        return guidance.combine(stacked, step=step_index(sigmas[:-1], sigma), timestep=sigma * 1000)

    x0 = jnp.asarray(RNG.normal(size=(2, 4)), jnp.float32)
    traj = euler_flow(denoise, x0, sigmas, return_trajectory=True)
    np.testing.assert_array_equal(traj.samples[1], x0)
    x1 = np.asarray(x0)
    v_u, v_c = x1 * 0.7, x1 * 0.7 + np.asarray(shift)
    s = _np_scale(v_c, v_u)[:, None]
    expected = x1 + (0.4 - 0.7) * (s * v_u + 3.0 * (v_c - s * v_u))
    np.testing.assert_allclose(traj.samples[2], expected, rtol=1e-5, atol=1e-5)


def test_guidance_objects_combine_and_branches():
    e_u, e_c = _pair()
    stacked = jnp.concatenate([e_u, e_c])
    np.testing.assert_allclose(CFG(scale=2.0).combine(stacked, step=0, timestep=500.0), cfg(e_u, e_c, 2.0))
    np.testing.assert_allclose(CFGZeroStar(scale=2.0, zero_steps=0).combine(stacked, step=0, timestep=500.0),
                               cfg_zero_star(e_u, e_c, 2.0, 0, 0))
    assert CFG().branches == ("uncond", "cond") and CFG().plans(None, 1, (1, 1)) is None
    out = jax.jit(lambda g, p: g.combine(p, step=jnp.int32(1), timestep=0.0))(CFGZeroStar(scale=2.0), stacked)
    np.testing.assert_allclose(out, cfg_zero_star(e_u, e_c, 2.0, 1), rtol=1e-6)  # a pytree through jit


def test_branch_helpers_and_errors():
    pos, neg = jnp.ones((2, 3)), jnp.zeros((2, 3))
    stacked = stack_branches(("uncond", "cond", "perturbed"), pos, neg)
    np.testing.assert_array_equal(stacked[:, 0], [0, 0, 1, 1, 1, 1])
    assert set(split_branches(stacked, ("uncond", "cond", "perturbed"))) == {"uncond", "cond", "perturbed"}
    assert int(step_index(jnp.asarray([999, 500, 10]), 500)) == 1
    with pytest.raises(ValueError, match="needs the negative"):
        stack_branches(("uncond", "cond"), pos, None)
    with pytest.raises(ValueError, match="non-empty tuple over"):
        stack_branches(("cond", "other"), pos, neg)
    with pytest.raises(ValueError, match="not a multiple of the 3 branches"):
        split_branches(jnp.ones((4, 2)), ("uncond", "cond", "perturbed"))
    with pytest.raises(ValueError, match="same shape"):
        cfg(jnp.ones((2, 3)), jnp.ones((2, 4)), 1.0)
