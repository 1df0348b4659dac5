"""What the perturbed-attention forward (:mod:`jdpt.kernels.attention`) and backward
(:mod:`jdpt.kernels.attention_backward`) kernels share: the static call configuration, the
fp32-accumulating block products, the text-span and block-range helpers, the BlockSpecs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

Array = jax.Array

# Finite "minus infinity": masked logits and the running max start here, so that fully masked
# rows give exp(NEG - NEG) * 0 = 0 instead of NaN.
NEG = -1e30


@dataclasses.dataclass(frozen=True)
class Static:
    """Static configuration of one kernel call (hashable: a ``custom_vjp`` non-diff argument)."""

    scale: float
    q_len: int  # true (unpadded) number of queries
    q_len_padded: int  # queries after padding to the block size
    kv_len: int  # true number of keys
    block_q: int
    block_k: int
    text: tuple[int, int] | None  # joint text span, None for identity PAG
    causal: bool
    perturbed: bool  # a head_weight is given
    skip: bool  # may skip the normal attention of u == 1 query blocks (inference only)
    interpret: bool

    def key_ranges(self) -> tuple[tuple[int, int] | None, tuple[tuple[int, int], ...]]:
        """(text key range or None, image key ranges): half-open column intervals."""
        if self.text is None or self.text[1] == 0:
            return None, ((0, self.kv_len),)
        lo, hi = self.text[0], self.text[0] + self.text[1]
        image = tuple(r for r in ((0, lo), (hi, self.kv_len)) if r[0] < r[1])
        return (lo, hi), image


def dot_t(a: Array, b: Array) -> Array:
    """``a @ b.T`` with fp32 accumulation: ``[M, D] x [N, D] -> [M, N]``."""
    return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot(a: Array, b: Array) -> Array:
    """``a @ b`` with fp32 accumulation."""
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def dot_tn(a: Array, b: Array) -> Array:
    """``a.T @ b`` with fp32 accumulation: ``[M, N] x [M, D] -> [N, D]``."""
    return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def is_text(pos: Array, cfg: Static) -> Array:
    if cfg.text is None or cfg.text[1] == 0:
        return jnp.zeros(pos.shape, bool)
    return (pos >= cfg.text[0]) & (pos < cfg.text[0] + cfg.text[1])


def block_range(lo: int, hi: int, block: int) -> tuple[int, int]:
    return lo // block, -(-hi // block)


def specs(cfg: Static, d: int, sp: int):
    """BlockSpecs over the grid (B, H, blocks) for row blocks, full K/V and per-row vectors."""
    bq = cfg.block_q
    row = pl.BlockSpec((None, None, bq, d), lambda b, h, i: (b, h, i, 0))
    full = pl.BlockSpec((None, None, sp, d), lambda b, h, i: (b, h, 0, 0))
    vec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    scalar = pl.BlockSpec((None, None), lambda b, h, i: (b, h))
    return row, full, vec, scalar
