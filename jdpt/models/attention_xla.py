"""The ``"xla"`` attention implementation: plain XLA ops, the reference semantics of every other.

:func:`xla_attention` is what :func:`jdpt.models.attention.attention` runs by default (registered
there as ``"xla"``, and as ``"xla_dense"`` with ``recompute=False``). For long sequences its
backward recomputes the probabilities in query chunks instead of storing them
(:func:`xla_attention`'s ``recompute``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


RECOMPUTE_MIN_SCORES = 2**18  # "xla" recomputes probabilities in the backward from T * S = 2^18 ...
RECOMPUTE_MAX_HEAD_DIM = 16  # ... for head dims up to 16 on a CPU (any head dim elsewhere)
RECOMPUTE_QUERY_CHUNK = 64  # queries per step of that backward


def xla_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    head_weight: Array | None = None,
    bias: Array | None = None,
    mask: Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_probs: bool = False,
    recompute: bool | None = None,
) -> tuple[Array, Array | None]:
    """Plain-XLA attention; the reference semantics for every implementation.

    Logits, masking and softmax run in fp32; probabilities are cast to ``v``'s dtype before the
    value product (as in ``jax.nn.dot_product_attention``).

    ``recompute``: differentiate through a backward that stores only q, k, v and recomputes the
    probabilities ``RECOMPUTE_QUERY_CHUNK`` queries at a time (the FlashAttention-2 backward as
    plain XLA ops) instead of keeping the ``[B, H, T, S]`` probabilities for the backward pass.
    The forward pass and its values are the same either way; the gradients agree to rounding.
    ``None`` (the ``"xla"`` implementation) turns it on for ``T * S >= RECOMPUTE_MIN_SCORES``
    with no ``bias`` or ``return_probs`` and a Python-number ``scale``, on a CPU only for head
    dims <= ``RECOMPUTE_MAX_HEAD_DIM``, where it was measured faster (2 cores, forward+backward:
    1024 tokens at head dim 8 2.2x faster; 512 and 2048 tokens at head dim 16: 1.8x); at head
    dims 32-128 recomputing the logits costs a CPU more than it saves (512 tokens, head dim 64:
    1.3x slower; ask with ``recompute=True`` for the memory). On GPU/TPU it is on at any head
    dim for the memory, which is what limits training there (one 4096-token layer of 24 heads
    stores 1.6 GB of fp32 probabilities per image); its speed there is not measured yet.
    The recomputing backward is a ``jax.custom_vjp``, so it has no forward-mode derivative
    (``jax.jvp``): plans that need one use ``impl="xla_dense"`` (``recompute=False``).
    """
    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    # Head-major operands: one transpose each, then plain batched matmuls (measured faster on
    # CPU, forward and backward, than contracting the [B, T, H, D] layout directly).
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if recompute is None:
        small_heads = d <= RECOMPUTE_MAX_HEAD_DIM or jax.default_backend() != "cpu"
        recompute = (q.shape[2] * k.shape[2] >= RECOMPUTE_MIN_SCORES and small_heads
                     and bias is None and not return_probs and isinstance(scale, int | float))
    elif recompute and (bias is not None or return_probs):
        raise ValueError(
            "recompute=True recomputes the probabilities in the backward pass, so it takes no logit "
            "bias (whose gradient it does not form) and cannot return_probs; use recompute=False"
        )
    if recompute:
        keep = None if mask is None else mask.astype(bool).reshape((1,) * (4 - mask.ndim) + mask.shape)
        out, probs = _recomputing_attention(q, k, v, keep, float(scale), is_causal), None
    else:
        out, probs = _softmax_attention(q, k, v, bias, _keep(mask, is_causal, q.shape[2], k.shape[2]), scale)
    avg = probs.mean(axis=1) if return_probs else None
    if head_weight is not None:
        u = _head_weight(head_weight, q.shape[0], q.shape[1])  # [B, H, 1, 1]
        out = ((1.0 - u) * out.astype(jnp.float32) + u * v.astype(jnp.float32)).astype(out.dtype)
        if return_probs:  # the map actually used, (1-u)A + uI, averaged over heads
            u = u[:, :, 0, 0]
            eye = jnp.eye(q.shape[2], k.shape[2], dtype=jnp.float32)
            avg = jnp.einsum("bh,bhts->bts", 1.0 - u, probs) / q.shape[1] + u.mean(axis=1)[:, None, None] * eye
    return out.transpose(0, 2, 1, 3), avg


def _softmax_attention(q: Array, k: Array, v: Array, bias: Array | None, keep: Array | None,
                       scale: float) -> tuple[Array, Array]:
    """``softmax(q k^T * scale + bias, masked by keep) v`` over head-major ``[B, H, T, D]``
    operands; returns the output and the fp32 probabilities ``[B, H, T, S]``."""
    logits = jnp.einsum("bhtd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if keep is not None:
        logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhts,bhsd->bhtd", probs.astype(v.dtype), v), probs


def _keep(mask: Array | None, is_causal: bool, t: int, s: int, first_row: Array | int = 0) -> Array | None:
    """The boolean keep-mask of ``mask`` and causality for queries ``first_row ..`` of ``t``."""
    keep = None if mask is None else mask.astype(bool)
    if is_causal:
        rows = first_row + jax.lax.broadcasted_iota(jnp.int32, (t, s), 0)
        causal = rows >= jax.lax.broadcasted_iota(jnp.int32, (t, s), 1)
        keep = causal if keep is None else jnp.logical_and(keep, causal)
    return keep


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _recomputing_attention(q: Array, k: Array, v: Array, mask: Array | None, scale: float,
                           is_causal: bool) -> Array:
    """:func:`_softmax_attention`'s output (no bias) with a backward that recomputes the
    probabilities chunk by chunk. ``mask``: None or a 4-D boolean mask broadcastable to
    ``[B, H, T, S]`` (not differentiated); the causal mask is rebuilt per chunk, never stored."""
    return _recomputing_fwd(q, k, v, mask, scale, is_causal)[0]


def _recomputing_fwd(q, k, v, mask, scale, is_causal):
    out, _ = _softmax_attention(q, k, v, None, _keep(mask, is_causal, q.shape[2], k.shape[2]), scale)
    return out, (q, k, v, mask)


def _recomputing_bwd(scale, is_causal, residuals, d_out):
    q, k, v, mask = residuals
    b, h, t, d = q.shape
    chunk = min(RECOMPUTE_QUERY_CHUNK, t)
    padded = -(-t // chunk) * chunk
    row_mask = mask is not None and mask.shape[2] == t and t > 1

    def chunks(x: Array, fill) -> Array:  # [B', H', T, ...] -> [n, B', H', chunk, ...]
        x = jnp.pad(x, [(0, 0), (0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 3), constant_values=fill)
        x = x.reshape(*x.shape[:2], padded // chunk, chunk, *x.shape[3:])
        return jnp.moveaxis(x, 2, 0)

    def step(carry, xs):
        dk, dv = carry
        first, qc, dc, mc = xs
        keep = _keep(mc if row_mask else mask, is_causal, chunk, k.shape[2], first)
        _, p = _softmax_attention(qc, k, v, None, keep, scale)
        dv = dv + jnp.einsum("bhts,bhtd->bhsd", p.astype(v.dtype), dc, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bhtd,bhsd->bhts", dc, v, preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))  # the softmax VJP
        if keep is not None:
            ds = jnp.where(keep, ds, 0.0)
        ds = ds * jnp.float32(scale)
        dq = jnp.einsum("bhts,bhsd->bhtd", ds, k, preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum("bhts,bhtd->bhsd", ds, qc, preferred_element_type=jnp.float32)
        return (dk, dv), dq

    zeros = jnp.zeros(k.shape, jnp.float32)
    firsts = jnp.arange(0, padded, chunk, dtype=jnp.int32)
    xs = (firsts, chunks(q, 0), chunks(d_out, 0), chunks(mask, True) if row_mask else None)
    (dk, dv), dq = jax.lax.scan(step, (zeros, zeros), xs)
    dq = jnp.moveaxis(dq, 0, 2).reshape(b, h, padded, d)[:, :, :t]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_recomputing_attention.defvjp(_recomputing_fwd, _recomputing_bwd)


def _head_weight(u: Array, batch: int, heads: int) -> Array:
    """Broadcast ``u`` ([H] or [B, H]) to ``[B, H, 1, 1]`` in fp32 (head-major layout)."""
    u = jnp.asarray(u, jnp.float32)
    if u.ndim == 1:
        u = jnp.broadcast_to(u[None], (batch, u.shape[0]))
    if u.shape != (batch, heads):
        raise ValueError(
            f"head_weight must have shape [H] = [{heads}] or [B, H] = [{batch}, {heads}]; "
            f"got {tuple(u.shape)}"
        )
    return u[:, :, None, None]


