"""Guidance combine (CFG / CFG-Zero* / PAG / SEG): the Pallas kernel (interpret mode on CPU) and
the plain-JAX reference run the same cases against an independent float64 NumPy version of the
papers' formulas written here.

Tolerances: fp32 outputs rtol 1e-5, atol 1e-5 (outputs are O(10); the kernel sums in a different
order and uses the one-pass variance for rescale). bf16 outputs rtol 2^-7 (one bf16 ulp: the fp32
result is rounded to 8 significant bits, and a last-bit difference in fp32 may flip the rounding),
atol 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdpt.guidance import CFG, PAG, SEG, CFGZeroStar, SoftPAG
from jdpt.kernels.guidance import guidance_combine, guidance_combine_reference

IMPLS = ("xla", "pallas")


def _predictions(k, shape, dtype, seed=0):
    """``[K, B, ...]``: uncond-like noise, then correlated cond / perturbed branches with a
    non-zero mean (so s* is not ~0 and rescale sees a mean)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    out = [base] + [0.8 * base + 0.4 * rng.standard_normal(shape) + 0.1 * (i + 1) for i in range(k - 1)]
    return jnp.asarray(np.stack(out), dtype)


def _numpy_combine(p, rule, w=None, s=None, step=None, zero_steps=1, rescale=0.0):
    """float64 NumPy of the papers' combination rules; p: ``[K, B, ...]``."""
    p = np.asarray(p, np.float64)
    axes = tuple(range(1, p.ndim - 1))
    if rule == "cfg":
        u, c = p
        g = u + w * (c - u)
    elif rule == "cfg_zero_star":
        u, c = p
        s_star = (c * u).sum(axis=axes, keepdims=True) / ((u * u).sum(axis=axes, keepdims=True) + 1e-8)
        g = s_star * u + w * (c - s_star * u)
    elif w is None:  # pag / seg alone: [cond, perturbed]
        c, e_p = p
        g = c + s * (c - e_p)
    else:
        u, c, e_p = p
        g = u + w * (c - u) + s * (c - e_p)
    if rescale:
        g = rescale * g * c.std(axis=axes, keepdims=True) / g.std(axis=axes, keepdims=True) + (1 - rescale) * g
    if rule == "cfg_zero_star" and step < zero_steps:
        g = np.zeros_like(g)
    return g


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2.0**-7, atol=1e-5)


# (rule, K, per-branch shape [B, ...] with N not a multiple of the block unless noted, dtype,
#  weights, block, pass as a list of K arrays)
CASES = [
    pytest.param("cfg", 2, (2, 5, 7, 3), jnp.float32, dict(w=7.5), 32, False, id="cfg-fp32-N105"),
    pytest.param("cfg", 2, (2, 9, 16), jnp.bfloat16, dict(w=4.5, rescale=0.7), 64, True,
                 id="cfg-rescale-bf16-list"),
    pytest.param("cfg_zero_star", 2, (3, 33, 4), jnp.float32, dict(w=4.0, step=2, zero_steps=1), 16, False,
                 id="zero_star-fp32-N132"),
    pytest.param("cfg_zero_star", 2, (2, 6, 6, 4), jnp.bfloat16, dict(w=5.0, step=3, zero_steps=2, rescale=0.5),
                 None, False, id="zero_star-rescale-bf16"),
    pytest.param("pag", 3, (2, 7, 11), jnp.float32, dict(w=7.5, s=3.0), 16, True, id="pag-cfg-fp32-list"),
    pytest.param("pag", 2, (2, 50, 3), jnp.bfloat16, dict(s=3.0), 64, False, id="pag-alone-bf16"),
    pytest.param("seg", 3, (2, 4, 4, 4), jnp.float32, dict(w=5.0, s=3.0, rescale=0.3), 16, False,
                 id="seg-cfg-rescale-fp32-N64-multiple"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rule, k, shape, dtype, weights, block, as_list", CASES)
def test_matches_numpy(impl, rule, k, shape, dtype, weights, block, as_list):
    p = _predictions(k, shape, dtype)
    arg = list(p) if as_list else p
    kw = dict(block=block) if impl == "pallas" else {}
    out = jax.jit(lambda x: guidance_combine(x, rule, impl=impl, **weights, **kw))(arg)  # one compile
    assert out.shape == shape and out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), _numpy_combine(p, rule, **weights), **_tol(dtype))


