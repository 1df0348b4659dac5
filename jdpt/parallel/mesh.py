"""Device meshes, the logical-axis rules that place parameters on them, and batch placement.

A mesh has three axes: ``data`` (replicas), ``fsdp`` (parameters, gradients and optimizer state
split ZeRO-3 style; also splits the batch) and ``tensor`` (attention heads / MLP hidden split
inside a layer). The batch dimension is split over ``("data", "fsdp")``.

Parameters carry logical axes (``jdpt.models.layers``). A rule ``(logical, mesh_axis)`` shards
that dimension over ``mesh_axis``. When several dimensions of one parameter ask for the same mesh
axis, the largest dimension gets it (ties: the first). A dimension stays replicated when its
rule names ``None``, an axis the mesh lacks, an axis of size 1, an axis already taken by another
dimension of the same parameter, or an axis whose size does not divide the dimension (e.g. a
3-channel bias). Presets in :data:`RULES`: ``"dp"`` (all replicated), ``"fsdp"`` (every named
dimension may go to ``fsdp``: the largest one does) and ``"fsdp_tp"`` (:data:`DEFAULT_RULES`).
Every function taking ``rules`` accepts a preset name or a table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | None]]

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_AXES = ("embed", "heads", "mlp", "vocab", "conv_in", "conv_out")

RULES: dict[str, Rules] = {
    # Data parallel: every replica holds every parameter.
    "dp": tuple((name, None) for name in LOGICAL_AXES),
    # ZeRO-3: each parameter split along its largest named dimension over "fsdp".
    "fsdp": tuple((name, "fsdp") for name in LOGICAL_AXES),
    # FSDP over the model width, tensor parallelism over heads / MLP hidden / vocabulary.
    "fsdp_tp": (
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("conv_out", "fsdp"),
        ("conv_in", None),
    ),
}
DEFAULT_RULES: Rules = RULES["fsdp_tp"]


def make_mesh(*, data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``("data", "fsdp", "tensor")`` mesh of ``Auto`` axes over ``devices``.

    ``devices`` defaults to ``jax.devices()``, every device of every process (call
    ``jax.distributed.initialize()`` first on a multi-host job). One size may be ``-1``: it takes
    the devices the other two leave.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    free = [name for name, size in sizes.items() if size == -1]
    bad = {name: size for name, size in sizes.items() if size < 1 and size != -1}
    if bad or len(free) > 1:
        raise ValueError(f"mesh sizes {sizes}: each must be >= 1, and at most one may be -1 (the rest)")
    if free:
        known = math.prod(size for size in sizes.values() if size != -1)
        if len(devices) % known:
            raise ValueError(f"mesh sizes {sizes}: {known} does not divide the {len(devices)} devices; "
                             f"choose sizes whose product divides {len(devices)}")
        sizes[free[0]] = len(devices) // known
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh sizes data={sizes['data']} x fsdp={sizes['fsdp']} x tensor={sizes['tensor']} = "
            f"{math.prod(sizes.values())}, but there are {len(devices)} devices; make the product "
            f"{len(devices)} or set one size to -1"
        )
    return jax.make_mesh(tuple(sizes.values()), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         devices=devices)


def _table(rules: Rules | str) -> dict[str, str | None]:
    if isinstance(rules, str):
        if rules not in RULES:
            raise ValueError(f"unknown rules preset {rules!r}; use one of {sorted(RULES)} or a table")
        rules = RULES[rules]
    return dict(rules)


def compute_rules(rules: Rules | str) -> Rules:
    """``rules`` with every dimension whole along ``fsdp``: the layout parameters are used in.

    ZeRO-3 stores parameters split over ``fsdp`` and gathers them for the forward/backward
    (their gradients are reduce-scattered back). Leaving the choice to the SPMD partitioner
    instead gave wrong gradients with jax/jaxlib 0.12.0.1 (CPU) on a mesh whose three axes are
    all > 1: ``grad(sum(sin(x @ W1 @ W2)))`` with ``W: P("fsdp", "tensor")`` and
    ``x: P(("data", "fsdp"))`` on a 2x2x2 mesh.
    """
    return tuple((name, None if axis == "fsdp" else axis) for name, axis in _table(rules).items())


def partition_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                   rules: Rules | str = DEFAULT_RULES) -> PartitionSpec:
    """The ``PartitionSpec`` of one parameter with logical axes ``logical`` and ``shape``."""
    if not logical:
        return PartitionSpec()
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not fit a parameter of shape {tuple(shape)}")
    table = _table(rules)
    spec: list[str | None] = [None] * len(shape)
    used: set[str] = set()
    for i in sorted(range(len(shape)), key=lambda i: -shape[i]):  # largest dimension first
        name = logical[i]
        axis = table.get(name) if name is not None else None
        if (axis is None or axis not in mesh.shape or mesh.shape[axis] == 1 or axis in used
                or shape[i] % mesh.shape[axis]):
            continue
        used.add(axis)
        spec[i] = axis
    return PartitionSpec(*spec)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules | str = DEFAULT_RULES) -> Any:
    """A ``NamedSharding`` for every leaf of ``tree`` (same structure).

    ``tree`` is an ``nnx.State`` or any pytree holding ``nnx.Variable``s (an optax state built
    from one keeps its variables): a variable is placed by its logical axes, any other array
    leaf is replicated.
    """

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            value = leaf.get_value()
            spec = partition_spec(leaf.get_metadata().get("out_sharding"), value.shape, mesh, rules)
            return leaf.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_params(tree: Any, mesh: Mesh, rules: Rules | str = DEFAULT_RULES) -> Any:
    """``tree`` (an ``nnx.State``, an optax state, ...) placed on ``mesh`` by
    :func:`param_shardings`. Arrays already in place are not copied."""
    return jax.device_put(tree, param_shardings(tree, mesh, rules))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch dimension is split over (those of ``BATCH_AXES`` it has)."""
    return tuple(axis for axis in BATCH_AXES if axis in mesh.shape)


