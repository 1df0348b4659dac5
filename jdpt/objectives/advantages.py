"""Advantages of online RL objectives: rewards normalised per prompt (DDPO) or per group (Flow-GRPO).

Rewards come from host-side scorers (the Shapes verifier, JPEG size: NumPy), so the usual place
for this is the host, between a rollout and its update: :func:`group_advantages` (Flow-GRPO) and
:class:`PerPromptStatTracker` (DDPO) are NumPy. When the rewards already sit on the devices, split
over the batch axes with one prompt's group spread over several devices,
:func:`sharded_group_advantages` computes the same numbers there
(:func:`jdpt.parallel.collectives.group_normalize` for per-group statistics).
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Hashable, Sequence

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
    b = r.shape[0]
    count = jnp.maximum(jax.ops.segment_sum(jnp.ones_like(r), ids, num_segments=b), 1.0)
    centered = r - (jax.ops.segment_sum(r, ids, num_segments=b) / count)[ids]
    return centered / (r.std() + eps)


@functools.partial(jax.jit, static_argnames=("mesh", "eps"))
def _per_group_advantages(r: jax.Array, ids: jax.Array, mesh: Mesh, eps: float) -> jax.Array:
    return group_normalize(r, ids, mesh, eps=eps)


class PerPromptStatTracker:
    """DDPO's per-prompt reward normaliser (Black et al., ICLR 2024; ddpo-pytorch
    ``stat_tracking.py``): each prompt keeps its last ``buffer_size`` rewards; a reward's
    advantage is ``(r - mean_p) / (std_p + 1e-6)`` over that buffer once it holds ``min_count``
    rewards, else over the current batch's rewards. Host-side and stateful (one per run).

    Defaults: ``per_prompt_stat_tracking`` ``buffer_size=16, min_count=16``.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, eps: float = 1e-6):
        if buffer_size < 1 or min_count < 1:
            raise ValueError(f"buffer_size={buffer_size} and min_count={min_count} must be >= 1")
        self.buffer_size, self.min_count, self.eps = buffer_size, min_count, eps
        self.buffers: dict[Hashable, collections.deque] = {}

    def update(self, prompts: Sequence[Hashable], rewards) -> np.ndarray:
        """Add this batch's rewards to the prompts' buffers; return their advantages ``[B]`` float32."""
        r = check_rewards(rewards)
        prompts = np.asarray(prompts)
        if prompts.shape != r.shape:
            raise ValueError(f"prompts {prompts.shape} and rewards {r.shape} must both be [B]")
        advantages = np.empty_like(r)
        for prompt in np.unique(prompts):
            rows = prompts == prompt
            buffer = self.buffers.setdefault(prompt.item(), collections.deque(maxlen=self.buffer_size))
            buffer.extend(r[rows])
            stats = np.asarray(buffer) if len(buffer) >= self.min_count else r
            advantages[rows] = (r[rows] - stats.mean()) / (stats.std() + self.eps)
        return advantages.astype(np.float32)
