"""Pretraining's run-to-run spread: a preset's base model pretrained with several seeds (each seed
changes the initialisation, the data order and the training noise), every one scored on the same
fixed prompts and sampling seeds.

    python experiments/pretrain_seeds.py [--preset default] [--seeds 0 1 2] [--per-category 64]

Seed 0 is the preset's own base model (loaded from ``$JDPT_CACHE``, or pretrained and cached);
other seeds are pretrained into ``$JDPT_CACHE/seeds/<seed>``. Writes
``experiments/results/pretrain_shapes_<preset>_seeds.{json,md}``: per seed GenEval-lite per category
and the strict score, then the mean and the sample standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from jdpt.timing import machine
from jdpt.world.cache import PRESETS, base_model, cache_root
from jdpt.world.evaluation import eval_prompts, evaluate

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-category", type=int, default=64)
    parser.add_argument("--cache", default=None, help="model cache (default: $JDPT_CACHE or ~/.cache/jdpt)")
    args = parser.parse_args()
    if len(set(args.seeds)) < 2:
        raise SystemExit(f"--seeds {args.seeds}: a spread needs at least two different seeds")
    world, train = PRESETS[args.preset]
    root = Path(args.cache) if args.cache else cache_root()
    runs = []
    for seed in args.seeds:
        cache = root if seed == train.seed else root / "seeds" / str(seed)
        model, meta = base_model(args.preset, cache_dir=cache, train=dataclasses.replace(train, seed=seed))
        verdict = evaluate(model, eval_prompts(args.per_category, world))[1]
        runs.append({"seed": seed, "pretrain_seconds": meta["history"]["seconds"],
                     "final_loss": meta["history"]["loss"][-1], "geneval_lite": verdict.summary(),
                     "strict_overall": verdict.clutter()["strict_overall"]})
    names = list(runs[0]["geneval_lite"])
    table = {name: [r["geneval_lite"][name] for r in runs] for name in names}
    table["strict_overall"] = [r["strict_overall"] for r in runs]
    stats = {name: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1))} for name, v in table.items()}
    result = {"preset": args.preset, "machine": machine(), "pretrain": dataclasses.asdict(train),
              "eval": {"prompts_per_category": args.per_category}, "runs": runs, "over_seeds": stats}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"pretrain_shapes_{args.preset}_seeds"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Shapes-world base model `{args.preset}` over pretraining seeds",
        "",
        f"The preset's recipe ({train.steps} steps x {train.batch_size} pairs) pretrained with seeds "
        f"{', '.join(str(s) for s in args.seeds)} (initialisation, data order and training noise), each scored on "
        f"the same {args.per_category} prompts per category and sampling seeds. Mean and sample standard deviation "
        "over seeds:",
        "",
        "| | " + " | ".join(f"seed {r['seed']}" for r in runs) + " | mean +- std |",
        "|---|" + "---|" * (len(runs) + 1),
        *[f"| {name} | " + " | ".join(f"{v:.3f}" for v in table[name])
          + f" | {stats[name]['mean']:.3f} +- {stats[name]['std']:.3f} |" for name in table],
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
