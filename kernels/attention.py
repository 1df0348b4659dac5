"""Perturbed (SoftPAG / PAG) flash attention as portable Pallas kernels, with a plain-JAX reference.

Per (batch, head) weight ``u`` (SoftPAG, HeadHunter arXiv 2506.10978; PAG, Ahn et al. ECCV 2024 is
``u = 1``)::

    out = (1 - u) * softmax(q k^T * scale) v + u * softmax_pert(q k^T * scale) v

``softmax_pert`` is the perturbed attention map. Without a text span it is the identity (each query
sees only its own key, so the second term is ``u * v``). With a text span (joint MMDiT attention,
diffusers' ``PAGCFGJointAttnProcessor2_0``) a perturbed *image* query sees only its own key plus
every text key, and *text* queries are never perturbed. The span is ``text=(start, length)``:
SD3's joint order is [image, text] (``start = n_image``), Flux's is [text, image] (``start = 0``).

Kernels (``pl.pallas_call``: Triton on GPU, Mosaic on TPU, ``interpret=True`` on CPU):

- forward: blocked online softmax, grid ``(B, H, query blocks)``, the key loop inside the kernel.
  Keys are visited text span first, then the image ranges, so the perturbed map reuses the text
  part of the normal one; the own-key term is a row-wise dot product. A query block whose heads
  have ``u == 1`` and that holds no text query skips every image key block (``lax.cond``): PAG
  heads cost O(T) (identity) or O(T * (n_text + 1)) (joint) instead of O(T^2).
- backward (``jax.custom_vjp``): two Pallas kernels in the FlashAttention-2 layout
  (:mod:`jdpt.kernels.attention_backward`), dq (grid over query blocks) and dk/dv (grid over key
  blocks), recomputing probabilities from the saved log-sum-exp. Block pairs whose every
  coefficient is zero (``u == 1`` rows) are skipped. The O(T) own-key (diagonal) terms of the
  perturbed map, and the gradient of ``u``, are plain JAX.
  The forward pass run under differentiation does not skip ``u == 1`` heads (their normal output
  is needed for d out / d u); inference calls do.

Inputs may have any sequence length (padded to the block size and masked inside) and any head dim
(padded to a power of two >= 16, as Triton wants). Operands are moved to head-major
``[B, H, T, D]`` blocks (the layout both Triton and Mosaic tile cleanly).
Importing this module registers :func:`pallas_attention` as the ``"pallas"`` implementation of
:func:`jdpt.models.attention.attention`.

Status: tested in interpret mode on CPU only (forward, dq/dk/dv/du and the lse gradient against
the dense reference and ``jax.nn.dot_product_attention``). Not yet compiled on a GPU or TPU: block
sizes / Triton ``num_warps`` are untuned defaults, and Mosaic (TPU) may reject the ``[bq]``
per-row vector blocks. Performance numbers must come from ``experiments/bench_attention.py`` on an
accelerator.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jdpt.kernels.attention_backward import backward_kernels
from jdpt.kernels.attention_blocks import NEG, Static, block_range, dot, dot_t, is_text, specs
from jdpt.models.attention import register_implementation

Array = jax.Array



# --------------------------------------------------------------------------------------------
# Plain-JAX reference
# --------------------------------------------------------------------------------------------


def _text_rows(n: int, text: tuple[int, int] | None) -> Array:
    """``[n]`` bool: which token positions are text tokens."""
    pos = jnp.arange(n)
    if text is None or text[1] == 0:
        return jnp.zeros((n,), bool)
    return (pos >= text[0]) & (pos < text[0] + text[1])


def perturbed_attention_reference(
    q: Array,
    k: Array,
    v: Array,
    head_weight: Array | None = None,
    *,
    scale: float | None = None,
    text: tuple[int, int] | None = None,
    is_causal: bool = False,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Dense plain-JAX perturbed attention; the semantics :func:`perturbed_attention` implements.

    Args:
        q: ``[B, T, H, D]``; k, v: ``[B, S, H, D]`` (``S == T`` when ``head_weight`` is given).
        head_weight: ``u``, ``[H]`` or ``[B, H]`` (``None``: plain attention).
        scale: logit scale, default ``1/sqrt(D)``.
        text: ``(start, length)`` of the text span for joint attention (``None``: identity PAG).
        is_causal: query i sees keys j <= i.
        return_lse: also return the log-sum-exp of the unperturbed logits, ``[B, H, T]`` fp32.

    Returns:
        ``out`` ``[B, T, H, D]`` in ``v``'s dtype (and ``lse`` when asked).
    """
    b, t, h, d = q.shape
    s_len = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    keep = jnp.ones((t, s_len), bool)
    if is_causal:
        keep = jnp.tril(keep)
    logits = jnp.where(keep, logits, NEG)
    lse = jax.nn.logsumexp(logits, axis=-1)
    probs = jnp.exp(logits - lse[..., None])
    out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    if head_weight is not None:
        u = _broadcast_u(head_weight, b, h)
        is_text = _text_rows(t, text)
        allowed = (is_text[None, :] | jnp.eye(t, dtype=bool)) & keep
        pert = jax.nn.softmax(jnp.where(allowed, logits, NEG), axis=-1)
        pert_out = jnp.einsum("bhts,bshd->bthd", pert.astype(v.dtype), v,
                              preferred_element_type=jnp.float32)
        u_row = jnp.where(is_text[None, :, None], 0.0, u[:, None, :])[..., None]  # [B, T, H, 1]
        out = (1.0 - u_row) * out + u_row * pert_out
    out = out.astype(v.dtype)
    return (out, lse) if return_lse else out


