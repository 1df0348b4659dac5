"""Backward Pallas kernels of perturbed attention (FlashAttention-2 layout): dq over query
blocks, dk / dv over key blocks, recomputing probabilities from the saved log-sum-exp. The
``custom_vjp`` that calls them, and the O(T) diagonal terms, are in :mod:`jdpt.kernels.attention`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jdpt.kernels.attention_blocks import Static, block_range, dot, dot_t, dot_tn, is_text, specs


def _bwd_dq_kernel(*refs, cfg: Static, joint: bool):
    """dq for one (batch, head, query block): loop over key blocks.

    refs: q [bq, D], k [Sp, D], v [Sp, D], do [bq, D], lse [bq], a [bq], c [bq],
    (joint: lse_pert [bq], b [bq], e [bq]), out dq [bq, D].
    dS = P o (a dPV - c) + Q_text o (b dPV - e) with dPV = dO V^T.
    """
    it = iter(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, a_ref, c_ref = (next(it) for _ in range(7))
    lsep_ref, b_ref, e_ref = (next(it), next(it), next(it)) if joint else (None, None, None)
    dq_ref = next(it)
    bq, bk = cfg.block_q, cfg.block_k
    qi = pl.program_id(2)
    rows = qi * bq + jnp.arange(bq)
    q, do = q_ref[...], do_ref[...]
    lse, a, c = lse_ref[...], a_ref[...], c_ref[...]
    if joint:
        lsep, bw, e = lsep_ref[...], b_ref[...], e_ref[...]
    text_range, _ = cfg.key_ranges()

    def body(kb, dq):
        start = pl.multiple_of(kb * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = dot_t(q, k) * cfg.scale
        cols = start + jnp.arange(bk)
        keep = (cols < cfg.kv_len)[None, :]
        if cfg.causal:
            keep = keep & (cols[None, :] <= rows[:, None])
        p = jnp.where(keep, jnp.exp(s - lse[:, None]), 0.0)
        dpv = dot_t(do, v)
        ds = p * (a[:, None] * dpv - c[:, None])
        if joint:
            qt = jnp.where(keep & is_text(cols, cfg)[None, :], jnp.exp(s - lsep[:, None]), 0.0)
            ds = ds + qt * (bw[:, None] * dpv - e[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    def loop(lo, hi, dq):
        kb_lo, kb_hi = block_range(lo, hi, bk)
        if cfg.causal:
            kb_hi = jnp.minimum(kb_hi, ((qi + 1) * bq + bk - 1) // bk)
        return jax.lax.fori_loop(kb_lo, kb_hi, body, dq)

    dq = jnp.zeros(q.shape, jnp.float32)
    need_p = jnp.any(a != 0.0) | jnp.any(c != 0.0)
    if text_range is None:
        dq = jax.lax.cond(need_p, lambda: loop(0, cfg.kv_len, dq), lambda: dq)
    else:  # without the normal map only the text key blocks carry gradient
        dq = jax.lax.cond(need_p, lambda: loop(0, cfg.kv_len, dq), lambda: loop(*text_range, dq))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _bwd_dkv_kernel(*refs, cfg: Static, joint: bool):
    """dk, dv for one (batch, head, key block): loop over query blocks (same refs as dq, with
    full-length q / do / row vectors and this key block's k / v)."""
    it = iter(refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, a_ref, c_ref = (next(it) for _ in range(7))
    lsep_ref, b_ref, e_ref = (next(it), next(it), next(it)) if joint else (None, None, None)
    dk_ref, dv_ref = next(it), next(it)
    bq, bk = cfg.block_q, cfg.block_k
    kj = pl.program_id(2)
    cols = kj * bk + jnp.arange(bk)
    k, v = k_ref[...], v_ref[...]
    col_keep = (cols < cfg.kv_len)[None, :]
    col_text = is_text(cols, cfg)[None, :]
    block_has_text = jnp.any(col_text) if joint else False

    def body(ib, carry):
        dk, dv = carry
        start = pl.multiple_of(ib * bq, bq)
        rows = start + jnp.arange(bq)
        sl = pl.ds(start, bq)
        a, c = a_ref[sl], c_ref[sl]
        needed = jnp.any(a != 0.0) | jnp.any(c != 0.0)
        if joint:
            bw, e = b_ref[sl], e_ref[sl]
            needed = needed | (block_has_text & jnp.any(bw != 0.0))

        def compute():
            q, do, lse = q_ref[sl, :], do_ref[sl, :], lse_ref[sl]
            s = dot_t(q, k) * cfg.scale
            keep = col_keep
            if cfg.causal:
                keep = keep & (cols[None, :] <= rows[:, None])
            p = jnp.where(keep, jnp.exp(s - lse[:, None]), 0.0)
            dpv = dot_t(do, v)
            w = a[:, None] * p
            ds = p * (a[:, None] * dpv - c[:, None])
            if joint:
                qt = jnp.where(keep & col_text, jnp.exp(s - lsep_ref[sl][:, None]), 0.0)
                w = w + bw[:, None] * qt
                ds = ds + qt * (bw[:, None] * dpv - e[:, None])
            return dk + dot_tn(ds.astype(q.dtype), q), dv + dot_tn(w.astype(do.dtype), do)

        return jax.lax.cond(needed, compute, lambda: (dk, dv))

    nq = cfg.q_len_padded // bq
    ib_lo = (kj * bk) // bq if cfg.causal else 0
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(ib_lo, nq, body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_kernels(q, k, v, do, lse, a, c, extra, cfg: Static):
    """dq, dk, dv of the O(T*S) block terms (head-major padded operands)."""
    b, h, tp, d = q.shape
    sp = k.shape[2]
    joint = extra is not None
    row, full, vec, _ = specs(cfg, d, sp)
    vecs = (lse, a, c) + (tuple(extra) if joint else ())
    dq = pl.pallas_call(
        functools.partial(_bwd_dq_kernel, cfg=cfg, joint=joint),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(b, h, tp // cfg.block_q),
        in_specs=[row, full, full, row] + [vec] * len(vecs),
        out_specs=row,
        interpret=cfg.interpret,
        name="perturbed_attention_bwd_dq",
    )(q, k, v, do, *vecs)
    krow = pl.BlockSpec((None, None, cfg.block_k, d), lambda b_, h_, j: (b_, h_, j, 0))
    qfull = pl.BlockSpec((None, None, tp, d), lambda b_, h_, j: (b_, h_, 0, 0))
    vfull = pl.BlockSpec((None, None, tp), lambda b_, h_, j: (b_, h_, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_bwd_dkv_kernel, cfg=cfg, joint=joint),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(b, h, sp // cfg.block_k),
        in_specs=[qfull, krow, krow, qfull] + [vfull] * len(vecs),
        out_specs=[krow, krow],
        interpret=cfg.interpret,
        name="perturbed_attention_bwd_dkv",
    )(q, k, v, do, *vecs)
    return dq, dk, dv
