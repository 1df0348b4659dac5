"""``jdpt`` command line.

``jdpt demo``: the main job on the embedded default. Pretrain (or load from ``$JDPT_CACHE``) the
Shapes-world base model, sample a fixed prompt set covering GenEval's six categories, score every
image with the analytic verifier, and write ``grid.png`` and ``scores.json``. Then post-train it
(LoRA, ``--post-train METHOD`` for ``--post-train-seconds``, rewarded by the strict verifier unless
``--no-strict-reward``), sample the same prompts with the same seeds, print the scores before and
after per category and write ``post_trained_grid.png`` (base and post-trained side by side);
``--post-train none`` stops after the base model.

``jdpt sample``: images for a prompt from a Shapes-world model folder or a diffusers pipeline folder
(Flux, SD 1.x/2.x, SDXL, SD3; dispatched on ``model_index.json``).

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


def strict_reward(method: str, flag: bool | None) -> bool:
    """Whether ``jdpt demo`` post-trains ``method`` on the strict verifier: ``flag``
    (``--[no-]strict-reward``), or by default for every method that uses the verifier."""
    if flag and method == "reward_backprop":
        raise SystemExit("jdpt demo: --strict-reward scores training samples with the strict verifier; "
                         "reward_backprop optimises its colour-mass surrogate instead: drop one of the two")
    return method != "reward_backprop" if flag is None else flag


def demo(args: argparse.Namespace) -> int:
    import json

    from jdpt.world.cache import base_model, model_dir
    from jdpt.world.figures import image_grid
    from jdpt.world.model import WorldModel
    from jdpt.world.evaluation import eval_prompts, evaluate
    from jdpt.world.scenes import CATEGORIES

    if args.post_train != "none" and not args.post_train_seconds > 0:
        raise SystemExit(f"jdpt demo: --post-train-seconds {args.post_train_seconds} must be > 0 "
                         "(or pass --post-train none)")
    strict = strict_reward(args.post_train, args.strict_reward)
    model, meta = base_model(args.preset, cache_dir=args.cache)
    if args.post_train != "none" and not isinstance(model, WorldModel):
        raise SystemExit(f"jdpt demo: post-training runs on the Flux-world presets (default, ci), not "
                         f"{args.preset!r}: pass --post-train none")
    print(f"base model: {model_dir(args.preset, args.cache)}"
          f" (pretrained in {meta['history']['seconds'] / 60:.1f} min, final loss {meta['history']['loss'][-1]:.4f})")
    prompts = eval_prompts(args.per_category, model.config)
    images, verdict = evaluate(model, prompts, seed=args.seed, steps=args.steps, cfg_scale=args.cfg)
    summary = verdict.summary()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shown = min(args.per_category, 8)
    pick = [c * args.per_category + j for c in range(len(CATEGORIES)) for j in range(shown)]
    grid = image_grid(images[pick], [prompts[i].text for i in pick], columns=shown,
                      passed=[bool(verdict.score[i]) for i in pick], row_labels=CATEGORIES)
    grid.save(out / "grid.png")
    report = {"preset": args.preset, "model": str(model_dir(args.preset, args.cache)),
              "sampling": {"steps": args.steps, "cfg_scale": args.cfg, "seed": args.seed,
                           "prompts_per_category": args.per_category},
              "geneval_lite": summary, "pretraining": {"seconds": meta["history"]["seconds"],
                                                       "final_loss": meta["history"]["loss"][-1]}}
    (out / "scores.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nGenEval-lite of the {args.preset!r} base model ({args.per_category} prompts per category)")
    print(f"{'category':<15}{'score':>7}")
    for name, value in summary.items():
        print(f"{name:<15}{value:>7.3f}")
    print(f"\nwrote {out / 'grid.png'} (green frame: verifier says correct) and {out / 'scores.json'}")
    if args.post_train == "none":
        return 0

    from jdpt.world.alignment import AlignSettings, post_train
    from jdpt.world.alignment_runs import standard_error
    settings = AlignSettings(strict_reward=strict)
    print(f"\npost-training the base model with {args.post_train} (LoRA r{settings.lora_rank}"
          f"{', strict-verifier rewards' if strict else ''}) for {args.post_train_seconds:.0f} s "
          "of training (compiling and data making not counted)")
    result = post_train(model, args.post_train, settings, budget_seconds=args.post_train_seconds)
    tuned, tuned_verdict = evaluate(result.model, prompts, seed=args.seed, steps=args.steps, cfg_scale=args.cfg)
    after = tuned_verdict.summary()
    # per category two rows, the same prompts and seeds: the base model's samples, then the post-trained ones
    shown = min(args.per_category, 6)
    tiles, captions, passed, labels = [], [], [], []
    for c, category in enumerate(CATEGORIES):
        row = list(range(c * args.per_category, c * args.per_category + shown))
        for who, samples, v in (("base", images, verdict), (result.method, tuned, tuned_verdict)):
            tiles.append(samples[row])
            captions += [prompts[i].text for i in row]
            passed += [bool(v.score[i]) for i in row]
            labels.append(f"{category}: {who}")
    image_grid(np.concatenate(tiles), captions, columns=shown, passed=passed,
               row_labels=labels).save(out / "post_trained_grid.png")
    noise = 2 * np.sqrt(2) * standard_error(summary, args.per_category)
    # Clutter check: GenEval's presence rules ignore extra objects, so a policy can gain by drawing
    # more; strict scoring fails any image with objects the prompt does not name.
    clutter = {}
    for who, v in (("before", verdict), ("after", tuned_verdict)):
        c = v.clutter()
        clutter["named_objects_per_prompt"] = c["named_objects_per_prompt"]
        clutter[f"objects_per_image_{who}"] = c["objects_per_image"]
        clutter[f"strict_overall_{who}"] = c["strict_overall"]
    report["post_training"] = {
        "method": result.method, "label": result.label, "strict_reward": strict,
        "trainable": result.trainable,
        "learning_rate": result.learning_rate, "budget_seconds": args.post_train_seconds, "steps": result.steps,
        "train_seconds": result.train_seconds, "compile_seconds": result.compile_seconds,
        "mean_iteration_seconds": result.mean_iteration_seconds, "memory": result.memory,
        "reward_curve": result.train_curve, "before": summary, "after": after,
        "change": {k: after[k] - summary[k] for k in summary}, "noise_threshold": noise, "clutter": clutter,
    }
    (out / "scores.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nGenEval-lite before -> after {result.label} ({result.steps} steps, {result.train_seconds:.0f} s; "
          "same prompts and seeds)")
    print(f"{'category':<15}{'before':>8}{'after':>8}{'change':>9}")
    for name in summary:
        print(f"{name:<15}{summary[name]:>8.3f}{after[name]:>8.3f}{after[name] - summary[name]:>+9.3f}")
    print(f"(one sample per prompt: an overall change below {noise:.3f}, two standard errors of a "
          "difference, is within noise)")
    print(f"detected objects per image {clutter['objects_per_image_before']:.2f} -> "
          f"{clutter['objects_per_image_after']:.2f} (the prompts name {clutter['named_objects_per_prompt']:.2f}); "
          f"strict GenEval-lite, extra objects failing: {clutter['strict_overall_before']:.3f} -> "
          f"{clutter['strict_overall_after']:.3f}")
    print(f"\nwrote {out / 'post_trained_grid.png'} (per category: base row, then {result.method} row) and "
          f"updated {out / 'scores.json'}")
    return 0


def sample(args: argparse.Namespace) -> int:
    import jax
    from PIL import Image

    from jdpt.weights.files import WeightsError

    folder = Path(args.model).expanduser()
    key = jax.random.key(args.seed)
    if (folder / "model_index.json").is_file() or not folder.exists():
        # a diffusers pipeline folder (or a hub-cache repo id), sampled with its own text encoders
        try:
            images = _sample_pipeline(args, key)
        except WeightsError as e:
            raise SystemExit(f"jdpt sample: {e}") from None
    else:
        from jdpt.world.cache import CacheError, load_model
        from jdpt.world.evaluation import make_sampler

        try:
            model, _ = load_model(folder)
        except CacheError as e:
            raise SystemExit(f"jdpt sample: {e}; pass a Shapes-world model folder or a diffusers "
                             "pipeline folder (with model_index.json)") from None
        sampler = make_sampler(model, steps=args.steps, cfg_scale=args.cfg)
        images = sampler(model.tokenize([args.prompt] * args.n), key)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(list(np.asarray(images)), axis=1)).save(out)
    print(f"wrote {out} ({args.n} samples of {args.prompt!r})")
    return 0


def _sample_pipeline(args: argparse.Namespace, key):
    """Images from a diffusers pipeline folder, dispatched on its ``model_index.json`` class."""
    from jdpt.diffusion import pipeline_parts as pipelines
    from jdpt.diffusion import prompts as flux
    from jdpt.diffusion import sd_pipeline as sd
    from jdpt.diffusion import sd_pipeline_parts as sd_pipelines
    from jdpt.weights.files import WeightsError
    from jdpt.weights.pipeline_folder import pipeline_root, read_index

    runs = {  # class -> (loader, sampler)
        "FluxPipeline": (pipelines.load_flux_pipeline, flux.flux_text_to_image),
        "StableDiffusionPipeline": (sd_pipelines.load_sd_pipeline, sd.sd_text_to_image),
        "StableDiffusionXLPipeline": (sd_pipelines.load_sdxl_pipeline, sd.sdxl_text_to_image),
        "StableDiffusion3Pipeline": (sd_pipelines.load_sd3_pipeline, sd.sd3_text_to_image),
    }
    name = read_index(pipeline_root(args.model)).get("_class_name")
    if name not in runs:
        raise WeightsError(f"pipeline class {name!r} is not one jdpt samples; it samples {sorted(runs)}")
    load, generate = runs[name]
    parts = load(args.model)
    kw = {} if args.guidance is None else {"guidance_scale": args.guidance}
    if args.size is not None:
        kw.update(height=args.size, width=args.size)
    return generate(parts, [args.prompt] * args.n, key=key, num_inference_steps=args.steps, **kw)


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    from jdpt.world.model import CFG_SCALE, SAMPLING_STEPS

    parser.add_argument("--steps", type=int, default=SAMPLING_STEPS, help="Euler sampling steps")
    parser.add_argument("--cfg", type=float, default=CFG_SCALE, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)


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

    from jdpt.world.alignment_runs import METHODS

    p = sub.add_parser("demo", help="pretrain or load the Shapes-world base model, sample, score, write a grid; "
                                    "post-train it and compare")
    p.add_argument("--preset", default="default", help="base model preset: default (~11 min to pretrain on 2 cores) or ci")
    p.add_argument("--cache", default=None, help="model cache folder (default: $JDPT_CACHE or ~/.cache/jdpt)")
    p.add_argument("--out", default="outputs/demo",
                   help="folder for grid.png, post_trained_grid.png and scores.json")
    p.add_argument("--per-category", type=int, default=32, help="evaluation prompts per GenEval category")
    # MaPO on the strict verifier's pairs: offline (no sampling in the training loop, so its step
    # count depends little on the machine) and the largest GenEval-lite gain on strict rewards in
    # 240 s on the default base model, +0.167 (experiments/results/alignment_strict.md). On
    # GenEval-lite's presence rules the online methods gain more, mostly by filling images with
    # extra objects (experiments/results/alignment.md: DiffusionNFT 6.5 objects per image, strict 0).
    p.add_argument("--post-train", default="mapo", choices=[*METHODS, "none"],
                   help="post-training method run on the base model with LoRA (default: %(default)s); "
                        "none: stop after the base model")
    p.add_argument("--post-train-seconds", type=float, default=300.0,
                   help="post-training budget in seconds of training (default: %(default)s)")
    p.add_argument("--strict-reward", action=argparse.BooleanOptionalAction, default=None,
                   help="score the post-training samples with the strict verifier (an object the prompt does "
                        "not name fails the image) rather than GenEval-lite's presence rules, which reward "
                        "clutter (default: on, except for reward_backprop, which does not use the verifier)")
    _sampling_args(p)
    p.set_defaults(fn=demo)

    p = sub.add_parser("sample", help="sample images for a prompt from a Shapes-world model folder or a "
                                      "diffusers Flux / SD / SDXL / SD3 pipeline folder")
    p.add_argument("--model", required=True, help="Shapes-world model folder (e.g. ~/.cache/jdpt/shapes/default), "
                                                  "diffusers pipeline folder, or hub-cache repo id")
    p.add_argument("--prompt", required=True, help='e.g. "a red circle left of a blue square"')
    p.add_argument("--out", default="outputs/sample.png")
    p.add_argument("--n", type=int, default=4, help="samples, side by side")
    p.add_argument("--size", type=int, default=None,
                   help="image side in pixels (pipeline folders only; default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="pipeline folders only: Flux's embedded guidance, SD/SDXL/SD3's CFG scale "
                        "(default: the pipeline's, as diffusers)")
    _sampling_args(p)
    p.set_defaults(fn=sample)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
