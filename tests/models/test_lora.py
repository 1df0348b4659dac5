"""LoRA by name pattern: insertion, LoRA-only training, merge/unmerge, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jdpt.models import lora
from jdpt.models.flux import FluxConfig, FluxTransformer
from jdpt.weights import WeightsError, state_dict
from jdpt.weights import lora as lora_files

TINY = FluxConfig(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
                  num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=6,
                  axes_dims_rope=(2, 2, 4))


def flux_inputs(cfg: FluxConfig, seed: int = 0, batch: int = 2, grid=(2, 3), text: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    ids = np.stack(np.meshgrid(np.zeros(1), np.arange(grid[0]), np.arange(grid[1]), indexing="ij"), -1)
    n_img = grid[0] * grid[1]
    out = {
        "hidden_states": rng.normal(size=(batch, n_img, cfg.in_channels)),
        "encoder_hidden_states": rng.normal(size=(batch, text, cfg.joint_attention_dim)),
        "pooled_projections": rng.normal(size=(batch, cfg.pooled_projection_dim)),
        "timestep": rng.uniform(size=(batch,)),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": np.zeros((text, 3)),
    }
    if cfg.guidance_embeds:
        out["guidance"] = np.full((batch,), 3.5)
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


@pytest.fixture
def model():
    return FluxTransformer(TINY, rngs=nnx.Rngs(0))


def test_targets_by_pattern_and_identity_at_insertion(model):
    inputs = flux_inputs(TINY)
    before = model(**inputs)
    names = lora.add_lora(model, r"attn\.to_[qkv]", rank=4, alpha=8)
    assert names == sorted(f"{b}.attn.to_{x}" for b in ("single_transformer_blocks.0", "transformer_blocks.0")
                           for x in "kqv")
    np.testing.assert_array_equal(model(**inputs), before)  # B = 0 at insertion
    # The base model's state dict is unchanged by adapters: same keys, no LoRA keys.
    layer = lora.lora_layers(model)["transformer_blocks.0.attn.to_q"]
    assert layer.scale == 2.0 and layer.lora_a.shape == (16, 4) and layer.lora_b.shape == (4, 16)


def test_lora_only_training_leaves_base_untouched(model):
    lora.add_lora(model, [r"to_q", r"to_v", r"ff\.net\.2"], rank=2)
    inputs = flux_inputs(TINY, seed=1)
    target = jax.random.normal(jax.random.key(0), model(**inputs).shape)
    graphdef, adapters, base = nnx.split(model, nnx.LoRAParam, ...)
    base_before = jax.tree.map(np.asarray, base)
    tx = optax.adam(1e-2)
    opt_state = tx.init(adapters)

    @jax.jit
    def step(adapters, opt_state, base):
        def loss_fn(adapters):
            return jnp.mean((nnx.merge(graphdef, adapters, base)(**inputs) - target) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    losses = []
    for _ in range(3):
        adapters, opt_state, loss = step(adapters, opt_state, base)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    jax.tree.map(np.testing.assert_array_equal, base, base_before)
    assert all(np.abs(np.asarray(b)).max() > 0 for b in jax.tree.leaves(
        nnx.state(nnx.merge(graphdef, adapters, base), nnx.LoRAParam)))


def test_merge_unmerge(model):
    lora.add_lora(model, r"proj_mlp|to_out\.0", rank=3, alpha=1.5)
    for i, layer in enumerate(lora.lora_layers(model).values()):
        layer.lora_b.set_value(jax.random.normal(jax.random.key(i), layer.lora_b.shape) * 0.2)
    inputs = flux_inputs(TINY, seed=2)
    kernel = np.asarray(model.transformer_blocks[0].attn.to_out[0].base.kernel.get_value())
    with_adapter = np.asarray(model(**inputs))
    with pytest.raises(WeightsError, match="unmerged LoRA adapters.*merge_lora"):
        state_dict(model)
    lora.merge_lora(model)
    np.testing.assert_allclose(model(**inputs), with_adapter, atol=1e-5)
    merged_sd = state_dict(model)
    np.testing.assert_allclose(merged_sd["transformer_blocks.0.attn.to_out.0.weight"].T,
                               kernel + np.asarray(lora.lora_layers(model)["transformer_blocks.0.attn.to_out.0"].delta()),
                               atol=1e-6)
    lora.merge_lora(model)  # idempotent
    lora.unmerge_lora(model)
    np.testing.assert_allclose(model.transformer_blocks[0].attn.to_out[0].base.kernel.get_value(), kernel, atol=1e-6)
    np.testing.assert_allclose(model(**inputs), with_adapter, atol=1e-5)


def test_errors(model, tmp_path):
    with pytest.raises(ValueError, match="match no linear layer.*examples of layer names"):
        lora.add_lora(model, r"to_qq", rank=2)
    lora.add_lora(model, r"to_q", rank=2)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.add_lora(model, r"attn\.to_q", rank=2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        lora.add_lora(model, r"to_k", rank=0)
    path = lora_files.save_lora(model, tmp_path)
    other = FluxTransformer(FluxConfig(**{**TINY.__dict__, "num_layers": 0}), rngs=nnx.Rngs(0))
    with pytest.raises(WeightsError, match=r"modules not in the model \['transformer_blocks\.0\.attn\.to_q'\]"):
        lora_files.load_lora(other, path)
    with pytest.raises(WeightsError, match="no 'unet.*lora_A.weight' keys.*prefix='unet'"):
        lora_files.load_lora(FluxTransformer(TINY, rngs=nnx.Rngs(0)), path, prefix="unet")
    with pytest.raises(WeightsError, match="no LoRA file"):
        lora_files.load_lora(model, tmp_path / "missing.safetensors")