def _broadcast_u(u: Array, batch: int, heads: int) -> Array:
    """``u`` ([H] or [B, H]) as ``[B, H]`` fp32, with a clear error for other shapes."""
    u = jnp.asarray(u, jnp.float32)
    if u.ndim == 1:
        u = jnp.broadcast_to(u[None], (batch, u.shape[0]))
    if u.shape != (batch, heads):
        raise ValueError(
            f"head_weight must have shape [H] = [{heads}] or [B, H] = [{batch}, {heads}]; "
            f"got {tuple(u.shape)}"
        )
    return u


# --------------------------------------------------------------------------------------------
# Forward kernel (the backward kernels: jdpt.kernels.attention_backward)
# --------------------------------------------------------------------------------------------


def _fwd_kernel(*refs, cfg: Static, residuals: bool):
    """One (batch, head, query block) program of the forward pass.

    refs: q [bq, D], k [Sp, D], v [Sp, D], (u scalar), then outputs out [bq, D], lse [bq],
    and with ``residuals``: o_full [bq, D] (+ joint: o_pert [bq, D], lse_pert [bq]).
    """
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    u_ref = next(it) if cfg.perturbed else None
    out_ref, lse_ref = next(it), next(it)
    joint = cfg.perturbed and cfg.text is not None and cfg.text[1] > 0
    ofull_ref = next(it) if residuals else None
    opert_ref, lsepert_ref = (next(it), next(it)) if residuals and joint else (None, None)

    bq, bk = cfg.block_q, cfg.block_k
    qi = pl.program_id(2)
    q = q_ref[...]
    rows = qi * bq + jnp.arange(bq)
    text_range, image_ranges = cfg.key_ranges()

    def scan(lo: int, hi: int, carry):
        """Online softmax over key columns [lo, hi) (static bounds), continuing ``carry``."""

        def body(kb, carry):
            m, l, acc = carry
            start = pl.multiple_of(kb * bk, bk)
            k = k_ref[pl.ds(start, bk), :]
            v = v_ref[pl.ds(start, bk), :]
            s = dot_t(q, k) * cfg.scale
            cols = start + jnp.arange(bk)
            keep = ((cols >= lo) & (cols < hi))[None, :]
            if cfg.causal:
                keep = keep & (cols[None, :] <= rows[:, None])
            s = jnp.where(keep, s, NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.where(keep, jnp.exp(s - m_new[:, None]), 0.0)
            l = alpha * l + jnp.sum(p, axis=-1)
            acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v)
            return m_new, l, acc

        kb_lo, kb_hi = block_range(lo, hi, bk)
        if cfg.causal:  # key blocks entirely after the query block's last row are all masked
            kb_hi = jnp.minimum(kb_hi, ((qi + 1) * bq + bk - 1) // bk)
        return jax.lax.fori_loop(kb_lo, kb_hi, body, carry)

    d = q.shape[-1]
    init = (jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32),
            jnp.zeros((bq, d), jnp.float32))
    text_carry = init if text_range is None else scan(*text_range, init)

    def normal():
        carry = text_carry
        for lo, hi in image_ranges:
            carry = scan(lo, hi, carry)
        m, l, acc = carry
        l_safe = jnp.where(l > 0, l, 1.0)
        return acc / l_safe[:, None], m + jnp.log(l_safe)

    if not cfg.perturbed:
        o_full, lse = normal()
        out_ref[...] = o_full.astype(out_ref.dtype)
        lse_ref[...] = lse
        if residuals:
            ofull_ref[...] = o_full.astype(ofull_ref.dtype)
        return

    # Perturbed map: the text part of the scan plus the query's own key (a row-wise dot product).
    self_rows = pl.ds(pl.multiple_of(qi * bq, bq), bq)
    k_self = k_ref[self_rows, :].astype(jnp.float32)
    v_self = v_ref[self_rows, :].astype(jnp.float32)
    if joint:
        s_self = jnp.sum(q.astype(jnp.float32) * k_self, axis=-1) * cfg.scale
        m_t, l_t, acc_t = text_carry
        m_p = jnp.maximum(m_t, s_self)
        a_t, a_s = jnp.exp(m_t - m_p), jnp.exp(s_self - m_p)
        l_p = a_t * l_t + a_s
        o_pert = (a_t[:, None] * acc_t + a_s[:, None] * v_self) / l_p[:, None]
        lse_pert = m_p + jnp.log(l_p)
    else:
        o_pert, lse_pert = v_self, None
    u = u_ref[()]
    u_row = jnp.where(is_text(rows, cfg), 0.0, u)

    def write(o_full, lse):
        out = (1.0 - u_row)[:, None] * o_full + u_row[:, None] * o_pert
        out_ref[...] = out.astype(out_ref.dtype)
        lse_ref[...] = lse
        if residuals:
            ofull_ref[...] = o_full.astype(ofull_ref.dtype)
            if joint:
                opert_ref[...] = o_pert.astype(opert_ref.dtype)
                lsepert_ref[...] = lse_pert

    if cfg.skip:
        # PAG heads: no image key block is visited unless a text query (never perturbed) is here.
        skip = (u == 1.0) & jnp.logical_not(jnp.any(is_text(rows, cfg)))
        o_full, lse = jax.lax.cond(
            skip,
            lambda: (jnp.zeros_like(o_pert), jnp.zeros((bq,), jnp.float32)),
            normal,
        )
    else:
        o_full, lse = normal()
    write(o_full, lse)