def test_reference_is_the_guidance_objects_rule():
    """impl="xla" is exactly the ``jdpt.guidance`` objects' combine (same ops, fp32 out)."""
    p = _predictions(3, (2, 6, 5), jnp.float32, seed=1)
    flat2, flat3 = p[:2].reshape(4, 6, 5), p.reshape(6, 6, 5)
    step, t = jnp.int32(3), jnp.float32(700.0)
    ref = {}
    for name, obj, flat, rule, kw in [
        ("cfg", CFG(scale=6.0, rescale=0.7), flat2, "cfg", dict(w=6.0, rescale=0.7)),
        ("zero*", CFGZeroStar(scale=4.0, zero_steps=2), flat2, "cfg_zero_star", dict(w=4.0, step=step, zero_steps=2)),
        ("pag", PAG(scale=3.0, cfg_scale=7.5, adaptive_scale=0.001), flat3, "pag",
         dict(w=7.5, s=jnp.maximum(0.0, 3.0 - 0.001 * (1000.0 - t)))),
        ("pag-alone", PAG(scale=2.0, use_cfg=False), p[1:].reshape(4, 6, 5), "pag", dict(s=2.0)),
        ("seg", SEG(scale=3.0, cfg_scale=5.0), flat3, "seg", dict(w=5.0, s=3.0)),
    ]:
        expected = obj.combine(flat, step=step, timestep=t)
        k = flat.shape[0] // 2
        ref[name] = guidance_combine_reference(flat.reshape(k, 2, 6, 5), rule, out_dtype=jnp.float32, **kw)
        np.testing.assert_array_equal(np.asarray(ref[name]), np.asarray(expected), err_msg=name)


def test_objects_route_through_the_kernel_under_jit():
    """combine_impl="pallas" on every guidance object == the default plain-JAX combine (rtol 1e-5),
    with traced scales and step."""
    p = _predictions(3, (2, 6, 5), jnp.bfloat16, seed=2)
    flat2, flat3 = p[:2].reshape(4, 6, 5), p.reshape(6, 6, 5)
    objects = (CFG(scale=6.0, rescale=0.7), CFGZeroStar(scale=4.0, zero_steps=1), PAG(scale=3.0, adaptive_scale=0.002),
               SEG(scale=3.0, use_cfg=False), SoftPAG(head_weights={}, scale=2.5))
    flats = (flat2, flat2, flat3, p[1:].reshape(4, 6, 5), flat3)
    combine = jax.jit(lambda objs, step: [o.combine(x, step=step, timestep=jnp.float32(500.0))
                                          for o, x in zip(objs, flats)])  # one compile per impl
    for step in (0, 4):
        want = combine(objects, jnp.int32(step))
        got = combine(tuple(o.replace(combine_impl="pallas") for o in objects), jnp.int32(step))
        for obj, g, w in zip(objects, got, want):
            assert g.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{type(obj).__name__} step {step}")


