"""Alignment methods on the Shapes world: GenEval-lite before/after a fixed compute budget.

Seven post-training methods start from the same cached base model (``jdpt.world.base_model``)
and train for the same wall-clock budget each (or a fixed number of steps):

- offline, on one preference data set made once by the base model and the verifier: SFT on the
  winners, Diffusion-DPO (its flow form: velocity MSEs), MaPO;
- online, the verifier's 0/1 score (GenEval-lite) as the reward: DDPO (DDIM eta = 1 rollouts
  through ``flow_as_epsilon``), Flow-GRPO, DiffusionNFT;
- reward backprop (AlignProp: randomised truncation) on a differentiable surrogate, the soft
  colour-mass reward (``jdpt.world.colour_mass``; the verifier is not differentiable).

The methods themselves are the library's ``jdpt.world.post_train``; this script runs them side by
side and writes the table, the curves and the report.

Per method: GenEval-lite per category and overall on a fixed held-out prompt set with fixed seeds,
before and after; a reward-vs-step curve (a small probe set scored by the verifier every few
steps, plus the training reward of the online methods); mean step time after compile; the train
step's compiled memory (``memory_analysis()``: arguments + outputs + temporaries); steps done;
the paper's headline number beside ours. DiffusionNFT vs Flow-GRPO: the steps NFT needs to reach
Flow-GRPO's final probe score.

With ``--strict-reward`` the training rewards (the offline pairs and winners, the online methods'
scores) come from the strict verifier, which fails images with objects their prompt does not
name, and reward backprop (which does not use the verifier) is left out: the remedy for the
clutter that GenEval's presence rules reward.

    python experiments/alignment_table.py [--preset default] [--budget-seconds 240 | --steps N]
        [--methods sft,dpo,...] [--full] [--strict-reward] [--out experiments/results]

Writes ``alignment.json``, ``alignment.md`` and ``alignment_curves.png`` into ``--out``
(``alignment_strict.*`` with ``--strict-reward``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jdpt.timing import machine
from jdpt.world.alignment import METHODS, OFFLINE, AlignSettings, post_train, reward_description
from jdpt.world.alignment_runs import OfflineData, geneval, make_offline_data, standard_error
from jdpt.world.cache import PRESETS, base_model, model_dir
from jdpt.world.colour_mass import object_areas
from jdpt.world.model import CFG_SCALE, SAMPLING_STEPS, WorldModel
from jdpt.world.evaluation import eval_prompts
from jdpt.world.scenes import CATEGORIES, Prompt

RESULTS = Path(__file__).parent / "results"
# The papers' headline numbers as /work/shared/methods/alignment.md records them (text, not ours).
HEADLINES = {
    "sft": "n/a (baseline; no paper number)",
    "dpo": "DPO-SDXL wins ~2/3 of human comparisons vs SDXL (PartiPrompts, HPS prompts; Salesforce blog)",
    "mapo": "beats DPO and DreamBooth-style methods while reducing training time by 15% (abstract)",
    "ddpo": "no single number: reward curves (JPEG compressibility, aesthetic, prompt alignment) rise",
    "reward_backprop": "no number recorded in the spec (AlignProp/DRaFT report reward curves)",
    "flow_grpo": "GenEval 63% -> 95% (SD3.5-M); text rendering 59% -> 92% (abstract)",
    "nft": "GenEval 0.24 -> 0.98 within 1k steps vs Flow-GRPO 0.95 after >5k; up to 25x more efficient",
}


def train_method(method: str, base: WorldModel, data: OfflineData | None, settings: AlignSettings, *,
                 full: bool, budget: float | None, steps: int | None, lr: float | None, areas: dict[str, float],
                 eval_set: list[Prompt], probe_set: list[Prompt], progress: bool) -> dict:
    """One method's row of the table: ``jdpt.world.post_train`` and its record (JSON-ready)."""
    r = post_train(base, method, settings, budget_seconds=budget, steps=steps, full=full, lr=lr, data=data,
                   areas=areas, eval_set=eval_set, probe_set=probe_set, progress=progress)
    return {
        "method": method, "label": r.label, "reward": reward_description(method, settings.strict_reward),
        "headline": HEADLINES[method],
        "trainable": r.trainable, "learning_rate": r.learning_rate, "steps": r.steps,
        "train_seconds": r.train_seconds, "compile_seconds": r.compile_seconds,
        "mean_iteration_seconds": r.mean_iteration_seconds, "mean_update_seconds": r.mean_update_seconds,
        "memory": r.memory, "after": r.after, "after_scores": r.after_scores.tolist(),
        "after_clutter": r.after_clutter,
        "probe_curve": r.probe_curve, "train_curve": r.train_curve,
    }