def _forward(q, k, v, u, cfg: Static, residuals: bool):
    """Run the forward kernel on head-major padded operands ``[B, H, Tp, Dp]``."""
    b, h, tp, d = q.shape
    sp = k.shape[2]
    row, full, vec, scalar = specs(cfg, d, sp)
    joint = cfg.perturbed and cfg.text is not None and cfg.text[1] > 0
    in_specs = [row, full, full] + ([scalar] if cfg.perturbed else [])
    args = (q, k, v) + ((u,) if cfg.perturbed else ())
    out_shape = [jax.ShapeDtypeStruct(q.shape, v.dtype), jax.ShapeDtypeStruct((b, h, tp), jnp.float32)]
    out_specs = [row, vec]
    if residuals:
        out_shape.append(jax.ShapeDtypeStruct(q.shape, v.dtype))
        out_specs.append(row)
        if joint:
            out_shape += [jax.ShapeDtypeStruct(q.shape, v.dtype),
                          jax.ShapeDtypeStruct((b, h, tp), jnp.float32)]
            out_specs += [row, vec]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, residuals=residuals),
        out_shape=out_shape,
        grid=(b, h, tp // cfg.block_q),
        in_specs=in_specs,
        out_specs=out_specs,
        interpret=cfg.interpret,
        name="perturbed_attention_fwd",
    )(*args)


# --------------------------------------------------------------------------------------------
# custom_vjp core on head-major padded operands
# --------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _core(q, k, v, u, cfg: Static):
    out, lse = _forward(q, k, v, u, cfg, residuals=False)
    return out, lse


def _core_fwd(q, k, v, u, cfg: Static):
    # Under differentiation the normal map of u == 1 heads is still computed: d out / d u needs it.
    outs = _forward(q, k, v, u, dataclasses.replace(cfg, skip=False), residuals=True)
    out, lse, o_full = outs[:3]
    joint_res = tuple(outs[3:])
    return (out, lse), (q, k, v, u, lse, o_full, joint_res)


