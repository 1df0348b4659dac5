"""Guidance combine: CFG / CFG-Zero* / PAG / SEG from the stacked branch predictions, as a
portable Pallas kernel with a plain-JAX reference beside it.

Rules (notation of ``jdpt.guidance``; ``predictions`` ``[K, B, ...]`` branch-major):

- ``"cfg"`` (Ho & Salimans 2022, diffusers' scale), ``[uncond, cond]``: ``e_u + w (e_c - e_u)``.
- ``"cfg_zero_star"`` (Fan et al. 2025), ``[uncond, cond]``: ``s* v_u + w (v_c - s* v_u)`` with the
  per-sample ``s* = <v_c, v_u> / (||v_u||^2 + 1e-8)`` in fp32, and zero-init: the output is 0
  while ``step < zero_steps``.
- ``"pag"`` (Ahn et al., ECCV 2024) and ``"seg"`` (Hong, NeurIPS 2024; same combination),
  ``[uncond, cond, perturbed]``: ``e_u + w (e_c - e_u) + s (e_c - e_p)``; without CFG (``w=None``)
  ``[cond, perturbed]``: ``e_c + s (e_c - e_p)``.
- Any rule takes Lin et al.'s guidance ``rescale`` (``phi``), as :func:`jdpt.guidance.cfg.rescale_guided`.

Every rule is a per-sample linear combination ``out[b] = sum_k c[b, k] * p[k, b]``. The Pallas
version runs (1) when ``s*`` or ``rescale`` need them, a per-sample fp32 reduction kernel (grid
``(B, blocks)``, each program writes partial inner products ``<p_k, p_l>`` and sums ``sum p_k``
of its block; the partials are summed in JAX), (2) a few scalar ops giving ``c`` ``[B, K]`` (the
zero-init predicate zeroes it), (3) one elementwise kernel reading each prediction once and
writing the output in ``out_dtype`` (default: the input dtype; fp32 arithmetic). Rescale uses
``var = E[g^2] - E[g]^2`` from the Gram matrix (one pass; accurate for the near-zero-mean
predictions of diffusion models, off by O(eps * mean^2 / var) otherwise). Sizes need not be block
multiples: the last block is masked, nothing is padded or copied. The reference
(:func:`guidance_combine_reference`, ``impl="xla"``) splits the stack and calls the
``jdpt.guidance`` rules themselves, so it is exactly the library's plain-JAX path. The Pallas
path is differentiable (``jax.custom_vjp``; the backward is the reference's VJP), so samplers that
backpropagate through guidance (reward backprop) may use it; forward-mode (``jvp``) is not supported.

Decision rule (issue 7): the kernel earns a place on the default path only if, on the target
accelerator, ``experiments/bench_guidance.py`` measures it >= 10% faster (median) than the jitted
plain-JAX version (XLA's fusion) for the Flux (``[2, 4096, 64]``) and SD (``[2, 128, 128, 4]``)
sizes in bf16 and fp32, for each rule. Measured so far: CPU only (small sizes, a loaded 2-core
machine), where Pallas runs in interpret mode and is mostly several times slower than XLA
(``experiments/results/bench_guidance.md``), which decides nothing; not yet compiled on a GPU or
TPU (written for the Triton lowering: power-of-two blocks, masked tails). So the default stays
plain JAX: the guidance objects route ``combine`` here only with ``combine_impl="pallas"``. The
operation is memory-bound and XLA already fuses CFG/PAG into one read of the K inputs (the
kernel's minimum); only CFG-Zero*/rescale (a reduction, then an elementwise pass) leave XLA room
to do worse.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jdpt.guidance.cfg import cfg, cfg_zero_star, register_combine_kernel, rescale_guided
from jdpt.guidance.perturbation import pag

Array = jax.Array

RULES = ("cfg", "cfg_zero_star", "pag", "seg")
IMPLS = ("xla", "pallas")
EPS = 1e-8  # CFG-Zero*'s denominator guard (the authors' and diffusers' value)


# --------------------------------------------------------------------------------------------
# Validation shared by both implementations
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Which branch sits at which index of the stack."""

    k: int
    uncond: int | None
    cond: int
    perturbed: int | None