def test_pallas_gradient_matches_xla():
    """The kernel's custom VJP (the reference's VJP) vs differentiating the plain-JAX path:
    gradients w.r.t. the predictions, w and rescale of CFG-Zero* with rescale, fp32, rtol 1e-5."""
    p = _predictions(2, (2, 5, 9), jnp.float32, seed=4)
    weight = jnp.asarray(np.random.default_rng(5).standard_normal((2, 5, 9)), jnp.float32)

    def grads(impl):
        def loss(p, w, phi):
            out = guidance_combine(p, "cfg_zero_star", w=w, step=3, rescale=phi, impl=impl)
            return jnp.sum(out * weight)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(p, 4.0, 0.5)

    pallas = grads("pallas")
    for got, want in zip(pallas, grads("xla")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(pallas[0])).max() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_properties(impl):
    """s = 0 is CFG; v_c = v_u gives s* = 1 so the output is v_c for any w; zero-init zeroes
    exactly, and only while step < zero_steps (traced step)."""
    p = _predictions(3, (2, 3, 10), jnp.float32, seed=3)
    same = jnp.stack([p[1], p[1]])
    pag_s0, cfg_out, equal = jax.jit(lambda p, same: (
        guidance_combine(p, "pag", w=7.5, s=0.0, impl=impl),
        guidance_combine(p[:2], "cfg", w=7.5, impl=impl),
        guidance_combine(same, "cfg_zero_star", w=3.7, step=5, impl=impl)))(p, same)
    np.testing.assert_allclose(pag_s0, cfg_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(equal, p[1], rtol=1e-5, atol=1e-5)

    zero_star = jax.jit(lambda x, step: guidance_combine(x, "cfg_zero_star", w=4.0, step=step, zero_steps=2,
                                                         impl=impl))
    for step in (0, 1):
        np.testing.assert_array_equal(zero_star(p[:2], jnp.int32(step)), np.zeros((2, 3, 10), np.float32))
    assert np.all(np.abs(np.asarray(zero_star(p[:2], jnp.int32(2)))) > 0)


def _mismatched():
    p = _predictions(2, (2, 4, 3), jnp.float32)
    return [p[0], p[1, :, :2]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("make, rule, kwargs, match", [
    (_mismatched, "cfg", dict(w=7.5), "must share shape and dtype"),
    (lambda: _predictions(3, (2, 4, 3), jnp.float32), "cfg", dict(w=7.5), "expects K=2"),
    (lambda: _predictions(2, (2, 4, 3), jnp.float32), "pag", dict(w=7.5, s=3.0),
     r"expects K=3 .*\[uncond, cond, perturbed\]"),
    (lambda: _predictions(3, (2, 4, 3), jnp.float32), "seg", dict(s=3.0), r"expects K=2 .*\[cond, perturbed\]"),
    (lambda: _predictions(2, (2, 4, 3), jnp.float32), "cfg_zero_star", dict(w=7.5), "needs the step index"),
    (lambda: _predictions(2, (2, 4, 3), jnp.float32), "cfg", dict(w=7.5, step=0), "step only applies"),
    (lambda: _predictions(2, (2, 4, 3), jnp.float32), "cfg", {}, "needs the CFG scale"),
    (lambda: _predictions(2, (2, 4, 3), jnp.float32), "pag", {}, "needs the perturbation scale"),
    (lambda: _predictions(2, (2, 4, 3), jnp.float32), "apg", dict(w=7.5), "unknown guidance rule"),
    (lambda: _predictions(2, (2, 4, 3), jnp.float32), "cfg", dict(w=jnp.ones(2)), "w must be a scalar"),
    (lambda: _predictions(2, (2,), jnp.float32), "cfg", dict(w=7.5), "at least 3 dims"),
], ids=["mismatched-list", "cfg-K3", "pag-K2", "seg-alone-K3", "no-step", "step-not-zero-star", "no-w",
        "no-s", "unknown-rule", "vector-w", "no-feature-dim"])
def test_bad_input(impl, make, rule, kwargs, match):
    with pytest.raises(ValueError, match=match):
        guidance_combine(make(), rule, impl=impl, **kwargs)


def test_bad_input_other():
    p = _predictions(2, (2, 4, 3), jnp.float32)
    with pytest.raises(ValueError, match="must share shape and dtype"):
        guidance_combine([p[0], p[1].astype(jnp.bfloat16)], "cfg", w=2.0, impl="pallas")
    with pytest.raises(ValueError, match="floating point"):
        guidance_combine(p.astype(jnp.int32), "cfg", w=2.0, impl="pallas")
    with pytest.raises(ValueError, match="power of two"):
        guidance_combine(p, "cfg", w=2.0, impl="pallas", block=48)
    with pytest.raises(ValueError, match="unknown guidance_combine impl"):
        guidance_combine(p, "cfg", w=2.0, impl="triton")
    with pytest.raises(ValueError, match="takes branches"):
        CFG(branches=("cond", "uncond"), combine_impl="pallas").combine(p.reshape(4, 4, 3), step=0, timestep=0.0)
