"""Advantages of online RL objectives: rewards normalised per prompt (DDPO) or per group (Flow-GRPO).

Rewards come from host-side scorers (the Shapes verifier, JPEG size: NumPy); the online step
(:func:`jdpt.train.online.make_online_step`) sends them ``[B]`` back to the devices, where the
trajectories stayed, and computes advantages there inside ``jit``: :func:`device_group_advantages`
(Flow-GRPO, DiffusionNFT) and :class:`PerPromptStatTracker` (DDPO; a pure function over a table
kept in the train state). Prompts are keyed by int ids (:func:`prompt_ids`). The NumPy
:func:`group_advantages` is the host version; :func:`sharded_group_advantages` the same numbers
for rewards split over a mesh (:func:`jdpt.parallel.collectives.group_normalize` for per-group
statistics).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jdpt.parallel.collectives import group_normalize


def check_rewards(rewards) -> np.ndarray:
    """``rewards`` as float64 ``[B]``; ValueError when empty, not 1-D, or not finite."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or r.shape[0] == 0:
        raise ValueError(f"rewards must be a non-empty 1-D array [B]; got shape {r.shape}")
    bad = np.flatnonzero(~np.isfinite(r))
    if bad.size:
        raise ValueError(f"rewards must be finite; got {r[bad[:4]].tolist()} at rows {bad[:4].tolist()}: "
                         "fix or drop those samples before computing advantages")
    return r


def _group_ids(groups, b: int) -> np.ndarray:
    """Group size ``G`` (consecutive runs) or ``[B]`` labels (any hashables) -> ids ``[B]`` in ``[0, B)``."""
    if np.ndim(groups) == 0:
        g = int(groups)
        if g < 1 or b % g:
            raise ValueError(f"group size {groups} must be >= 1 and divide the batch size {b} "
                             "(a rollout samples G images per prompt, consecutively)")
        return np.arange(b) // g
    labels = np.asarray(groups)
    if labels.shape != (b,):
        raise ValueError(f"group labels must be [B] = [{b}] (one per reward); got shape {labels.shape}")
    return np.unique(labels, return_inverse=True)[1].reshape(b)


def group_advantages(rewards, groups, *, global_std: bool = True, eps: float = 1e-4) -> np.ndarray:
    """Flow-GRPO's advantages ``(R_i - mean_group) / (std + eps)`` (flow_grpo ``stat_tracking.py``).

    Args:
        rewards: ``[B]`` finite rewards.
        groups: a group size ``G`` (samples ``[kG, (k+1)G)`` share a prompt) or ``[B]`` labels
            (prompt strings or ids).
        global_std: ``std`` over the whole batch (Flow-GRPO's default) instead of per group.
        eps: added to the std.
    Returns:
        ``[B]`` float32 advantages; they sum to 0 within every group. Population std (``ddof=0``).
    """
    r = check_rewards(rewards)
    ids = _group_ids(groups, r.shape[0])
    count = np.bincount(ids)
    centered = r - (np.bincount(ids, r) / count)[ids]
    if global_std:
        std = r.std()
    else:
        std = np.sqrt(np.bincount(ids, centered**2) / count)[ids]
    return (centered / (std + eps)).astype(np.float32)