def _layout(rule: str, k: int, w, s, step) -> _Layout:
    """Check ``rule``'s arguments against the number ``k`` of stacked branches."""
    if rule not in RULES:
        raise ValueError(f"unknown guidance rule {rule!r}; choose one of {RULES}")
    if rule in ("cfg", "cfg_zero_star"):
        if w is None:
            raise ValueError(f"rule {rule!r} needs the CFG scale w")
        if s is not None:
            raise ValueError(f"rule {rule!r} takes no perturbation scale s (got s={s!r}); use rule 'pag' or 'seg'")
        if rule == "cfg_zero_star" and step is None:
            raise ValueError("rule 'cfg_zero_star' needs the step index (step=..., 0 first) for zero-init")
        expected, layout = 2, _Layout(2, 0, 1, None)
    else:
        if s is None:
            raise ValueError(f"rule {rule!r} needs the perturbation scale s")
        expected, layout = (3, _Layout(3, 0, 1, 2)) if w is not None else (2, _Layout(2, None, 0, 1))
    if rule != "cfg_zero_star" and step is not None:
        raise ValueError(f"step only applies to rule 'cfg_zero_star' (zero-init); got rule {rule!r}")
    if k != expected:
        branches = {"cfg": "[uncond, cond]", "cfg_zero_star": "[uncond, cond]"}.get(
            rule, "[uncond, cond, perturbed] (w given)" if w is not None else "[cond, perturbed] (w=None)")
        raise ValueError(f"rule {rule!r} expects K={expected} stacked predictions {branches}; got K={k}")
    return layout


def _check_scalar(name: str, value) -> None:
    if value is not None and jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar (traced is fine); got shape {jnp.shape(value)}")


