"""Orbax save/restore: identical arrays, dtypes and LoRA layout; restore into a mesh sharding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from jdpt.models import lora
from jdpt.models.flux import FluxConfig, FluxTransformer
from jdpt.weights import WeightsError, from_diffusers, restore, save, to_diffusers

TINY = FluxConfig(in_channels=8, num_layers=1, num_single_layers=2, attention_head_dim=8,
                  num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=8,
                  axes_dims_rope=(2, 2, 4))


def _flat(model, kind=nnx.Param):
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, kind))}


def _assert_identical(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def test_diffusers_folder_to_orbax_and_back(tmp_path):
    original = FluxTransformer(TINY, rngs=nnx.Rngs(1))
    loaded = from_diffusers(to_diffusers(original, tmp_path / "diffusers"))
    restored = restore(save(loaded, tmp_path / "ckpt"))
    assert type(restored) is FluxTransformer and restored.config == TINY
    _assert_identical(loaded, restored)


def test_bf16_and_lora_layout_survive(tmp_path):
    model = FluxTransformer(TINY, rngs=nnx.Rngs(2), param_dtype=jnp.bfloat16)
    lora.add_lora(model, r"attn\.to_[qk]", rank=2, alpha=4)
    lora.add_lora(model, r"proj_mlp", rank=3)
    for layer in lora.lora_layers(model).values():
        layer.lora_b.set_value(jnp.full(layer.lora_b.shape, 0.1, layer.lora_b.dtype))
    lora.merge_lora(model)
    restored = restore(save(model, tmp_path / "ckpt"))
    _assert_identical(model, restored)
    layers = lora.lora_layers(restored)
    assert {n: (l.rank, l.alpha, l.merged) for n, l in layers.items()} == {
        n: (l.rank, l.alpha, l.merged) for n, l in lora.lora_layers(model).items()
    }
    assert all(l.merged for l in layers.values()) and len(layers) == 8
    assert restored.x_embedder.kernel.get_value().dtype == jnp.bfloat16


def test_restore_into_mesh_sharding(tmp_path):
    model = FluxTransformer(TINY, rngs=nnx.Rngs(3))
    path = save(model, tmp_path / "ckpt")
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    sharded = restore(path, mesh=mesh)
    _assert_identical(model, sharded)
    q = sharded.transformer_blocks[0].attn.to_q.kernel.get_value()  # logical (embed, heads)
    assert q.sharding == NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))
    assert q.addressable_shards[0].data.shape == (8, 16)  # [32, 32] split 4 x 2
    replicated = sum(a.nbytes for a in _flat(model).values())
    per_device = sum(
        v.get_value().addressable_shards[0].data.nbytes
        for _, v in nnx.to_flat_state(nnx.state(sharded, nnx.Param))
    )
    assert per_device < 0.3 * replicated
    # A custom rules table: replicate everything but the MLP.
    mlp_only = restore(path, mesh=mesh, rules=(("mlp", "tensor"),))
    assert mlp_only.transformer_blocks[0].attn.to_q.kernel.get_value().sharding.spec == PartitionSpec(None, None)
    assert mlp_only.single_transformer_blocks[0].proj_mlp.kernel.get_value().sharding.spec == PartitionSpec(None, "tensor")


def test_errors(tmp_path):
    model = FluxTransformer(TINY, rngs=nnx.Rngs(4))
    path = save(model, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(model, path)
    save(model, path, overwrite=True)
    with pytest.raises(WeightsError, match="not a jdpt checkpoint"):
        restore(tmp_path)