def sharded_group_advantages(rewards: jax.Array, groups: int | jax.Array, mesh: Mesh, *,
                             global_std: bool = True, eps: float = 1e-4) -> jax.Array:
    """:func:`group_advantages` for rewards ``[B]`` on ``mesh``, split over its batch axes.

    Per-group std (``global_std=False``): :func:`jdpt.parallel.collectives.group_normalize`
    (explicit ``psum`` of each group's sums over the devices). ``global_std=True``: group means by
    segment sums and the batch std by a plain reduction inside one ``jit``; XLA's partitioner
    inserts the all-reduces. ``groups``: a group size ``G`` or integer ids ``[B]`` in ``[0, B)``.

    Returns:
        ``[B]`` float32, split like ``rewards``. NaN rewards raise a ValueError (checked on host).
    """
    r = jnp.asarray(rewards, jnp.float32)
    if r.ndim != 1 or r.shape[0] == 0:
        raise ValueError(f"rewards must be a non-empty 1-D array [B]; got shape {tuple(r.shape)}")
    if not bool(jnp.isfinite(r).all()):
        raise ValueError("rewards must be finite; fix or drop the NaN/inf samples before computing advantages")
    b = r.shape[0]
    ids = jnp.asarray(_group_ids(groups, b) if np.ndim(groups) == 0 else groups)
    if ids.shape != (b,) or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"group ids must be integers [B] = [{b}]; got {ids.dtype}{tuple(ids.shape)}")
    if not isinstance(ids, jax.core.Tracer) and (int(ids.min()) < 0 or int(ids.max()) >= b):
        raise ValueError(f"group ids must lie in [0, {b}); got [{int(ids.min())}, {int(ids.max())}]")
    if global_std:
        return _global_std_advantages(r, ids, eps)
    return _per_group_advantages(r, ids, mesh, eps)


@jax.jit
def _global_std_advantages(r: jax.Array, ids: jax.Array, eps: float) -> jax.Array:
    return device_group_advantages(r, ids, global_std=True, eps=eps)


@functools.partial(jax.jit, static_argnames=("mesh", "eps"))
def _per_group_advantages(r: jax.Array, ids: jax.Array, mesh: Mesh, eps: float) -> jax.Array:
    return group_normalize(r, ids, mesh, eps=eps)