def _as_branches(predictions: Array | Sequence[Array]) -> tuple[Array | None, tuple[Array, ...] | None, int,
                                                                  tuple[int, ...], jnp.dtype]:
    """(stacked ``[K, B, ...]`` or None, sequence of K ``[B, ...]`` or None, K, per-branch shape, dtype)."""
    if isinstance(predictions, (list, tuple)):
        branches = tuple(jnp.asarray(p) for p in predictions)
        if not branches:
            raise ValueError("guidance_combine got an empty sequence of predictions")
        shapes = {tuple(p.shape) for p in branches}
        dtypes = {jnp.dtype(p.dtype) for p in branches}
        if len(shapes) != 1 or len(dtypes) != 1:
            raise ValueError(
                "the K predictions must share shape and dtype; got "
                + ", ".join(f"{tuple(p.shape)} {jnp.dtype(p.dtype).name}" for p in branches)
            )
        stacked, shape = None, branches[0].shape
        k = len(branches)
    else:
        stacked = jnp.asarray(predictions)
        if stacked.ndim < 3:
            raise ValueError(f"predictions must be stacked [K, B, ...] (at least 3 dims); got shape {stacked.shape}")
        branches, shape, k = None, stacked.shape[1:], stacked.shape[0]
    dtype = jnp.dtype((stacked if stacked is not None else branches[0]).dtype)
    if len(shape) < 2:
        raise ValueError(f"each prediction must be [B, ...] with at least one feature dim; got shape {tuple(shape)}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"predictions must be floating point (bf16, fp16, fp32); got {dtype.name}")
    return stacked, branches, k, tuple(shape), dtype


def _static_zero(rescale) -> bool:
    """True when rescale is statically off (a Python 0): then no statistics are computed."""
    return isinstance(rescale, (int, float)) and rescale == 0


# --------------------------------------------------------------------------------------------
# Plain-JAX reference
# --------------------------------------------------------------------------------------------


def guidance_combine_reference(
    predictions: Array | Sequence[Array],
    rule: str,
    *,
    w: float | Array | None = None,
    s: float | Array | None = None,
    step: int | Array | None = None,
    zero_steps: int | Array = 1,
    rescale: float | Array = 0.0,
    out_dtype=None,
) -> Array:
    """The plain-JAX semantics of :func:`guidance_combine`: the ``jdpt.guidance`` rules
    (:func:`~jdpt.guidance.cfg.cfg`, :func:`~jdpt.guidance.cfg.cfg_zero_star`,
    :func:`~jdpt.guidance.perturbation.pag`, :func:`~jdpt.guidance.cfg.rescale_guided`) in fp32,
    cast to ``out_dtype`` (default: the input dtype). Arguments as :func:`guidance_combine`.
    """
    stacked, branches, k, _, dtype = _as_branches(predictions)
    lay = _layout(rule, k, w, s, step)
    for name, value in (("w", w), ("s", s), ("step", step), ("zero_steps", zero_steps), ("rescale", rescale)):
        _check_scalar(name, value)
    p = list(branches) if branches is not None else [stacked[i] for i in range(k)]
    e_c = p[lay.cond]
    if rule == "cfg":
        out = cfg(p[lay.uncond], e_c, w, rescale)
    elif rule == "cfg_zero_star":
        out = cfg_zero_star(p[lay.uncond], e_c, w, step, zero_steps, rescale)
    else:
        out = pag(e_c, p[lay.perturbed], s, e_u=None if lay.uncond is None else p[lay.uncond],
                  w=1.0 if w is None else w)
        out = rescale_guided(out, e_c.astype(jnp.float32), rescale)
    return out.astype(dtype if out_dtype is None else out_dtype)


# --------------------------------------------------------------------------------------------
# Pallas kernels
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Static:
    """Static configuration of one kernel call (hashable: a jit static argument)."""

    rule: str
    layout: _Layout
    stacked: bool  # one [K, B, N] operand (True) or K [B, N] operands
    n: int  # elements per sample
    block: int
    rescale: bool  # rescale is not statically zero
    out_dtype: str
    interpret: bool

    @property
    def blocks(self) -> int:
        return -(-self.n // self.block)

    @property
    def stats(self) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
        """(index pairs (k, l) of the inner products, indices k of the sums) the rule needs."""
        lay = self.layout
        if self.rescale:  # the full Gram matrix and the sums: std of the guided output and of cond
            return tuple((i, j) for i in range(lay.k) for j in range(i, lay.k)), tuple(range(lay.k))
        if self.rule == "cfg_zero_star":
            return ((lay.cond, lay.uncond), (lay.uncond, lay.uncond)), ()
        return (), ()


def _operand_specs(cfg: _Static, indices: Sequence[int]):
    """BlockSpecs over the grid (B, blocks) reading branch ``k``'s ``[block]`` slice of sample b."""
    if cfg.stacked:
        return [pl.BlockSpec((None, None, cfg.block), lambda b, i, k=k: (k, b, i)) for k in indices]
    return [pl.BlockSpec((None, cfg.block), lambda b, i: (b, i)) for _ in indices]


def _stats_kernel(*refs, cfg: _Static, used: tuple[int, ...]):
    """Partial fp32 statistics of one (sample, block) program.

    refs: one ``[block]`` ref per branch in ``used``, then one scalar output per inner product
    and per sum of :attr:`_Static.stats`. The tail of the last block is masked (its contents are
    undefined: nothing is padded).
    """
    pairs, sums = cfg.stats
    ins, outs = refs[:len(used)], refs[len(used):]
    valid = pl.program_id(1) * cfg.block + jnp.arange(cfg.block) < cfg.n
    x = {k: jnp.where(valid, ref[...].astype(jnp.float32), 0.0) for k, ref in zip(used, ins)}
    for out, (i, j) in zip(outs, pairs):
        out[...] = jnp.sum(x[i] * x[j])
    for out, i in zip(outs[len(pairs):], sums):
        out[...] = jnp.sum(x[i])


def _combine_kernel(*refs, cfg: _Static):
    """``out = sum_k c[b, k] * p_k`` for one (sample, block) program; refs: K ``[block]``
    predictions, K scalar coefficients, the ``[block]`` output."""
    k = cfg.layout.k
    ins, coefs, out = refs[:k], refs[k:2 * k], refs[2 * k]
    acc = coefs[0][...] * ins[0][...].astype(jnp.float32)
    for x, c in zip(ins[1:], coefs[1:]):
        acc = acc + c[...] * x[...].astype(jnp.float32)
    out[...] = acc.astype(out.dtype)


def _statistics(operands: tuple[Array, ...], cfg: _Static) -> dict:
    """``{(k, l): <p_k, p_l> [B], k: sum p_k [B]}`` fp32 (the reduction kernel, then a sum over blocks)."""
    pairs, sums = cfg.stats
    used = tuple(sorted({i for pair in pairs for i in pair} | set(sums)))
    batch = operands[0].shape[1] if cfg.stacked else operands[0].shape[0]
    args = operands * len(used) if cfg.stacked else tuple(operands[k] for k in used)
    partial = pl.pallas_call(
        functools.partial(_stats_kernel, cfg=cfg, used=used),
        out_shape=[jax.ShapeDtypeStruct((batch, cfg.blocks), jnp.float32)] * (len(pairs) + len(sums)),
        grid=(batch, cfg.blocks),
        in_specs=_operand_specs(cfg, used),
        out_specs=[pl.BlockSpec((None, None), lambda b, i: (b, i))] * (len(pairs) + len(sums)),
        interpret=cfg.interpret,
        name="guidance_stats",
    )(*args)
    totals = [jnp.sum(x, axis=1) for x in partial]
    return dict(zip(pairs + sums, totals))


def _gram(stats: dict, i: int, j: int) -> Array:
    return stats[(i, j)] if (i, j) in stats else stats[(j, i)]


def _coefficients(cfg: _Static, stats: dict, batch: int, w, s, step, zero_steps, rescale) -> Array:
    """``c`` ``[B, K]`` fp32 with ``out[b] = sum_k c[b, k] p[k, b]`` (rule, rescale, zero-init)."""
    lay = cfg.layout
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    ones = jnp.ones((batch,), jnp.float32)
    c = [jnp.zeros((batch,), jnp.float32) for _ in range(lay.k)]
    if cfg.rule == "cfg":
        c[lay.uncond], c[lay.cond] = (1 - f32(w)) * ones, f32(w) * ones
    elif cfg.rule == "cfg_zero_star":
        s_star = _gram(stats, lay.cond, lay.uncond) / (_gram(stats, lay.uncond, lay.uncond) + EPS)
        c[lay.uncond], c[lay.cond] = (1 - f32(w)) * s_star, f32(w) * ones
    else:
        w_ = 1.0 if w is None else f32(w)
        if lay.uncond is not None:
            c[lay.uncond] = (1 - w_) * ones
        c[lay.cond], c[lay.perturbed] = (w_ + f32(s)) * ones, -f32(s) * ones
    c = jnp.stack(c, axis=1)
    if cfg.rescale:  # Lin et al.: g <- g (phi std(cond) / std(g) + 1 - phi), population std
        gram = jnp.stack([jnp.stack([_gram(stats, i, j) for j in range(lay.k)], -1) for i in range(lay.k)], -2)
        sums = jnp.stack([stats[i] for i in range(lay.k)], -1)
        mean_g = jnp.sum(c * sums, -1) / cfg.n
        var_g = jnp.einsum("bi,bij,bj->b", c, gram, c) / cfg.n - mean_g**2
        var_c = gram[:, lay.cond, lay.cond] / cfg.n - (sums[:, lay.cond] / cfg.n) ** 2
        ratio = jnp.sqrt(jnp.maximum(var_c, 0.0)) / jnp.sqrt(jnp.maximum(var_g, 0.0))
        phi = f32(rescale)
        c = c * (phi * ratio + 1 - phi)[:, None]
    if cfg.rule == "cfg_zero_star":
        c = jnp.where(jnp.asarray(step) < zero_steps, 0.0, c)
    return c


def _kernels(cfg: _Static, operands: tuple[Array, ...], w, s, step, zero_steps, rescale) -> Array:
    """Run both passes on ``[K, B, N]`` (stacked) or K ``[B, N]`` operands -> ``[B, N]``."""
    batch = operands[0].shape[1] if cfg.stacked else operands[0].shape[0]
    stats = _statistics(operands, cfg) if any(cfg.stats) else {}
    coef = _coefficients(cfg, stats, batch, w, s, step, zero_steps, rescale)
    k = cfg.layout.k
    args = (operands * k if cfg.stacked else operands) + (coef,) * k
    in_specs = _operand_specs(cfg, range(k)) + [
        pl.BlockSpec((None, None), lambda b, i, j=j: (b, j)) for j in range(k)]
    return pl.pallas_call(
        functools.partial(_combine_kernel, cfg=cfg),
        out_shape=jax.ShapeDtypeStruct((batch, cfg.n), jnp.dtype(cfg.out_dtype)),
        grid=(batch, cfg.blocks),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, cfg.block), lambda b, i: (b, i)),
        interpret=cfg.interpret,
        name="guidance_combine",
    )(*args)


