"""The attention entry point against jax.nn.dot_product_attention and closed forms."""

from __future__ import annotations

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from jdpt.models.attention import (
    AttentionPlan,
    LayerPlans,
    attention,
    available_implementations,
    plan_layers,
    resolve_plan,
)
from jdpt.models.attention_xla import RECOMPUTE_MAX_HEAD_DIM, RECOMPUTE_MIN_SCORES, xla_attention


def _qkv(b=2, t=7, s=7, h=3, d=8, seed=0, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k1, (b, t, h, d), dtype), jax.random.normal(k2, (b, s, h, d), dtype),
            jax.random.normal(k3, (b, s, h, d), dtype))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t,s", [(7, 7), (5, 9)])
def test_matches_jax_dot_product_attention(causal, t, s):
    q, k, v = _qkv(t=t, s=s)
    bias = jax.random.normal(jax.random.key(5), (1, 3, t, s))
    mask = jax.random.uniform(jax.random.key(6), (2, 1, t, s)) > 0.2
    mask = mask.at[..., 0].set(True)  # every query keeps at least one key, causal or not
    out, probs = attention(q, k, v, bias=bias, mask=mask, is_causal=causal)
    ref = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=causal, implementation="xla")
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert probs is None


def test_scale_argument():
    q, k, v = _qkv()
    out, _ = attention(q, k, v, scale=1.0)
    ref = jax.nn.dot_product_attention(q, k, v, scale=1.0)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_softpag_head_weight_closed_form():
    """out = (1-u) softmax(qk^T/sqrt d) v + u v, per head and per batch element."""
    q, k, v = _qkv()
    plain, _ = attention(q, k, v)
    u = jnp.array([[0.0, 0.5, 1.0], [1.0, 0.25, 0.0]])
    out, _ = attention(q, k, v, plan=AttentionPlan(head_weight=u))
    expected = (1 - u[:, None, :, None]) * plain + u[:, None, :, None] * v
    np.testing.assert_allclose(out, expected, atol=1e-5)
    # u = 1 is PAG's identity attention: the oracle is an identity mask on those heads.
    ones, _ = attention(q, k, v, plan=AttentionPlan(head_weight=jnp.ones(3)))
    eye = jnp.eye(7, dtype=bool)[None, None]
    oracle = jax.nn.dot_product_attention(q, k, v, mask=eye)
    np.testing.assert_allclose(ones, oracle, atol=1e-5)
    np.testing.assert_allclose(ones, v, atol=1e-6)


def test_probabilities_head_averaged():
    q, k, v = _qkv(t=4, s=6)
    _, probs = attention(q, k, v, plan=AttentionPlan(return_probs=True), is_causal=True)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8)
    causal = jnp.tril(jnp.ones((4, 6), bool))
    ref = jax.nn.softmax(jnp.where(causal, logits, -jnp.inf), -1).mean(1)
    np.testing.assert_allclose(probs, ref, atol=1e-6)
    # Perturbed heads report the map they actually used: (1-u) A + u I, averaged over heads.
    q, k, v = _qkv(t=5, s=5)
    u = jnp.array([1.0, 0.0, 0.5])
    _, pert = attention(q, k, v, plan=AttentionPlan(head_weight=u, return_probs=True))
    full = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8), -1)
    eff = (1 - u)[None, :, None, None] * full + u[None, :, None, None] * jnp.eye(5)
    np.testing.assert_allclose(pert, eff.mean(1), atol=1e-6)
    np.testing.assert_allclose(pert.sum(-1), 1.0, atol=1e-6)


def test_bf16_keeps_fp32_softmax():
    q, k, v = _qkv(t=64, s=64, d=64)
    out32, _ = attention(q, k, v)
    out16, _ = attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert out16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out16, np.float32), out32, atol=4e-2)


def _masks(kind: str, t: int, s: int):
    """(mask, is_causal) of a recompute test case; every query keeps at least one key."""
    key = jax.random.key(7)
    if kind == "rows":  # a different mask per query row (chunked with the queries)
        return (jax.random.uniform(key, (2, 1, t, s)) > 0.3).at[..., 0].set(True), False
    if kind == "keys":  # one mask per key (a padding mask, broadcast over the rows)
        return (jax.random.uniform(key, (2, 1, 1, s)) > 0.3).at[..., 0].set(True), False
    return None, kind == "causal"


@pytest.mark.parametrize("t,s,kind", [(150, 70, "none"), (150, 150, "causal"), (130, 97, "rows"),
                                      (64, 200, "keys"), (40, 40, "none")])
def test_recomputing_backward_matches_autodiff(t, s, kind):
    """recompute=True (probabilities recomputed per query chunk in the backward) against
    jax.nn.dot_product_attention's autodiff: same gradients, bit-identical forward. The query
    counts are not multiples of the chunk, so the padded last chunk is covered."""
    q, k, v = _qkv(t=t, s=s, h=2, d=8)
    mask, causal = _masks(kind, t, s)
    w = jax.random.normal(jax.random.key(3), q.shape)

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2)))

    ours = loss(lambda q, k, v: xla_attention(q, k, v, mask=mask, is_causal=causal, recompute=True)[0])
    ref = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                                            implementation="xla"))
    (value, grads), (ref_value, ref_grads) = ours(q, k, v), ref(q, k, v)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, atol=2e-5 * float(jnp.abs(r).max()))
    stored = xla_attention(q, k, v, mask=mask, is_causal=causal, recompute=False)[0]
    np.testing.assert_array_equal(xla_attention(q, k, v, mask=mask, is_causal=causal, recompute=True)[0], stored)


