"""Logical axis names -> mesh axes: one rules table places every model's parameters.

Parameters carry logical axes (``jdpt.models.layers``). A rule ``(logical, mesh_axis)`` shards
that dimension over ``mesh_axis``. A dimension stays replicated when its rule names an axis the
mesh lacks, an axis of size 1, an axis already used by another dimension of the same
parameter, or an axis whose size does not divide the dimension (e.g. a 3-channel bias).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | None]]

# FSDP over the model width, tensor parallelism over heads / MLP hidden / vocabulary.
DEFAULT_RULES: Rules = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "fsdp"),
    ("conv_in", None),
)


def partition_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                   rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """The ``PartitionSpec`` of one parameter with logical axes ``logical`` and ``shape``."""
    if not logical:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical, shape, strict=True):
        axis = table.get(name) if name is not None else None
        if (axis is None or axis not in mesh.shape or mesh.shape[axis] == 1 or axis in used
                or dim % mesh.shape[axis]):
            spec.append(None)
            continue
        used.add(axis)
        spec.append(axis)
    return PartitionSpec(*spec)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """A ``NamedSharding`` for every variable of ``state`` (same tree structure)."""

    def one(var: nnx.Variable):
        value = var.get_value()
        spec = partition_spec(var.get_metadata().get("out_sharding"), value.shape, mesh, rules)
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
