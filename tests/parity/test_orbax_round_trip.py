"""A folder written by diffusers/transformers -> jdpt -> Orbax -> restore: identical arrays, for every
ported model class."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import jdpt
from tests.reference import torch_module


def _torch_models():
    torch_module()
    from diffusers import (AutoencoderKL, ControlNetModel, FluxControlNetModel, FluxTransformer2DModel,
                           SD3Transformer2DModel, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    clip = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=12, projection_dim=8)
    flux = dict(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                joint_attention_dim=12, pooled_projection_dim=6, axes_dims_rope=(2, 2, 4))
    unet = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"))
    return {
        "FluxTransformer2DModel": lambda: FluxTransformer2DModel(**flux),
        "FluxControlNetModel": lambda: FluxControlNetModel(**flux),
        "UNet2DConditionModel": lambda: UNet2DConditionModel(
            **unet, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8),
        "ControlNetModel": lambda: ControlNetModel(**unet, conditioning_embedding_out_channels=(4, 8)),
        "SD3Transformer2DModel": lambda: SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
            pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm",
            dual_attention_layers=(0,)),
        "AutoencoderKL": lambda: AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=4,
                                               down_block_types=("DownEncoderBlock2D",) * 2,
                                               up_block_types=("UpDecoderBlock2D",) * 2),
        "CLIPTextModel": lambda: CLIPTextModel(clip),
        "CLIPTextModelWithProjection": lambda: CLIPTextModelWithProjection(clip),
        "T5EncoderModel": lambda: T5EncoderModel(T5Config(vocab_size=40, d_model=16, d_kv=4, d_ff=24,
                                                          num_layers=2, num_heads=4,
                                                          feed_forward_proj="gated-gelu")),
    }


@pytest.mark.parametrize("name", ["FluxTransformer2DModel", "FluxControlNetModel", "UNet2DConditionModel",
                                  "ControlNetModel", "SD3Transformer2DModel", "AutoencoderKL",
                                  "CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"])
def test_reference_folder_to_orbax_and_back(name, tmp_path):
    torch = torch_module()
    torch.manual_seed(0)
    ref = _torch_models()[name]()
    ref.save_pretrained(tmp_path / "reference")
    loaded = jdpt.from_diffusers(tmp_path / "reference")
    restored = jdpt.weights.restore(jdpt.weights.save(loaded, tmp_path / "orbax"))
    assert type(restored) is type(loaded) and restored.config == loaded.config
    a = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
    b = dict(nnx.to_flat_state(nnx.state(restored, nnx.Param)))
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path].get_value(), b[path].get_value(), err_msg=str(path))
    # and every array is the reference tensor, in jdpt's layout
    sd = {k: v.float().numpy() for k, v in ref.state_dict().items()}
    ours = jdpt.weights.state_dict(restored)
    for key, value in ours.items():
        ref_key = key if key in sd else key.removeprefix("text_model.")
        np.testing.assert_array_equal(value, sd[ref_key], err_msg=key)