# ---------------------------------------------------------------- reporting


def steps_to_reach(curve: dict, target: float) -> tuple[int, float] | None:
    """First probe ``(step, seconds)`` whose score is >= ``target``; None if never."""
    for s, t, v in zip(curve["step"], curve["seconds"], curve["probe"]):
        if v >= target - 1e-9:
            return s, t
    return None


def nft_vs_grpo(results: dict) -> dict | None:
    if "nft" not in results or "flow_grpo" not in results:
        return None
    grpo, nft = results["flow_grpo"]["probe_curve"], results["nft"]["probe_curve"]
    target = grpo["probe"][-1]
    out = {"grpo_final_probe": target, "grpo_steps": grpo["step"][-1], "grpo_seconds": grpo["seconds"][-1],
           "grpo_first_reach": steps_to_reach(grpo, target), "nft_reach": steps_to_reach(nft, target),
           "nft_final_probe": nft["probe"][-1], "base_probe": grpo["probe"][0]}
    if target <= grpo["probe"][0]:
        out["note"] = "Flow-GRPO did not end above the base model's probe score: the comparison is empty"
    return out


def moving_average(values: list, window: int) -> np.ndarray:
    v = np.asarray([np.nan if x is None else x for x in values], np.float64)
    out = np.full_like(v, np.nan)
    for j in range(len(v)):
        chunk = v[max(0, j - window + 1): j + 1]
        if np.isfinite(chunk).any():
            out[j] = np.nanmean(chunk)
    return out


def _axis_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    return [lo + (hi - lo) * k / n for k in range(n + 1)]


