"""``jdpt`` command line.

``jdpt smoke``: the end-to-end smoke run - write a random tiny Flux transformer and VAE as
diffusers folders, load them back with ``jdpt.from_diffusers``, sample with the flow Euler ODE
in one jitted call, decode, and save a PNG. The models are random, so the image is structured
noise: the run proves the whole path (weights, model, sampler, VAE, image output) works.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def smoke(args: argparse.Namespace) -> int:
    import jax
    from flax import nnx
    from PIL import Image
    from tqdm import tqdm

    import jdpt
    from jdpt.diffusion.pipeline import flux_generate
    from jdpt.models.flux import FluxConfig, FluxTransformer
    from jdpt.models.vae import AutoencoderKL, AutoencoderKLConfig

    flux_cfg = FluxConfig(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
                          num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                          guidance_embeds=True, axes_dims_rope=(8, 12, 12))
    vae_cfg = AutoencoderKLConfig(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                  norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False,
                                  use_post_quant_conv=False, scaling_factor=1.0, shift_factor=0.0)
    out = Path(args.out)
    stages = tqdm(total=4, desc="smoke", unit="stage")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        stages.set_postfix_str("write random tiny Flux + VAE (diffusers format)")
        jdpt.weights.to_diffusers(FluxTransformer(flux_cfg, rngs=nnx.Rngs(args.seed)), Path(tmp) / "transformer")
        jdpt.weights.to_diffusers(AutoencoderKL(vae_cfg, rngs=nnx.Rngs(args.seed + 1)), Path(tmp) / "vae")
        stages.update()
        stages.set_postfix_str("load with jdpt.from_diffusers")
        transformer = jdpt.from_diffusers(Path(tmp) / "transformer")
        vae = jdpt.from_diffusers(Path(tmp) / "vae")
        stages.update()
    stages.set_postfix_str(f"sample {args.batch} images, {args.steps} Euler steps (one jitted call)")
    k_text, k_pooled, k_noise = jax.random.split(jax.random.key(args.seed), 3)
    prompt = jax.random.normal(k_text, (args.batch, 8, flux_cfg.joint_attention_dim))
    pooled = jax.random.normal(k_pooled, (args.batch, flux_cfg.pooled_projection_dim))
    generate = jax.jit(flux_generate, static_argnames=("height", "width", "num_inference_steps"))
    images = np.asarray(generate(transformer, vae, prompt, pooled, key=k_noise, height=args.size,
                                 width=args.size, num_inference_steps=args.steps))
    stages.update()
    stages.set_postfix_str(f"write {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(list(images), axis=1)).save(out)
    stages.update()
    stages.close()
    print(f"wrote {out} ({args.batch} images of {args.size}x{args.size}, random tiny Flux + VAE) "
          f"in {time.perf_counter() - start:.1f} s on {jax.devices()[0].platform}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jdpt", description="jdpt: post-training for diffusion models in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("smoke", help="end-to-end smoke run with a random tiny Flux; writes a PNG")
    p.add_argument("--out", default="outputs/smoke.png", help="PNG to write (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="image height and width in pixels")
    p.add_argument("--steps", type=int, default=8, help="sampling steps")
    p.add_argument("--batch", type=int, default=2, help="images to sample")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=smoke)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
