"""Collectives that must be explicit (``jax.shard_map`` over the batch axes of a mesh).

- :func:`group_normalize`: per-group mean/std when a group's samples sit on several devices
  (GRPO advantages: one prompt's group of samples spread over the batch shards).
- :func:`chunked`: one batch made of chunks that each need their own attention plan (guidance
  passes over ``[uncond, cond, perturbed]``); every device runs only its own chunk's variant.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jdpt.parallel.mesh import batch_axes, check_batch


def _axes(mesh: Mesh, axis: str | Sequence[str] | None) -> tuple[tuple[str, ...], int]:
    axes = batch_axes(mesh) if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"mesh axes {missing} are not in the mesh {dict(mesh.shape)}")
    return axes, math.prod(mesh.shape[a] for a in axes)


def group_normalize(values: jax.Array, groups: int | jax.Array, mesh: Mesh, *,
                    axis: str | Sequence[str] | None = None, eps: float = 1e-4) -> jax.Array:
    """``(values - group mean) / (group std + eps)``, each group's statistics over all devices.

    Every device sums its samples' contributions per group; ``psum`` over ``axis`` gives the
    global sums (two passes: the mean, then the squared deviations). The std is the population
    std (``ddof=0``, as Flow-GRPO's ``np.std``).

    Args:
        values: ``[B]`` per-sample values, e.g. rewards; split over ``axis``.
        groups: a group size ``G`` (groups are consecutive runs of ``G`` samples) or integer
            group ids ``[B]`` in ``[0, B)`` (e.g. the prompt index of each sample).
        mesh: the device mesh.
        axis: mesh axes the batch is split over (default: its ``"data"``/``"fsdp"`` axes).
        eps: added to the std (Flow-GRPO: 1e-4).

    Returns:
        ``[B]`` float32, split over ``axis`` like ``values``.
    """
    values = jnp.asarray(values, jnp.float32)
    if values.ndim != 1:
        raise ValueError(f"values must be [B]; got shape {tuple(values.shape)}")
    b = values.shape[0]
    axes, n = _axes(mesh, axis)
    check_batch(values, n, f"the {n} devices along mesh axes {axes}")
    if np.ndim(groups) == 0:
        if groups < 1 or b % groups:
            raise ValueError(f"group size {groups} must be >= 1 and divide the batch size {b}")
        ids = jnp.arange(b) // groups
    else:
        ids = jnp.asarray(groups)
        if ids.shape != (b,) or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"group ids must be integers [B] = [{b}]; got {ids.dtype}{tuple(ids.shape)}")
        if not isinstance(ids, jax.core.Tracer) and (ids.min() < 0 or ids.max() >= b):
            raise ValueError(f"group ids must lie in [0, {b}); got [{ids.min()}, {ids.max()}]")

    def local(v, g):
        def total(x):  # per-group sums over every device
            return jax.lax.psum(jax.ops.segment_sum(x, g, num_segments=b), axes)

        count = jnp.maximum(total(jnp.ones_like(v)), 1.0)
        dev = v - (total(v) / count)[g]
        std = jnp.sqrt(total(dev**2) / count)[g]
        return dev / (std + eps)

    spec = PartitionSpec(axes)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(values, ids)


def chunked(fn: Callable[..., Any], n_chunks: int, *, mesh: Mesh | None = None,
            axis: str | Sequence[str] | None = None) -> Callable[..., Any]:
    """``run(*batch)``: ``fn(i, *chunk_i)`` on each of ``n_chunks`` equal chunks of the batch,
    outputs concatenated along the batch dimension.

    ``fn`` gets the chunk index (a Python int) so it can pick a static variant, e.g. a guidance
    pass over ``[uncond, cond, perturbed]`` inputs::

        run = chunked(lambda i, x, c: model(x, c, plans=plans[i]), 3)

    Without ``mesh`` the chunks run one after another. With ``mesh``, the batch is split over
    ``axis`` (default ``"data"``/``"fsdp"``; the device count there must be a multiple of
    ``n_chunks``) and each device runs only its chunk's ``fn`` (``lax.switch`` on its position
    inside ``shard_map``): the chunks run side by side.
    """
    if n_chunks < 1:
        raise ValueError(f"n_chunks={n_chunks} must be >= 1")
    branches = [functools.partial(fn, i) for i in range(n_chunks)]
    if mesh is None:
        def run(*batch):
            c = check_batch(batch, n_chunks, f"n_chunks={n_chunks}") // n_chunks
            outs = [branch(*jax.tree.map(lambda x: x[i * c:(i + 1) * c], batch))
                    for i, branch in enumerate(branches)]
            return jax.tree.map(lambda *xs: jnp.concatenate(xs), *outs)

        return run

    axes, n = _axes(mesh, axis)
    if n % n_chunks:
        raise ValueError(f"{n} devices along mesh axes {axes} cannot hold {n_chunks} chunks evenly; "
                         f"use a mesh whose batch axes are a multiple of {n_chunks}, or mesh=None")

    def local(*shard):
        return jax.lax.switch(jax.lax.axis_index(axes) // (n // n_chunks), branches, *shard)

    spec = PartitionSpec(axes)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec)

    def run(*batch):
        check_batch(batch, n, f"the {n} devices along mesh axes {axes}")
        return sharded(*batch)

    return run
