"""flux_generate vs diffusers FluxPipeline (given prompt embeddings and initial noise)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jdpt
from jdpt.diffusion.pipeline import flux_generate
from tests.reference import torch_module

VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
           layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=0.4, shift_factor=0.1,
           use_quant_conv=False, use_post_quant_conv=False)
FLUX = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12,
            axes_dims_rope=(4, 6, 6))


@pytest.mark.parametrize("guidance_embeds,true_cfg", [(True, 1.0), (False, 1.0), (False, 2.5)])
def test_flux_generate_matches_diffusers_pipeline(tmp_path, guidance_embeds, true_cfg):
    torch = torch_module()
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**FLUX, guidance_embeds=guidance_embeds).eval()
    vae = AutoencoderKL(**VAE).eval()
    with torch.no_grad():
        for p in list(transformer.parameters()) + list(vae.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    transformer.save_pretrained(tmp_path / "transformer")
    vae.save_pretrained(tmp_path / "vae")
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)

    rng = np.random.default_rng(0)
    prompt = rng.normal(size=(2, 6, 24)).astype(np.float32)
    pooled = rng.normal(size=(2, 12)).astype(np.float32)
    height, width = 16, 24  # latent 8x12 -> 4x6 = 24 packed tokens
    noise = rng.normal(size=(2, 24, 16)).astype(np.float32)
    negative = {}
    if true_cfg > 1:  # classifier-free guidance against a negative prompt
        negative = dict(negative_prompt_embeds=rng.normal(size=(2, 6, 24)).astype(np.float32),
                        negative_pooled_prompt_embeds=rng.normal(size=(2, 12)).astype(np.float32))
    ref = pipe(prompt_embeds=torch.from_numpy(prompt), pooled_prompt_embeds=torch.from_numpy(pooled),
               latents=torch.from_numpy(noise), height=height, width=width, num_inference_steps=4,
               guidance_scale=3.5, true_cfg_scale=true_cfg, output_type="np",
               **{k: torch.from_numpy(v) for k, v in negative.items()}).images
    ref_uint8 = (ref * 255).round().astype(np.uint8)

    ours_t = jdpt.from_diffusers(tmp_path / "transformer")
    ours_v = jdpt.from_diffusers(tmp_path / "vae")
    generate = jax.jit(flux_generate, static_argnames=("height", "width", "num_inference_steps",
                                                       "guidance_scale", "true_cfg_scale"))
    images = np.asarray(generate(ours_t, ours_v, prompt, pooled, latents=noise, height=height, width=width,
                                 num_inference_steps=4, guidance_scale=3.5, true_cfg_scale=true_cfg,
                                 **negative))
    assert images.shape == (2, height, width, 3) and images.dtype == np.uint8
    diff = np.abs(images.astype(int) - ref_uint8.astype(int))
    assert diff.max() <= 1, f"max pixel difference {diff.max()}"  # only rounding-boundary flips
    assert (diff > 0).mean() < 0.01


def test_flux_generate_cfg_arguments_are_checked():
    from flax import nnx

    from jdpt.models.flux import FluxConfig, FluxTransformer
    from jdpt.models.pixels import PixelCodec

    model = FluxTransformer(FluxConfig(**FLUX), rngs=nnx.Rngs(0))
    prompt, pooled = np.zeros((1, 6, 24), np.float32), np.zeros((1, 12), np.float32)
    kw = dict(key=jax.random.key(0), height=8, width=8, num_inference_steps=1)
    with pytest.raises(ValueError, match="needs negative_prompt_embeds"):
        flux_generate(model, PixelCodec(factor=1, channels=4), prompt, pooled, true_cfg_scale=3.0, **kw)
    with pytest.raises(ValueError, match="pass both"):
        flux_generate(model, PixelCodec(factor=1, channels=4), prompt, pooled, negative_prompt_embeds=prompt, **kw)
    with pytest.raises(ValueError, match="must match prompt_embeds"):
        flux_generate(model, PixelCodec(factor=1, channels=4), prompt, pooled, true_cfg_scale=3.0,
                      negative_prompt_embeds=prompt[:, :3], negative_pooled_prompt_embeds=pooled, **kw)
    images = flux_generate(model, PixelCodec(factor=1, channels=4), prompt, pooled, **kw)
    assert images.shape == (1, 8, 8, 4) and images.dtype == np.uint8