def _reference_flat(cfg: _Static, operands: tuple[Array, ...], w, s, step, zero_steps, rescale) -> Array:
    """:func:`guidance_combine_reference` on the kernels' operands -> ``[B, N]``."""
    predictions = operands[0] if cfg.stacked else list(operands)
    return guidance_combine_reference(predictions, cfg.rule, w=w, s=s, step=step, zero_steps=zero_steps,
                                      rescale=0.0 if rescale is None else rescale, out_dtype=cfg.out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _differentiable(cfg: _Static, operands: tuple[Array, ...], w, s, step, zero_steps, rescale) -> Array:
    """The kernels, differentiable: the backward is the VJP of the plain-JAX reference (the
    combination is linear in the predictions given ``s*`` and the rescale ratio, so a backward
    kernel would save little), w.r.t. the predictions, ``w``, ``s`` and ``rescale``."""
    return _kernels(cfg, operands, w, s, step, zero_steps, rescale)


def _differentiable_fwd(cfg, operands, w, s, step, zero_steps, rescale):
    args = (operands, w, s, step, zero_steps, rescale)
    return _kernels(cfg, *args), args


def _differentiable_bwd(cfg, args, g):
    operands, w, s, step, zero_steps, rescale = args
    _, vjp = jax.vjp(lambda ops, w, s, rescale: _reference_flat(cfg, ops, w, s, step, zero_steps, rescale),
                     operands, w, s, rescale)
    d_operands, d_w, d_s, d_rescale = vjp(g)
    return d_operands, d_w, d_s, None, None, d_rescale


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)


