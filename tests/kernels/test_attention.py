"""Perturbed flash attention (Pallas, interpret mode on CPU) vs its plain-JAX reference and vs
``jax.nn.dot_product_attention`` with the perturbation written as a mask (independent oracle:
``u = 1`` <=> mask = eye; joint PAG <=> mask = text columns | eye on image rows).

Tolerances: fp32 outputs 2e-5 absolute (outputs are O(1)); fp32 gradients 1e-4 relative to the
gradient's max; bf16 outputs 3e-2 absolute (bf16 has 8 mantissa bits; the kernel and the oracle
round probabilities to bf16 in different blocks).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdpt.kernels.attention import pallas_attention, perturbed_attention, perturbed_attention_reference
from jdpt.models.attention import AttentionPlan, attention, available_implementations
from jdpt.models.attention_xla import xla_attention


def _qkv(shape, dtype=jnp.float32, seed=0, kv_len=None):
    """Standard-normal q [B, T, H, D] and k, v [B, S, H, D] (NumPy: no per-shape compiles)."""
    b, t, h, d = shape
    rng = np.random.default_rng(seed)
    s = t if kv_len is None else kv_len
    return tuple(jnp.asarray(rng.standard_normal(x, np.float32), dtype)
                 for x in ((b, t, h, d), (b, s, h, d), (b, s, h, d)))


def _oracle(q, k, v, u=None, text=None, is_causal=False):
    """(1 - u) * attention + u * (attention under the perturbation mask), via jax.nn."""
    dpa = jax.nn.dot_product_attention
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    out = dpa(*f32, is_causal=is_causal, implementation="xla")
    if u is None:
        return out
    t = q.shape[1]
    is_text = np.zeros(t, bool)
    if text is not None:
        is_text[text[0]:text[0] + text[1]] = True
    allowed = is_text[None, :] | np.eye(t, dtype=bool)
    if is_causal:
        allowed &= np.tril(np.ones((t, t), bool))
    pert = dpa(*f32, mask=jnp.asarray(allowed), implementation="xla")
    u = jnp.broadcast_to(jnp.asarray(u, jnp.float32), (q.shape[0], q.shape[2]))
    u_row = jnp.where(jnp.asarray(is_text)[None, :, None], 0.0, u[:, None, :])[..., None]
    return (1 - u_row) * out + u_row * pert


U_MIXED = jnp.array([[0.0, 0.3, 1.0], [1.0, 0.7, 0.0]])
slow = pytest.mark.slow

FORWARD_CASES = [
    # (shape [B, T, H, D], dtype, u, text, causal, blocks); interpret-mode compiles are slow on
    # CPU, so the default run keeps joint SD3 order ([image, text]) here; bf16 / D = 128 run by
    # default in test_registered_implementation_matches_xla, and the gradient cases also check
    # the forward output (fp32, identity and Flux order).
    pytest.param((2, 40, 3, 128), jnp.bfloat16, U_MIXED, None, False, (16, 16),
                 id="identity-bf16-D128", marks=slow),
    pytest.param((2, 37, 3, 64), jnp.float32, U_MIXED, (29, 8), False, (16, 16), id="joint-sd3-fp32"),
    pytest.param((2, 40, 3, 64), jnp.float32, U_MIXED, None, False, (16, 16), id="identity-fp32",
                 marks=slow),
    pytest.param((1, 50, 2, 128), jnp.float32, None, None, True, (16, 32), id="plain-causal-D128",
                 marks=slow),
    pytest.param((2, 37, 3, 64), jnp.bfloat16, U_MIXED, (29, 8), False, (32, 32),
                 id="joint-sd3-bf16", marks=slow),
    pytest.param((2, 37, 3, 64), jnp.float32, U_MIXED, (0, 8), True, (16, 16),
                 id="joint-flux-causal", marks=slow),
]


@pytest.mark.parametrize("shape, dtype, u, text, causal, blocks", FORWARD_CASES)
def test_forward_matches_reference_and_oracle(shape, dtype, u, text, causal, blocks):
    q, k, v = _qkv(shape, dtype)
    bq, bk = blocks
    out = perturbed_attention(q, k, v, u, text=text, is_causal=causal, block_q=bq, block_k=bk)
    ref = jax.jit(lambda q, k, v, u: perturbed_attention_reference(
        q, k, v, u, text=text, is_causal=causal))(q, k, v, u)
    oracle = jax.jit(lambda q, k, v, u: _oracle(q, k, v, u, text, causal))(q, k, v, u)
    assert out.shape == q.shape and out.dtype == dtype
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(oracle), atol=tol)
    np.testing.assert_allclose(np.asarray(ref, np.float32), np.asarray(oracle), atol=tol)


def test_cross_attention_and_lse():
    """T != S (no perturbation) and the returned log-sum-exp, vs jax.nn and a dense logsumexp."""
    q, k, v = _qkv((2, 20, 2, 64), kv_len=45)
    out, lse = perturbed_attention(q, k, v, return_lse=True, block_q=16, block_k=16)
    np.testing.assert_allclose(out, _oracle(q, k, v), atol=2e-5)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / 8.0
    np.testing.assert_allclose(lse, jax.nn.logsumexp(logits, axis=-1), atol=2e-5)


def test_long_sequence_and_pag_heads_skip_the_key_loop():
    """S = 1024 with the default 128 blocks (the one long case: interpret mode is slow).

    The u == 1 head never reads its keys: NaN keys there leave out == v exactly (the dense
    reference would be NaN); the u = 0.4 head matches the oracle.
    """
    q, k, v = _qkv((1, 1024, 2, 64), seed=3)
    u = jnp.array([0.4, 1.0])
    out = perturbed_attention(q, k.at[:, :, 1].set(jnp.nan), v, u)
    np.testing.assert_array_equal(out[:, :, 1], v[:, :, 1])
    np.testing.assert_allclose(out[:, :, 0], _oracle(q, k, v, u)[:, :, 0], atol=2e-5)


GRAD_CASES = [
    # (shape, u, text, causal)
    pytest.param((2, 40, 3, 64), U_MIXED, None, False, id="identity-mixed-u"),
    pytest.param((1, 37, 3, 64), U_MIXED[:1], (0, 8), True, id="joint-flux-causal"),
    pytest.param((2, 37, 3, 64), U_MIXED, (29, 8), False, id="joint-sd3", marks=slow),
    pytest.param((1, 40, 2, 64), None, None, True, id="plain-causal", marks=slow),
]


@pytest.mark.parametrize("shape, u, text, causal", GRAD_CASES)
def test_output_and_gradients_match_reference(shape, u, text, causal):
    """Output (vs the jax.nn oracle) and dq, dk, dv, du of a loss on the output *and* the lse
    (vs jax.grad of the dense reference). The lse term exercises d lse / d logits = softmax."""
    q, k, v = _qkv(shape, seed=2)
    w = jnp.asarray(np.random.default_rng(9).standard_normal(shape, np.float32))

    def loss(fn, q, k, v, u):
        out, lse = fn(q, k, v, u, text=text, is_causal=causal, return_lse=True)
        return jnp.sum(out * w) + jnp.sum(jnp.sin(lse)), out

    kern = lambda *a, **kw: perturbed_attention(*a, **kw, block_q=16, block_k=16)  # noqa: E731
    argnums = (0, 1, 2) if u is None else (0, 1, 2, 3)
    # jit the whole gradient: eager backward passes compile every small op separately.
    got, out = jax.jit(jax.grad(lambda *a: loss(kern, *a), argnums, has_aux=True))(q, k, v, u)
    want, _ = jax.jit(jax.grad(lambda *a: loss(perturbed_attention_reference, *a), argnums,
                               has_aux=True))(q, k, v, u)
    np.testing.assert_allclose(out, _oracle(q, k, v, u, text, causal), atol=2e-5)
    for name, g, r in zip("qkvu", got, want):
        scale = float(jnp.abs(r).max())
        assert scale > 0, name
        np.testing.assert_allclose(g, r, atol=1e-4 * scale, err_msg=f"d{name}")


def test_registered_implementation_matches_xla():
    """attention(plan=AttentionPlan(impl="pallas")) under jit, bf16, D = 128, u of shape [H],
    default blocks (one block with padding) vs xla_attention and the jax.nn oracle."""
    assert "pallas" in available_implementations()
    q, k, v = _qkv((2, 40, 3, 128), jnp.bfloat16, seed=5)
    u = U_MIXED[0]  # [H], broadcast over the batch

    @jax.jit
    def run(q, k, v, u):
        return attention(q, k, v, plan=AttentionPlan(head_weight=u, impl="pallas"))

    out, probs = run(q, k, v, u)
    assert probs is None and out.dtype == jnp.bfloat16
    ref = jax.jit(lambda q, k, v, u: xla_attention(q, k, v, head_weight=u)[0])(q, k, v, u)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=3e-2)
    np.testing.assert_allclose(np.asarray(out, np.float32), _oracle(q, k, v, u), atol=3e-2)


@pytest.mark.parametrize("kwargs", [
    {"bias": jnp.zeros((1, 1, 8, 8))},
    {"mask": jnp.ones((8, 8), bool)},
    {"return_probs": True},
    {"query_blur": 2.0},  # a plan feature this kernel does not know
])
def test_unsupported_features_raise(kwargs):
    q, k, v = _qkv((1, 8, 1, 16))
    with pytest.raises(NotImplementedError, match="impl='xla'"):
        pallas_attention(q, k, v, **kwargs)


def test_bad_arguments_raise():
    q, k, v = _qkv((1, 8, 2, 16))
    with pytest.raises(ValueError, match="head_weight must have shape"):
        perturbed_attention(q, k, v, jnp.ones(3))
    with pytest.raises(ValueError, match="text span"):
        perturbed_attention(q, k, v, jnp.ones(2), text=(4, 8))
    with pytest.raises(ValueError, match="powers of two"):
        perturbed_attention(q, k, v, block_q=24)
    with pytest.raises(ValueError, match="T == S"):
        perturbed_attention(q, k[:, :5], v[:, :5], jnp.ones(2))