def plot_curves(results: dict, path: Path) -> None:
    """One panel per method: the probe GenEval-lite (blue, left axis, 0-1) and the training
    reward (orange, its own range, right axis; moving average over 5 steps) against the step."""
    methods = list(results)
    cols = min(4, len(methods))
    rows = -(-len(methods) // cols)
    pw, ph, ml, mr, mt, mb = 300, 210, 44, 50, 28, 30
    canvas = Image.new("RGB", (cols * pw, rows * ph), "white")
    draw = ImageDraw.Draw(canvas)
    blue, orange, grey = (31, 119, 180), (255, 127, 14), (200, 200, 200)
    for n, method in enumerate(methods):
        r = results[method]
        ox, oy = (n % cols) * pw, (n // cols) * ph
        x0, y0, x1, y1 = ox + ml, oy + mt, ox + pw - mr, oy + ph - mb
        draw.text((ox + ml, oy + 6), r["label"], fill="black")
        draw.rectangle([x0, y0, x1, y1], outline="black")
        last = max(1, r["steps"])

        def px(step):
            return x0 + (x1 - x0) * step / last

        for v in _axis_ticks(0, 1):
            y = y1 - (y1 - y0) * v
            draw.line([x0, y, x1, y], fill=grey)
            draw.text((ox + 4, y - 5), f"{v:.2f}", fill=blue)
        for s in sorted({round(s) for s in _axis_ticks(0, last)}):
            draw.text((px(s) - 8, y1 + 4), str(s), fill="black")
        probe = r["probe_curve"]
        pts = [(px(s), y1 - (y1 - y0) * v) for s, v in zip(probe["step"], probe["probe"])]
        if len(pts) > 1:
            draw.line(pts, fill=blue, width=2)
        for x, y in pts:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=blue)
        train = r["train_curve"]
        smooth = moving_average(train["reward"], 5)
        finite = np.isfinite(smooth)
        if finite.sum() > 1:
            lo, hi = float(smooth[finite].min()), float(smooth[finite].max())
            hi = hi if hi > lo else lo + 1e-6
            pts = [(px(s), y1 - (y1 - y0) * (v - lo) / (hi - lo)) for s, v, f in
                   zip(train["step"], smooth, finite) if f]
            draw.line(pts, fill=orange, width=1)
            draw.text((x1 + 3, y0 - 4), f"{hi:.3g}", fill=orange)
            draw.text((x1 + 3, y1 - 6), f"{lo:.3g}", fill=orange)
    draw.text((4, rows * ph - 12), "blue: probe GenEval-lite (0-1); orange: training reward (own range); "
              "x: step", fill="black")
    canvas.save(path)


def _fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def change(before: float, after: float, threshold: float) -> str:
    """``after - before`` with its reading against the noise threshold."""
    d = after - before
    word = "within noise" if abs(d) < threshold else ("up" if d > 0 else "down")
    return f"{d:+.3f} ({word})"


def markdown(report: dict) -> str:
    s, results, base = report["settings"], report["results"], report["before"]
    n = s["eval_per_category"]
    se = standard_error(base, n)
    threshold = 2 * math.sqrt(2) * se  # two standard errors of a difference of two evaluations
    strict = s.get("strict_reward", False)  # reports written before the option have no key
    lines = [
        f"# Alignment methods on the Shapes world (preset `{report['preset']}`"
        + (", strict-verifier rewards)" if strict else ")"),
        "",
    ]
    if strict:
        lines += [
            "Training rewards here come from the strict verifier: an image with an object its prompt does not "
            "name scores 0 (the offline preference pairs and winners, and the online methods' rewards). "
            "Evaluation is unchanged: GenEval-lite, and the strict score in the clutter check. "
            "`alignment.md` trains on GenEval-lite's own presence rules. Reward backprop optimises "
            "its colour-mass surrogate, not the verifier, and is not run here.",
            "",
        ]
    lines += [
        f"Base model `{report['model']}`; every method starts from it and trains "
        + (f"for a fixed budget of **{report['budget_seconds']:.0f} s** of wall-clock compute"
           if report["budget_seconds"] is not None else f"for **{report['max_steps']}** steps")
        + f" ({'full fine-tuning of the Flux transformer' if report['full'] else 'LoRA r%d' % s['lora_rank']})"
        f" on {report['machine'].get('cpus_usable', report['machine']['cpus'])} of {report['machine']['cpus']} "
        f"CPU cores ({report['machine']['device']}). "
        "The budget counts rollouts, rewards and updates after the first step (which compiles); "
        "evaluations and the offline data set are outside it. Online methods: "
        f"{s['prompts_per_step']} prompts x {s['group_size']} samples per step, {s['rollout_steps']} sampler "
        "steps, no CFG (the world's default), one optimizer update per rollout.",
        "",
        f"GenEval-lite: {n} held-out prompts per category (fixed prompts and seeds), one sample each, "
        f"{SAMPLING_STEPS} Euler steps, CFG {CFG_SCALE}. Binomial standard error of the base model's overall "
        f"score: {se:.3f}; a change is called up / down only beyond {threshold:.3f} (two standard errors "
        "of a difference), else 'within noise'.",
        "",
        "| method | reward optimised | steps | overall before -> after | change | "
        + " | ".join(CATEGORIES) + " | step time (s) | update (s) | train-step memory (MiB) | paper's headline |",
        "|---|---|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|---|---|",
    ]
    for m, r in results.items():
        a = r["after"]
        cats = " | ".join(f"{base[c]:.2f} -> {a[c]:.2f}" for c in CATEGORIES)
        mem = r["memory"]["peak_bytes"] / 2**20 if r["memory"] else float("nan")
        lines.append(f"| {r['label']} | {r['reward']} | {r['steps']} | **{base['overall']:.3f} -> "
                     f"{a['overall']:.3f}** | {change(base['overall'], a['overall'], threshold)} | {cats} | "
                     f"{_fmt_s(r['mean_iteration_seconds'])} | {_fmt_s(r['mean_update_seconds'])} | {mem:.1f} | "
                     f"{r['headline']} |")
    lines += [
        "",
        "Step time: one iteration after compile (online: rollout + reward + update; offline: batch + "
        "update). Memory: the compiled train step's `memory_analysis()`, arguments + outputs + "
        "temporaries (an upper bound: donated state aliases part of the outputs; rollouts not included). "
        "The papers' numbers are on SD/SDXL/SD3.5-M at 512-1024 px with their rewards: they are printed for "
        "direction only, not comparable in scale.",
    ]
    clutter = report["before_clutter"]
    lines += [
        "",
        "## Clutter check",
        "",
        "GenEval's presence rules (single object, two objects, colours, position, colour attribution) "
        "pass an image that holds the named objects among others, so a policy can gain by drawing more. "
        "Detected objects per image against what the prompts name "
        f"({clutter['named_objects_per_prompt']:.2f} on average), and the strict overall score that fails "
        "any image with an object its prompt does not name:",
        "",
        "| method | objects per image before -> after | strict overall before -> after |",
        "|---|---|---|",
    ]
    for r in results.values():
        a = r["after_clutter"]
        lines.append(f"| {r['label']} | {clutter['objects_per_image']:.2f} -> {a['objects_per_image']:.2f} | "
                     f"{clutter['strict_overall']:.3f} -> {a['strict_overall']:.3f} |")
    lines += [
        "",
        "## Training reward, first vs last 5 steps, and the probe curve",
        "",
        f"Probe: GenEval-lite on {s['probe_per_category']} other prompts per category, scored "
        f"{s['probes']} times along each run (and at step 0).",
        "",
        "| method | training reward | first 5 | last 5 | probe GenEval-lite at step 0 -> end |",
        "|---|---|---|---|---|",
    ]
    for m, r in results.items():
        rewards = [x for x in r["train_curve"]["reward"] if x is not None]
        first = f"{np.mean(rewards[:5]):.4f}" if rewards else "-"
        last = f"{np.mean(rewards[-5:]):.4f}" if rewards else "-"
        p = r["probe_curve"]["probe"]
        lines.append(f"| {r['label']} | {r['train_curve']['reward_name'] or 'none (offline)'} | {first} | "
                     f"{last} | {p[0]:.3f} -> {p[-1]:.3f} |")
    versus = report.get("nft_vs_grpo")
    if versus:
        lines += ["", "## DiffusionNFT vs Flow-GRPO (probe GenEval-lite)", ""]
        reach, first = versus["nft_reach"], versus["grpo_first_reach"]
        if "note" in versus:  # no score to race to: report where both ended
            lines.append(f"{versus['note']}: Flow-GRPO ended at {versus['grpo_final_probe']:.3f} and DiffusionNFT "
                         f"at {versus['nft_final_probe']:.3f} (base {versus['base_probe']:.3f}).")
        else:
            lines.append(
                f"Flow-GRPO ended at {versus['grpo_final_probe']:.3f} (base {versus['base_probe']:.3f}) after "
                f"{versus['grpo_steps']} steps ({versus['grpo_seconds']:.0f} s), first reaching that score at step "
                f"{first[0]} ({first[1]:.0f} s). DiffusionNFT "
                + (f"reached it at step {reach[0]} ({reach[1]:.0f} s): {first[0] / max(reach[0], 1):.1f}x fewer "
                   f"steps and {first[1] / max(reach[1], 1e-9):.1f}x less time than Flow-GRPO took to get there."
                   if reach else f"never reached it (final {versus['nft_final_probe']:.3f})."))
        lines.append("The probe set is small (noisy) and scored only at the probe points, so step counts are "
                     "resolved to the probe spacing.")
    if s["offline_prompts"] and report["offline"]["pairs"]:
        o, verifier = report["offline"], "strict verifier" if strict else "verifier"
        lines += ["", f"Offline data (SFT / DPO / MaPO): {s['offline_prompts']} training prompts x "
                  f"{s['offline_samples']} base-model samples (mean {verifier} score {o['score']:.3f}), "
                  f"{o['pairs']} {verifier} preference pairs, {o['winners']} winner images; "
                  f"made in {o['seconds']:.0f} s."]
    if "reward_backprop" in results:
        lines += ["", "Reward backprop optimises the soft colour-mass surrogate (`colour_mass_reward`: the pixel "
                  "mass of each named colour and of the whole foreground against what the prompt's objects "
                  "need); it cannot see shape or position, so its GenEval-lite change measures transfer."]
    lines += ["", f"![curves]({stem(strict)}_curves.png)", ""]
    return "\n".join(lines)


def stem(strict: bool) -> str:
    """The output files' name: ``alignment`` or, for strict-verifier rewards, ``alignment_strict``."""
    return "alignment_strict" if strict else "alignment"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=[p for p in PRESETS if not p.startswith("unet")])
    parser.add_argument("--budget-seconds", type=float, default=240.0,
                        help="wall-clock training budget per method (ignored with --steps)")
    parser.add_argument("--steps", type=int, default=None, help="a fixed number of steps instead of a budget")
    parser.add_argument("--methods", default=None,
                        help=f"comma-separated subset of {METHODS} (default: all; with --strict-reward all but "
                             "reward_backprop)")
    parser.add_argument("--full", action="store_true", help="full fine-tuning of the transformer instead of LoRA")
    parser.add_argument("--lr", type=float, default=None, help="one learning rate for every method")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--cache", default=None, help="model cache (default: $JDPT_CACHE or ~/.cache/jdpt)")
    parser.add_argument("--eval-per-category", type=int, default=AlignSettings.eval_per_category)
    parser.add_argument("--probe-per-category", type=int, default=AlignSettings.probe_per_category)
    parser.add_argument("--offline-prompts", type=int, default=AlignSettings.offline_prompts)
    parser.add_argument("--prompts-per-step", type=int, default=AlignSettings.prompts_per_step)
    parser.add_argument("--group-size", type=int, default=AlignSettings.group_size)
    parser.add_argument("--strict-reward", action="store_true",
                        help="train on the strict verifier's scores (extra objects fail) instead of GenEval-lite's")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.methods is None:
        methods = [m for m in METHODS if not (args.strict_reward and m == "reward_backprop")]
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods {args.methods!r}: unknown {unknown}; choose from {METHODS}")
    if args.strict_reward and "reward_backprop" in methods:
        raise ValueError("--strict-reward scores samples with the strict verifier; reward_backprop optimises its "
                         "colour-mass surrogate instead: drop it from --methods")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be >= 1")
    settings = AlignSettings(eval_per_category=args.eval_per_category, probe_per_category=args.probe_per_category,
                        offline_prompts=args.offline_prompts, prompts_per_step=args.prompts_per_step,
                        group_size=args.group_size, strict_reward=args.strict_reward)
    progress = not args.quiet
    budget = None if args.steps is not None else args.budget_seconds

    base, _ = base_model(args.preset, cache_dir=args.cache, progress=progress)
    config = base.config.shapes
    eval_set = eval_prompts(settings.eval_per_category, base.config)
    probe_set = eval_prompts(settings.probe_per_category, base.config, seed=2025)
    base_verdict = geneval(base, eval_set, seed=settings.seed + 8)
    areas = object_areas(config)
    data = make_offline_data(base, settings, progress=progress) if set(methods) & set(OFFLINE) else None

    results = {}
    for method in methods:
        results[method] = train_method(method, base, data, settings, full=args.full, budget=budget,
                                       steps=args.steps, lr=args.lr, areas=areas, eval_set=eval_set,
                                       probe_set=probe_set, progress=progress)
    report = {
        "preset": args.preset, "model": str(model_dir(args.preset, args.cache)),
        "machine": machine(),
        "settings": dataclasses.asdict(settings), "full": args.full, "budget_seconds": budget,
        "max_steps": args.steps, "object_areas_px": areas,
        "before": base_verdict.summary(), "before_scores": base_verdict.score.tolist(),
        "before_clutter": base_verdict.clutter(),
        "offline": None if data is None else {"score": data.score, "pairs": len(data.pairs),
                                              "winners": len(data.winners), "seconds": data.seconds},
        "results": results, "nft_vs_grpo": nft_vs_grpo(results),
    }
    if report["offline"] is None:
        report["offline"] = {"score": float("nan"), "pairs": 0, "winners": 0, "seconds": 0.0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = stem(args.strict_reward)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_curves(results, out / f"{name}_curves.png")
    text = markdown(report)
    (out / f"{name}.md").write_text(text)
    print(text)
    print(f"wrote {out / f'{name}.json'}, {out / f'{name}.md'} and {out / f'{name}_curves.png'}")
    return report


if __name__ == "__main__":
    main()
