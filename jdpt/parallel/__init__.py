"""Meshes, sharding rules, sharded train steps (jit and pmap) and explicit collectives."""

from jdpt.parallel.collectives import chunked, group_normalize
from jdpt.parallel.mesh import (AXES, BATCH_AXES, DEFAULT_RULES, RULES, Rules, batch_sharding,
                                compute_rules, make_mesh, param_shardings, partition_spec,
                                shard_batch, shard_params)
from jdpt.parallel.step import Frozen, Objective, TrainState, make_train_step, pmap_step

__all__ = [
    "AXES",
    "BATCH_AXES",
    "DEFAULT_RULES",
    "RULES",
    "Frozen",
    "Objective",
    "Rules",
    "TrainState",
    "batch_sharding",
    "chunked",
    "compute_rules",
    "group_normalize",
    "make_mesh",
    "make_train_step",
    "param_shardings",
    "partition_spec",
    "pmap_step",
    "shard_batch",
    "shard_params",
]
