"""LoRA interchange with diffusers/PEFT: trained here -> FluxPipeline.load_lora_weights, and a
PEFT adapter saved by diffusers -> jdpt.weights.lora.load_lora; plus merged export."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jdpt
from jdpt.models import lora
from jdpt.weights import lora as lora_files
from tests.parity.test_flux import CONFIGS, _inputs, _torch_flux, _torch_forward
from tests.reference import assert_parity, torch_module


def _pipeline(transformer):
    """A FluxPipeline around ``transformer`` alone: enough for its LoRA loader and saver."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)


@pytest.fixture
def base(tmp_path):
    cfg = CONFIGS["dev"]
    ref = _torch_flux(cfg)
    ref.save_pretrained(tmp_path / "base")
    return cfg, ref, tmp_path


def test_lora_trained_here_loads_in_diffusers(base):
    cfg, ref, tmp = base
    ours = jdpt.from_diffusers(tmp / "base")
    lora.add_lora(ours, r"attn\.to_[qkv]|to_out\.0", rank=4, alpha=8)
    lora.add_lora(ours, r"proj_mlp", rank=2)  # a second rank: written as PEFT's rank_pattern
    inputs = _inputs(cfg, seed=10)
    target = np.random.default_rng(0).normal(size=ours(**inputs).shape).astype(np.float32)
    graphdef, adapters, rest = nnx.split(ours, nnx.LoRAParam, ...)
    tx = optax.adam(3e-2)
    opt_state = tx.init(adapters)

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(
            lambda a: jnp.mean((nnx.merge(graphdef, a, rest)(**inputs) - target) ** 2))(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    for _ in range(3):
        adapters, opt_state, _ = step(adapters, opt_state)
    trained = nnx.merge(graphdef, adapters, rest)
    path = lora_files.save_lora(trained, tmp / "lora")

    pipe = _pipeline(ref)
    pipe.load_lora_weights(tmp / "lora")
    check = _inputs(cfg, seed=11)
    ref_out = _torch_forward(pipe.transformer, check)
    assert_parity(trained(**check), ref_out, what="LoRA trained in jdpt, run by diffusers")
    base_out = _torch_forward(_torch_flux(cfg), check)
    assert np.abs(ref_out.numpy() - base_out.numpy()).max() > 1e-3  # the adapter did something
    assert path.name == "pytorch_lora_weights.safetensors"


def test_peft_lora_from_diffusers_loads_here(base):
    torch = torch_module()
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cfg, ref, tmp = base
    config = LoraConfig(r=3, lora_alpha=6, init_lora_weights=False,
                        target_modules=["to_k", "add_v_proj", "ff.net.2", "proj_out"])
    torch.manual_seed(1)
    ref.add_adapter(config)
    from diffusers import FluxPipeline

    FluxPipeline.save_lora_weights(tmp / "peft", transformer_lora_layers=get_peft_model_state_dict(ref),
                                   transformer_lora_adapter_metadata=config.to_dict())
    ours = jdpt.from_diffusers(tmp / "base")
    names = lora_files.load_lora(ours, tmp / "peft")
    assert "proj_out" in names and "transformer_blocks.0.ff.net.2" in names
    assert {l.scale for l in lora.lora_layers(ours).values()} == {2.0}
    inputs = _inputs(cfg, seed=12)
    assert_parity(ours(**inputs), _torch_forward(ref, inputs), what="PEFT LoRA run by jdpt")


def test_merged_export_loads_in_diffusers(base):
    from diffusers import FluxTransformer2DModel

    cfg, _, tmp = base
    ours = jdpt.from_diffusers(tmp / "base")
    lora.add_lora(ours, r"to_v|ff_context\.net\.0\.proj", rank=2, alpha=3)
    for i, layer in enumerate(lora.lora_layers(ours).values()):
        layer.lora_b.set_value(jax.random.normal(jax.random.key(i), layer.lora_b.shape) * 0.1)
    inputs = _inputs(cfg, seed=13)
    with_adapter = ours(**inputs)
    jdpt.weights.to_diffusers(lora.merge_lora(ours), tmp / "merged")
    merged = FluxTransformer2DModel.from_pretrained(tmp / "merged").eval()
    assert_parity(with_adapter, _torch_forward(merged, inputs), what="merged LoRA export")
