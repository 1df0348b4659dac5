"""Pretraining the Shapes-world base model: time and GenEval-lite per category.

Pretrains a preset from scratch (or loads it from ``$JDPT_CACHE`` when it was trained before;
the stored pretraining time and evaluation are then reported), evaluates it on the fixed prompt
set (``--per-category`` prompts of each GenEval category, 20 sampling steps (Euler for the Flux
presets, DDIM for the UNet ones), no CFG, the world's sampling default; overall scores at CFG 1.5
and 4 are reported beside it), and writes
``experiments/results/pretrain_shapes_<preset>.{json,md}``.

    python experiments/pretrain_shapes.py [--preset default] [--per-category 64]

The base model is meant to be clearly imperfect (GenEval-lite between about 0.2 and 0.7) so that
post-training has room to show gains; the table says where it landed.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


from jdpt.timing import machine
from jdpt.world.cache import PRESETS, base_model, model_dir
from jdpt.world.model import CFG_SCALE, SAMPLING_STEPS
from jdpt.world.evaluation import eval_prompts, evaluate

RESULTS = Path(__file__).parent / "results"
TARGET_RANGE = (0.2, 0.7)


def _verdict(overall: float) -> str:
    low, high = TARGET_RANGE
    if overall < low:
        return f"**Below the target range** ({overall:.3f} < {low}): the recipe needs more capacity or steps."
    if overall > high:
        return f"**Above the target range** ({overall:.3f} > {high}): too little room left for post-training."
    return f"Inside the target range ({low}-{high})."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--per-category", type=int, default=64)
    parser.add_argument("--cache", default=None, help="model cache (default: $JDPT_CACHE or ~/.cache/jdpt)")
    args = parser.parse_args()

    model, meta = base_model(args.preset, cache_dir=args.cache)
    prompts = eval_prompts(args.per_category, model.config)
    verdict = evaluate(model, prompts, steps=SAMPLING_STEPS, cfg_scale=CFG_SCALE)[1]
    summary, clutter = verdict.summary(), verdict.clutter()
    by_cfg = {cfg: evaluate(model, prompts, steps=SAMPLING_STEPS, cfg_scale=cfg)[1].summary()["overall"]
              for cfg in (1.5, 4.0)}
    by_cfg[CFG_SCALE] = summary["overall"]
    history = meta["history"]
    result = {
        "preset": args.preset,
        "model": str(model_dir(args.preset, args.cache)),
        "machine": machine(),
        "world": meta["world"],
        "pretrain": meta["pretrain"],
        "pretrain_seconds": history["seconds"],
        "final_loss": history["loss"][-1],
        "eval": {"prompts_per_category": args.per_category, "steps": SAMPLING_STEPS, "cfg_scale": CFG_SCALE},
        "geneval_lite": summary,
        "clutter": clutter,
        "overall_by_cfg_scale": {str(k): v for k, v in sorted(by_cfg.items())},
        "target_range": TARGET_RANGE,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"pretrain_shapes_{args.preset}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    train = meta["pretrain"]
    unet = meta["world"].get("arch") == "unet"
    loss_name, sampler = ("eps-prediction DDPM", "DDIM") if unet else ("flow-matching", "Euler")
    lines = [
        f"# Shapes-world base model, preset `{args.preset}`",
        "",
        f"Pretrained from scratch in **{history['seconds'] / 60:.1f} min** on {os.cpu_count()} CPU cores "
        f"({train['steps']} steps x {train['batch_size']} pairs, final {loss_name} loss "
        f"{history['loss'][-1]:.4f}). GenEval-lite on {args.per_category} fixed prompts per category, "
        f"one sample each, {SAMPLING_STEPS} {sampler} steps, CFG {CFG_SCALE} (target range for a base model: "
        f"{TARGET_RANGE[0]}-{TARGET_RANGE[1]} overall):",
        "",
        "| category | score |",
        "|---|---|",
        *[f"| {name} | {value:.3f} |" for name, value in summary.items()],
        "",
        _verdict(summary["overall"]),
        "",
        f"Detected objects per image {clutter['objects_per_image']:.2f} (the prompts name "
        f"{clutter['named_objects_per_prompt']:.2f}); strict GenEval-lite, failing images with objects the "
        f"prompt does not name: {clutter['strict_overall']:.3f}.",
        "",
        "Model: " + ", ".join(f"{k}={v}" for k, v in meta["world"].items() if k != "shapes") + ".",
        "",
        "Overall GenEval-lite by guidance scale (same prompts and seeds):",
        "",
        "| CFG scale | overall |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in sorted(by_cfg.items())],
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