def _core_bwd(cfg: Static, res, cotangents):
    q, k, v, u, lse, o_full, joint_res = res
    dout, dlse = cotangents
    f32 = jnp.float32
    do = dout.astype(f32)
    tp = q.shape[2]
    pos = jnp.arange(tp)
    valid = (pos < cfg.q_len)[None, None, :]
    dot_full = jnp.sum(do * o_full.astype(f32), axis=-1)  # [B, H, Tp]
    if not cfg.perturbed:
        a = jnp.where(valid, 1.0, 0.0) * jnp.ones_like(dot_full)
        c = a * dot_full - dlse
        dq, dk, dv = backward_kernels(q, k, v, dout.astype(q.dtype), lse, a, c, None, cfg)
        return dq, dk, dv, None
    u_row = jnp.where(valid & ~is_text(pos, cfg)[None, None, :], u[:, :, None], 0.0)
    a = jnp.where(valid, 1.0 - u_row, 0.0)
    c = a * dot_full - dlse
    vf = v.astype(f32)
    if joint_res:
        o_pert, lse_pert = joint_res
        e = u_row * jnp.sum(do * o_pert.astype(f32), axis=-1)
        extra = (lse_pert, u_row, e)
    else:
        o_pert = vf
        extra = None
    dq, dk, dv = backward_kernels(q, k, v, dout.astype(q.dtype), lse, a, c, extra, cfg)
    # Own-key (diagonal) terms of the perturbed map, O(T): Q_ii and its logit s_ii.
    if joint_res:
        s_self = jnp.sum(q.astype(f32) * k.astype(f32), axis=-1) * cfg.scale
        q_ii = jnp.where(u_row != 0.0, jnp.exp(s_self - lse_pert), 0.0)
        ds_ii = q_ii * (u_row * jnp.sum(do * vf, axis=-1) - e)
        dq = (dq.astype(f32) + cfg.scale * ds_ii[..., None] * k.astype(f32)).astype(q.dtype)
        dk = (dk.astype(f32) + cfg.scale * ds_ii[..., None] * q.astype(f32)).astype(k.dtype)
        dv = (dv.astype(f32) + (u_row * q_ii)[..., None] * do).astype(v.dtype)
    else:  # identity: Q = I has no logit dependence
        dv = (dv.astype(f32) + u_row[..., None] * do).astype(v.dtype)
    # d out / d u = o_pert - o_full on image rows.
    image = valid & ~is_text(pos, cfg)[None, None, :]
    du = jnp.sum(jnp.where(image[..., None], do * (o_pert.astype(f32) - o_full.astype(f32)), 0.0),
                 axis=(2, 3))
    return dq, dk, dv, du.astype(u.dtype)


_core.defvjp(_core_fwd, _core_bwd)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _pick_block(n: int, block: int | None) -> int:
    """Default block: 128, shrunk to the (power-of-two, >= 16) padded length of short inputs."""
    if block is None:
        block = min(128, max(16, pl.next_power_of_2(n)))
    if block < 16 or block & (block - 1):
        raise ValueError(f"block sizes must be powers of two >= 16 (Triton tiles); got {block}")
    return block