@functools.partial(jax.jit, static_argnums=(0,))
def _apply(cfg: _Static, operands: tuple[Array, ...], w, s, step, zero_steps, rescale) -> Array:
    """Jitted entry (eager callers reuse the compiled kernels)."""
    return _differentiable(cfg, operands, w, s, step, zero_steps, rescale)


def _pick_block(n: int, block: int | None) -> int:
    if block is None:
        return min(2048, max(16, pl.next_power_of_2(n)))
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16 (Triton tiles); got {block}")
    return block


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def guidance_combine(
    predictions: Array | Sequence[Array],
    rule: str,
    *,
    w: float | Array | None = None,
    s: float | Array | None = None,
    step: int | Array | None = None,
    zero_steps: int | Array = 1,
    rescale: float | Array = 0.0,
    impl: str = "xla",
    out_dtype=None,
    block: int | None = None,
    interpret: bool | None = None,
) -> Array:
    """Combine the branch predictions of a guided step (CFG / CFG-Zero* / PAG / SEG).

    Args:
        predictions: ``[K, B, ...]`` stacked branch-major, or a sequence of K ``[B, ...]`` arrays
            (same shape and dtype; bf16, fp16 or fp32). Branches: ``"cfg"``, ``"cfg_zero_star"``:
            ``[uncond, cond]``; ``"pag"``/``"seg"``: ``[uncond, cond, perturbed]`` with ``w``,
            ``[cond, perturbed]`` with ``w=None``.
        rule: one of ``"cfg"``, ``"cfg_zero_star"``, ``"pag"``, ``"seg"``.
        w: CFG scale (diffusers' convention, ``w = 1`` is the conditional prediction); scalar.
        s: PAG/SEG perturbation scale; scalar.
        step: ``"cfg_zero_star"`` only: int step index, 0 first; the output is 0 while
            ``step < zero_steps`` (``zero_steps`` default 1 = only the first step).
        rescale: guidance rescale ``phi`` (Lin et al. 2024; 0 off). A traced value always
            computes the statistics, as :func:`jdpt.guidance.cfg.rescale_guided` does.
        impl: ``"xla"`` (plain JAX, :func:`guidance_combine_reference`) or ``"pallas"``.
        out_dtype: output dtype (default: the predictions'); arithmetic is fp32 either way.
        block: Pallas elements per program (power of two >= 16; default min(2048, N)).
        interpret: Pallas interpret mode; default: on the CPU backend.

    Returns:
        ``[B, ...]`` guided prediction in ``out_dtype``.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown guidance_combine impl {impl!r}; choose one of {IMPLS}")
    if impl == "xla":
        return guidance_combine_reference(predictions, rule, w=w, s=s, step=step, zero_steps=zero_steps,
                                          rescale=rescale, out_dtype=out_dtype)
    stacked, branches, k, shape, dtype = _as_branches(predictions)
    layout = _layout(rule, k, w, s, step)
    for name, value in (("w", w), ("s", s), ("step", step), ("zero_steps", zero_steps), ("rescale", rescale)):
        _check_scalar(name, value)
    batch, n = shape[0], 1
    for d in shape[1:]:
        n *= d
    if n == 0 or batch == 0:
        raise ValueError(f"predictions must be non-empty; got per-branch shape {shape}")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    cfg = _Static(rule=rule, layout=layout, stacked=stacked is not None, n=n, block=_pick_block(n, block),
                  rescale=not _static_zero(rescale), interpret=bool(interpret),
                  out_dtype=jnp.dtype(dtype if out_dtype is None else out_dtype).name)
    operands = (stacked.reshape(k, batch, n),) if stacked is not None else tuple(p.reshape(batch, n) for p in branches)
    out = _apply(cfg, operands, w, s, step, zero_steps, None if _static_zero(rescale) else rescale)
    return out.reshape(shape)


def combine_bytes(k: int, batch: int, n: int, dtype, out_dtype=None, reduction_reads: int = 0) -> int:
    """Minimal HBM traffic of a combine: read K predictions (+ ``reduction_reads`` of them again
    for the statistics pass) and write one output of ``[B, N]``."""
    item = jnp.dtype(dtype).itemsize
    out_item = jnp.dtype(dtype if out_dtype is None else out_dtype).itemsize
    return (k + reduction_reads) * batch * n * item + batch * n * out_item


__all__ = ["RULES", "guidance_combine", "guidance_combine_reference", "combine_bytes"]


register_combine_kernel(guidance_combine)
