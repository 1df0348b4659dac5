"""Meshes, rule presets, parameter and batch placement, and the shard_map collectives."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jdpt.models.attention import AttentionPlan, attention
from jdpt.models.flux import FluxConfig, FluxTransformer
from jdpt.parallel import (DEFAULT_RULES, RULES, batch_sharding, chunked, group_normalize, make_mesh,
                           param_shardings, partition_spec, shard_batch, shard_params)

# Model width 4 x 16 = 64: every "embed"/"heads"/"mlp" dimension divides by 8.
TINY = FluxConfig(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                  num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=8,
                  axes_dims_rope=(4, 6, 6))


def random_model(config: FluxConfig, seed: int) -> FluxTransformer:
    """A Flux with every variable random, held in host (NumPy) arrays: no per-parameter compiled
    init op, and placing it on a mesh is a plain transfer (resharding device arrays on the CPU
    backend compiles one small program per array)."""
    model = nnx.eval_shape(lambda: FluxTransformer(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model)):
        var.set_value((rng.normal(size=var.get_value().shape) * 0.1).astype(np.float32))
    return model


@pytest.fixture(scope="module")
def params() -> nnx.State:
    return nnx.state(random_model(TINY, 0), nnx.Param)


def _per_device_bytes(tree) -> int:
    """Bytes device 0 holds, read from the arrays' shards."""
    device = jax.devices()[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == device)


def test_make_mesh():
    mesh = make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert dict(make_mesh(data=2, fsdp=-1, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(data=1, fsdp=8).shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    one = make_mesh(devices=jax.devices()[:1])
    assert one.devices.size == 1 and one.shape["data"] == 1


def test_make_mesh_errors():
    with pytest.raises(ValueError, match=r"data=1 x fsdp=3 x tensor=1 = 3, but there are 8 devices"):
        make_mesh(data=1, fsdp=3)
    with pytest.raises(ValueError, match=r"3 does not divide the 8 devices"):
        make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="at most one may be -1"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="must be >= 1"):
        make_mesh(tensor=0)
    with pytest.raises(ValueError, match="unknown rules preset 'zero3'"):
        partition_spec(("embed",), (8,), make_mesh(), "zero3")


def test_rule_presets(params):
    assert DEFAULT_RULES is RULES["fsdp_tp"]
    mesh = make_mesh(data=1, fsdp=4, tensor=2)

    def spec(rules, *path):
        node = param_shardings(params, mesh, rules)
        for key in path:
            node = node[key]
        return node.get_value().spec

    q = ("transformer_blocks", 0, "attn", "to_q", "kernel")  # (embed, heads) [64, 64]
    t = ("time_text_embed", "timestep_embedder", "linear_1", "kernel")  # (None, mlp) [256, 64]
    out = ("single_transformer_blocks", 0, "proj_out", "kernel")  # (mlp, embed) [320, 64]
    assert spec("dp", *q) == P(None, None) and spec("dp", *t) == P(None, None)
    assert spec("fsdp", *q) == P("fsdp", None)  # a tie: the first dimension
    assert spec("fsdp", *t) == P(None, "fsdp")
    assert spec("fsdp", *out) == P("fsdp", None)  # the largest dimension
    assert spec("fsdp_tp", *q) == P("fsdp", "tensor")
    assert spec("fsdp_tp", *out) == P("tensor", "fsdp")
    assert spec("fsdp_tp", *t) == P(None, "tensor")


def test_fsdp_bytes_per_device(params):
    replicated = _per_device_bytes(shard_params(params, make_mesh(), "dp"))
    assert replicated == sum(x.nbytes for x in jax.tree.leaves(params))
    sharded = _per_device_bytes(shard_params(params, make_mesh(data=1, fsdp=8), "fsdp"))
    assert sharded <= 0.2 * replicated, (sharded, replicated)


def test_shard_batch():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    batch = {"x": np.arange(8 * 3, dtype=np.float32).reshape(8, 3), "y": np.arange(8)}
    placed = shard_batch(batch, mesh)
    assert placed["x"].sharding == batch_sharding(mesh) == NamedSharding(mesh, P(("data", "fsdp")))
    assert {s.data.shape for s in placed["x"].addressable_shards} == {(2, 3)}  # 4 batch shards
    np.testing.assert_array_equal(placed["x"], batch["x"])
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible by 4"):
        shard_batch({"x": np.zeros((6, 3))}, mesh)
    with pytest.raises(ValueError, match="same leading"):
        shard_batch({"x": np.zeros((8, 3)), "ids": np.zeros((4, 3))}, mesh)


def _group_normalize_numpy(values, ids, eps):
    out = np.empty_like(values)
    for g in np.unique(ids):
        v = values[ids == g]
        out[ids == g] = (v - v.mean()) / (v.std() + eps)
    return out


@pytest.mark.parametrize("groups", [4, 8, "ids"])
def test_group_normalize_spans_devices(groups):
    mesh = make_mesh(data=2, fsdp=4)  # 8 batch shards of 2 samples: groups of 4 and 8 span devices
    rng = np.random.default_rng(0)
    values = rng.normal(size=16).astype(np.float32) * 3 + 1
    ids = rng.permutation(np.arange(16) % 5) if groups == "ids" else np.arange(16) // groups
    got = jax.jit(lambda v: group_normalize(v, jnp.asarray(ids) if groups == "ids" else groups, mesh))(values)
    assert got.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_allclose(got, _group_normalize_numpy(values, ids, 1e-4), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="group size 3 must be >= 1 and divide the batch size 16"):
        group_normalize(values, 3, mesh)
    with pytest.raises(ValueError, match=r"group ids must lie in \[0, 16\)"):
        group_normalize(values, np.full(16, 16), mesh)


def test_chunked_runs_each_chunk_with_its_own_plan():
    # A guidance-style pass: chunk 0 plain attention, chunk 1 perturbed (PAG: identity attention).
    plans = [AttentionPlan(), AttentionPlan(head_weight=jnp.ones(2))]
    q = jax.random.normal(jax.random.key(0), (16, 5, 2, 4))

    def fn(i, x):
        return attention(x, x, x, plan=plans[i])[0]

    plain = attention(q[:8], q[:8], q[:8])[0]
    for run in (chunked(fn, 2), chunked(fn, 2, mesh=make_mesh())):
        out = jax.jit(run)(q)
        np.testing.assert_allclose(out[:8], plain, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out[8:], q[8:], rtol=1e-6, atol=1e-6)  # identity attention
    assert not np.allclose(plain, q[:8])
    three = jax.jit(chunked(lambda i, x: x * (i + 1), 3))(jnp.ones((6, 2)))
    np.testing.assert_array_equal(three[:, 0], [1, 1, 2, 2, 3, 3])
    with pytest.raises(ValueError, match="8 devices along mesh axes .* cannot hold 3 chunks"):
        chunked(fn, 3, mesh=make_mesh())