def perturbed_attention(
    q: Array,
    k: Array,
    v: Array,
    head_weight: Array | None = None,
    *,
    scale: float | None = None,
    text: tuple[int, int] | None = None,
    is_causal: bool = False,
    return_lse: bool = False,
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
) -> Array | tuple[Array, Array]:
    """Flash attention with per-(batch, head) SoftPAG/PAG perturbation (Pallas).

    Args:
        q: ``[B, T, H, D]`` queries; k, v: ``[B, S, H, D]`` (``S == T`` with ``head_weight``).
        head_weight: ``u`` ``[H]`` or ``[B, H]``; ``None`` is plain attention. Differentiable.
        scale: logit scale, default ``1/sqrt(D)``.
        text: ``(start, length)`` of the text tokens in joint attention (SD3 ``(n_image, n_text)``,
            Flux ``(0, n_text)``): perturbed image queries see their own key plus the text keys,
            text queries are not perturbed. ``None``: identity perturbation (``u = 1`` => ``v``).
        is_causal: query i sees keys j <= i.
        return_lse: also return the unperturbed logits' log-sum-exp ``[B, H, T]`` fp32 (then
            ``u == 1`` heads are not skipped, since their lse is needed).
        block_q, block_k: tile sizes (powers of two >= 16; default 128 or the padded length).
        interpret: run the kernels in Pallas interpret mode; default: on the CPU backend.

    Returns:
        ``out`` ``[B, T, H, D]`` in ``v``'s dtype, and ``lse`` when ``return_lse``.
    """
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or q.shape[0] != k.shape[0] \
            or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            "perturbed_attention expects q [B, T, H, D] and k, v [B, S, H, D]; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    b, t, h, d = q.shape
    s = k.shape[1]
    if head_weight is not None and s != t:
        raise ValueError(f"head_weight needs self-attention (T == S); got T={t}, S={s}")
    if text is not None:
        if head_weight is None:
            raise ValueError("text=(start, length) only matters with a head_weight; pass one")
        start, length = (int(x) for x in text)
        if start < 0 or length < 0 or start + length > t:
            raise ValueError(f"text span (start={start}, length={length}) must lie in [0, T={t}]")
        text = (start, length)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    bq, bk = _pick_block(t, block_q), _pick_block(s, block_k)
    if head_weight is not None:  # queries and keys share the padding (own-key term)
        bq = bk = max(bq, bk)
    dp = max(16, pl.next_power_of_2(d))
    tp = -(-t // bq) * bq
    cfg = Static(
        scale=float(d**-0.5 if scale is None else scale), q_len=t, q_len_padded=tp, kv_len=s,
        block_q=bq, block_k=bk, text=text, causal=bool(is_causal),
        perturbed=head_weight is not None, skip=not return_lse, interpret=bool(interpret),
    )

    u = None if head_weight is None else _broadcast_u(head_weight, b, h)
    return _apply(q, k, v, u, cfg, dp, return_lse)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _apply(q, k, v, u, cfg: Static, dp: int, return_lse: bool):
    """Pad and transpose to head-major blocks, run the kernels, undo (jitted: eager callers
    reuse the compiled kernels)."""
    t, d = q.shape[1], q.shape[3]

    def prep(x, n):
        x = x.transpose(0, 2, 1, 3)
        return jnp.pad(x, ((0, 0), (0, 0), (0, n - x.shape[2]), (0, dp - d)))

    sp = -(-cfg.kv_len // cfg.block_k) * cfg.block_k
    out, lse = _core(prep(q, cfg.q_len_padded), prep(k, sp), prep(v, sp), u, cfg)
    out = out[:, :, :t, :d].transpose(0, 2, 1, 3)
    return (out, lse[:, :, :t]) if return_lse else out


def pallas_attention(
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
    joint_text: tuple[int, int] | None = None,
    **plan_fields,
) -> tuple[Array, None]:
    """The ``"pallas"`` implementation of :func:`jdpt.models.attention.attention`.

    Same semantics as :func:`jdpt.models.attention_xla.xla_attention` for what it supports, plus a
    plan's MMDiT identity mode (``joint_text``: the text span, see :func:`perturbed_attention`);
    every other feature raises ``NotImplementedError`` naming the fix instead of falling back.
    """
    unsupported = []
    if bias is not None:
        unsupported.append("an additive logit bias")
    if mask is not None:
        unsupported.append("a general boolean mask")
    if return_probs:
        unsupported.append("return_probs (flash attention never forms the probabilities)")
    unsupported += [f"plan field {name}={val!r}" for name, val in plan_fields.items()
                    if val is not None and val is not False]
    if unsupported:
        raise NotImplementedError(
            f"the pallas attention kernel does not support {', '.join(unsupported)}; "
            "use AttentionPlan(impl='xla') for this layer"
        )
    return perturbed_attention(q, k, v, head_weight, scale=scale, text=joint_text, is_causal=is_causal), None


register_implementation("pallas", pallas_attention, joint_identity=True)


def attention_flops(batch: int, q_len: int, kv_len: int, heads: int, head_dim: int) -> float:
    """FLOPs of dense attention's two matmuls (the usual flash-attention count: 4 B H T S D)."""
    return 4.0 * batch * heads * q_len * kv_len * head_dim


__all__ = ["perturbed_attention", "perturbed_attention_reference", "pallas_attention",
           "attention_flops"]