def batch_shards(mesh: Mesh) -> int:
    """How many pieces the batch dimension is cut into (``data x fsdp``)."""
    return math.prod(mesh.shape[axis] for axis in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``("data", "fsdp")``, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def check_batch(batch: Any, multiple: int, what: str) -> int:
    """The common leading size of every leaf of ``batch``; raises unless it divides by
    ``multiple`` (``what`` explains the multiple in the message)."""
    sizes = {tuple(path): leaf.shape[0] if leaf.ndim else None
             for path, leaf in jax.tree_util.tree_flatten_with_path(batch)[0]}
    if not sizes:
        raise ValueError("the batch has no arrays")
    if len(set(sizes.values())) != 1 or None in sizes.values():
        shown = {jax.tree_util.keystr(path): size for path, size in sizes.items()}
        raise ValueError(
            f"every batch array needs the same leading (batch) dimension; got {shown}. Keep "
            "per-run constants (position ids, schedules) in the objective, not in the batch"
        )
    size = next(iter(sizes.values()))
    if size % multiple:
        raise ValueError(f"batch size {size} is not divisible by {multiple} ({what}); "
                         f"use a batch size that is a multiple of {multiple}")
    return size


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Per-process batch ``[B_local, ...]`` leaves -> global arrays split over ``("data", "fsdp")``.

    On one host ``B_local`` is the global batch; on several, each process passes its own rows
    and ``jax.make_array_from_process_local_data`` assembles the global array
    ``[B_local * process_count, ...]``.
    """
    n, hosts = batch_shards(mesh), jax.process_count()
    # The global batch B_local * hosts must split into the mesh's n batch shards.
    check_batch(batch, n // math.gcd(n, hosts), f"the mesh cuts the global batch into {n} "
                f"pieces (data x fsdp) and there are {hosts} processes")
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