def prompt_ids(texts) -> np.ndarray:
    """Stable int32 ids ``[B]`` of prompt texts (31 bits of their BLAKE2b hash): the keys of
    :class:`PerPromptStatTracker` and of group advantages. Distinct texts collide with
    probability about ``n^2 / 2^32`` for ``n`` distinct prompts."""
    return np.asarray([int.from_bytes(hashlib.blake2b(str(t).encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF
                       for t in texts], np.int32).reshape(len(texts))


def _dense_ids(ids: jax.Array) -> jax.Array:
    """Arbitrary int ids ``[B]`` -> ``[B]`` labels in ``[0, B)`` (equal ids, equal labels)."""
    return jnp.unique(ids, size=ids.shape[0], fill_value=jnp.iinfo(jnp.int32).max, return_inverse=True)[1].reshape(-1)


def device_group_advantages(rewards: jax.Array, ids: jax.Array, *, global_std: bool = True,
                            eps: float = 1e-4) -> jax.Array:
    """:func:`group_advantages` inside ``jit`` (no host checks): rewards ``[B]`` grouped by
    int ids ``[B]`` (e.g. :func:`prompt_ids`); segment sums, which XLA partitions over a mesh."""
    r = jnp.asarray(rewards, jnp.float32)
    labels = _dense_ids(jnp.asarray(ids, jnp.int32))
    b = r.shape[0]
    count = jnp.maximum(jax.ops.segment_sum(jnp.ones_like(r), labels, num_segments=b), 1.0)
    centered = r - (jax.ops.segment_sum(r, labels, num_segments=b) / count)[labels]
    if global_std:
        std = r.std()
    else:
        std = jnp.sqrt(jax.ops.segment_sum(centered**2, labels, num_segments=b) / count)[labels]
    return centered / (std + eps)


@dataclasses.dataclass(frozen=True)
class PerPromptStatTracker:
    """DDPO's per-prompt reward normaliser (Black et al., ICLR 2024; ddpo-pytorch
    ``stat_tracking.py``) as a pure function over an on-device table, so that its state lives in
    the train state and is checkpointed: each prompt keeps its last ``buffer_size`` rewards; a
    reward's advantage is ``(r - mean_p) / (std_p + eps)`` over its prompt's buffer (this batch's
    rewards included) once that holds ``min_count`` rewards, else over the current batch's rewards.

    Defaults: ``per_prompt_stat_tracking`` ``buffer_size=16, min_count=16``. ``capacity`` (jdpt's:
    the reference keeps an unbounded dict) is how many distinct prompts the table holds; prompts
    arriving when it is full are normalised by the batch and counted in ``tracker_overflow``.
    """

    buffer_size: int = 16
    min_count: int = 16
    capacity: int = 4096
    eps: float = 1e-6

    def __post_init__(self):
        if self.buffer_size < 1 or self.min_count < 1 or self.capacity < 1:
            raise ValueError(f"PerPromptStatTracker needs buffer_size, min_count and capacity >= 1; got "
                             f"{self.buffer_size}, {self.min_count}, {self.capacity}")

    def init(self) -> dict[str, jax.Array]:
        """The empty table: ``keys [capacity]`` (-1: free), ``rewards [capacity, buffer_size]``
        (a ring buffer per prompt), ``count [capacity]`` (rewards ever added), ``overflow``."""
        return {"keys": jnp.full((self.capacity,), -1, jnp.int32),
                "rewards": jnp.zeros((self.capacity, self.buffer_size), jnp.float32),
                "count": jnp.zeros((self.capacity,), jnp.int32), "overflow": jnp.zeros((), jnp.int32)}

    def update(self, state: dict[str, jax.Array], ids: jax.Array,
               rewards: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
        """Add this batch's rewards ``[B]`` under their prompts' int ids ``[B]`` (>= 0, e.g.
        :func:`prompt_ids`); return the new table and the advantages ``[B]`` float32. Jittable."""
        ids, r = jnp.asarray(ids, jnp.int32), jnp.asarray(rewards, jnp.float32)
        b, c, s = r.shape[0], self.capacity, self.buffer_size
        keys, table, count = state["keys"], state["rewards"], state["count"]
        unique, inverse = jnp.unique(ids, size=b, fill_value=-1, return_inverse=True)
        inverse = inverse.reshape(-1)
        valid = unique >= 0
        match = keys[None, :] == unique[:, None]  # [b, c]
        found = valid & match.any(axis=1)  # padding (-1) matches the free slots: never "found"
        new = valid & ~found
        free = jnp.nonzero(keys < 0, size=c, fill_value=c)[0]
        rank = jnp.cumsum(new) - 1
        slot = jnp.where(found, jnp.argmax(match, axis=1), jnp.where(new, free[jnp.minimum(rank, c - 1)], c))
        slot = jnp.where(new & (rank >= jnp.sum(keys < 0)), c, slot)  # no free slot left: c = none
        keys = keys.at[slot].set(unique, mode="drop")
        row_slot = slot[inverse]
        same = ids[:, None] == ids[None, :]
        order = jnp.sum(jnp.tril(same, -1), axis=1)  # earlier rows of the same prompt
        n = jnp.sum(same, axis=1)
        keep = order >= n - s  # a deque of maxlen s keeps the last s
        pos = (count[jnp.minimum(row_slot, c - 1)] + order) % s
        table = table.at[jnp.where(keep, row_slot, c), pos].set(r, mode="drop")
        added = jax.ops.segment_sum(jnp.ones_like(ids), row_slot, num_segments=c + 1)[:c]
        count = count + added
        length = jnp.minimum(count, s)[jnp.minimum(row_slot, c - 1)]
        buffers = table[jnp.minimum(row_slot, c - 1)]  # [B, s]
        filled = jnp.arange(s)[None, :] < length[:, None]
        mean_p = jnp.sum(jnp.where(filled, buffers, 0), axis=1) / jnp.maximum(length, 1)
        std_p = jnp.sqrt(jnp.sum(jnp.where(filled, (buffers - mean_p[:, None]) ** 2, 0), axis=1) / jnp.maximum(length, 1))
        use = (row_slot < c) & (length >= self.min_count)
        mean = jnp.where(use, mean_p, r.mean())
        std = jnp.where(use, std_p, r.std())
        overflow = state["overflow"] + jnp.sum(row_slot >= c).astype(jnp.int32)
        return {"keys": keys, "rewards": table, "count": count, "overflow": overflow}, (r - mean) / (std + self.eps)