def test_recomputing_backward_with_head_weight_and_bf16():
    """SoftPAG's mix stays outside the recomputed core (u's gradient included); bf16 operands get
    bf16 gradients within bf16 rounding of the fp32 ones."""
    q, k, v = _qkv(t=100, s=100, h=2, d=16)
    u = jnp.array([0.3, 1.0])

    def grads(recompute, dtype):
        def loss(q, k, v, u):
            out, _ = xla_attention(q, k, v, head_weight=u, recompute=recompute)
            return jnp.sum(out.astype(jnp.float32) ** 2)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(*(x.astype(dtype) for x in (q, k, v)), u)

    ref = grads(False, jnp.float32)
    for g, r in zip(grads(True, jnp.float32), ref, strict=True):
        np.testing.assert_allclose(g, r, atol=2e-5 * float(jnp.abs(r).max()))
    for g, r in zip(grads(True, jnp.bfloat16)[:3], ref[:3], strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=3e-2 * float(jnp.abs(r).max()))


def _saved_score_sized(capsys, t: int, s: int, d: int = 4, **kw) -> list[str]:
    """The residuals that the default attention keeps for its backward with T*S elements per head."""
    q, k, v = _qkv(b=1, t=t, s=s, h=1, d=d)
    jax.ad_checkpoint.print_saved_residuals(lambda q, k, v: attention(q, k, v, **kw)[0], q, k, v)
    return [line for line in capsys.readouterr().out.splitlines() if f"{t},{s}]" in line]


def test_long_sequences_store_no_probabilities(capsys, monkeypatch):
    """The default "xla" implementation keeps the [B, H, T, S] probabilities for the backward
    below RECOMPUTE_MIN_SCORES or (on a CPU) above RECOMPUTE_MAX_HEAD_DIM and only q, k, v
    otherwise (unless a bias needs them)."""
    side = int(RECOMPUTE_MIN_SCORES**0.5)
    assert _saved_score_sized(capsys, side // 2, side // 2)
    assert not _saved_score_sized(capsys, side, side)
    assert not _saved_score_sized(capsys, side, side, d=RECOMPUTE_MAX_HEAD_DIM)
    assert _saved_score_sized(capsys, side, side, d=2 * RECOMPUTE_MAX_HEAD_DIM)
    assert not _saved_score_sized(capsys, side, side, is_causal=True)
    assert _saved_score_sized(capsys, side, side, bias=jnp.zeros((side, side)))
    assert _saved_score_sized(capsys, side, side, plan=AttentionPlan(impl="xla_dense"))
    # Off the CPU the head dim does not matter (the choice is made for the memory).
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not _saved_score_sized(capsys, side, side, d=2 * RECOMPUTE_MAX_HEAD_DIM)
    assert _saved_score_sized(capsys, side // 2, side // 2, d=2 * RECOMPUTE_MAX_HEAD_DIM)


def test_xla_dense_has_forward_mode_derivatives():
    """impl="xla_dense" never uses the custom-VJP backward, so jax.jvp works at any length."""
    side = int(RECOMPUTE_MIN_SCORES**0.5)
    q, k, v = _qkv(b=1, t=side, s=side, h=1, d=4)
    tangents = _qkv(b=1, t=side, s=side, h=1, d=4, seed=1)
    _, ours = jax.jvp(lambda q, k, v: attention(q, k, v, plan=AttentionPlan(impl="xla_dense"))[0], (q, k, v), tangents)
    _, ref = jax.jvp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"), (q, k, v), tangents)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * float(jnp.abs(ref).max()))


def test_plans_by_layer_name():
    names = ["blocks.0.attn", "blocks.1.attn", "single.0.attn"]
    pag = AttentionPlan(head_weight=jnp.ones(2))
    plans = plan_layers(names, r"blocks\.\d+\.attn", pag)
    assert set(plans.layers) == {"blocks.0.attn", "blocks.1.attn"}
    assert resolve_plan(plans, "blocks.1.attn") is pag
    assert resolve_plan(plans, "single.0.attn") == AttentionPlan()
    assert resolve_plan(None, "x") == AttentionPlan()
    assert resolve_plan(pag, "anything") is pag
    # Plans are pytrees: the per-head weights are traced, so new values do not recompile.
    traces = []

    @jax.jit
    def f(plans, q, k, v):
        traces.append(1)
        return attention(q, k, v, plan=plans.for_layer("blocks.0.attn"))[0]

    q, k, v = _qkv(h=2)
    f(plans, q, k, v)
    f(LayerPlans(layers={n: AttentionPlan(head_weight=jnp.full(2, 0.3, jnp.float32)) for n in plans.layers}), q, k, v)
    assert len(traces) == 1


def test_errors_name_the_problem():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"no attention layer.*blocks\.0"):
        plan_layers(["blocks.0.attn"], r"mid\..*", AttentionPlan())
    with pytest.raises(ValueError, match="unknown attention implementation 'flash9'.*pallas.*xla"):
        attention(q, k, v, plan=AttentionPlan(impl="flash9"))
    with pytest.raises(ValueError, match=r"head_weight must have shape \[H\] = \[3\]"):
        attention(q, k, v, plan=AttentionPlan(head_weight=jnp.ones(4)))
    q2, k2, v2 = _qkv(t=3, s=5)
    with pytest.raises(ValueError, match="needs self-attention"):
        attention(q2, k2, v2, plan=AttentionPlan(head_weight=jnp.ones(3)))
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="shapes disagree"):
        attention(q, k[..., :4], v)
    assert {"xla", "xla_dense"} <= set(available_implementations())
    with pytest.raises(ValueError, match="recompute=True .* no logit bias"):
        xla_attention(q, k, v, bias=jnp.zeros((7, 7)), recompute=True)
    with pytest.raises(ValueError, match="recompute=True .* cannot return_probs"):
        xla_attention(q, k, v, return_probs=True, recompute=True)
