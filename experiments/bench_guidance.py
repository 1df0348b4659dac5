"""Guidance combine (CFG / CFG-Zero* / PAG): the Pallas kernel vs the jitted plain-JAX rules (XLA's
fusion), same inputs, same run.

Both sides are ``jdpt.kernels.guidance.guidance_combine`` inside ``jax.jit`` with traced scales and
step (zero-init inactive), on the stacked predictions ``[K, B, ...]``, output in the input dtype:
``impl="xla"`` is the ``jdpt.guidance`` rules, ``impl="pallas"`` the two-pass kernel. Times are
medians over repeats after warm-up, the two interleaved in every repeat. GB/s is the minimal HBM
traffic over the time: K reads + one write, plus the two reads of (uncond, cond) of CFG-Zero*'s
per-sample reduction pass. ``speedup`` = xla time / pallas time (> 1: the kernel wins).

Decision rule (issue 7): the kernel becomes the guidance objects' default only if its speedup is
>= 1.10 on the target accelerator for every full-size case (Flux 1024 px ``[2, 4096, 64]``, SD
``[2, 128, 128, 4]``; bf16 and fp32; each rule). CPU runs execute Pallas in interpret mode and
cannot decide anything.

    python experiments/bench_guidance.py            # accelerator: Flux [2, 4096, 64], SD [2, 128, 128, 4]
    python experiments/bench_guidance.py --small    # the default on CPU (interpret mode)

Writes ``experiments/results/bench_guidance.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdpt.kernels.guidance import combine_bytes, guidance_combine
from jdpt.timing import interleaved_medians

RESULTS = Path(__file__).parent / "results"
SIZES = {"flux-1024px": (2, 4096, 64), "sd-128x128x4": (2, 128, 128, 4)}
SMALL_SIZES = {"flux-small": (2, 256, 64), "sd-small": (2, 32, 32, 4)}
RULES = {  # rule -> (K, weights; step=5 keeps CFG-Zero*'s zero-init off)
    "cfg": (2, dict(w=7.5)),
    "cfg_zero_star": (2, dict(w=4.0, step=5)),
    "pag": (3, dict(w=7.5, s=3.0)),
}



def bench_case(size: str, shape: tuple[int, ...], rule: str, dtype, repeats: int) -> list[dict]:
    k, weights = RULES[rule]
    rng = np.random.default_rng(0)
    predictions = jnp.asarray(rng.standard_normal((k, *shape), np.float32), dtype)
    traced = {name: jnp.asarray(v, jnp.int32 if name == "step" else jnp.float32) for name, v in weights.items()}
    n = int(np.prod(shape[1:]))
    nbytes = combine_bytes(k, shape[0], n, dtype, reduction_reads=2 if rule == "cfg_zero_star" else 0)
    rows, jitted, outputs = [], {}, {}
    for impl in ("pallas", "xla"):
        f = jax.jit(lambda p, kw, impl=impl: guidance_combine(p, rule, impl=impl, **kw))
        start = time.perf_counter()
        outputs[impl] = np.asarray(jax.block_until_ready(f(predictions, traced)), np.float32)
        rows.append({"size": size, "shape": list(shape), "rule": rule, "K": k, "dtype": jnp.dtype(dtype).name,
                     "impl": impl, "compile_s": time.perf_counter() - start, "bytes": nbytes})
        jitted[impl] = f
    times = interleaved_medians(
        {impl: (lambda f=f: jax.block_until_ready(f(predictions, traced))) for impl, f in jitted.items()}, repeats)
    diff = float(np.abs(outputs["pallas"] - outputs["xla"]).max())
    for row in rows:
        row["time_us"] = 1e6 * times[row["impl"]]
        row["gb_per_s"] = nbytes / times[row["impl"]] / 1e9
        row["speedup_vs_xla"] = times["xla"] / times[row["impl"]]
        row["max_abs_diff_pallas_vs_xla"] = diff
    return rows


def _decision(rows: list[dict], on_cpu: bool, small: bool) -> str:
    pallas = [r for r in rows if r["impl"] == "pallas"]
    worst = min(r["speedup_vs_xla"] for r in pallas)
    best = max(r["speedup_vs_xla"] for r in pallas)
    measured = f"Pallas speedup over XLA ranges {worst:.3g}x to {best:.3g}x over {len(pallas)} cases."
    if on_cpu:
        return (f"{measured} Not a decision: Pallas ran in interpret mode on CPU. The default stays "
                "`combine_impl=\"xla\"` until an accelerator run shows >= 1.10x on every full-size case.")
    if small:
        return f"{measured} Not a decision: small sizes only; rerun without --small on the target accelerator."
    keep = worst >= 1.10
    return (f"{measured} Decision rule (>= 1.10x on every full-size case): "
            + ("met: the kernel may become the default." if keep
               else "not met: the default stays `combine_impl=\"xla\"` (XLA's fusion)."))


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action=argparse.BooleanOptionalAction, default=on_cpu,
                        help="small shapes (default on CPU, where Pallas runs in interpret mode)")
    parser.add_argument("--rules", nargs="+", choices=tuple(RULES), default=list(RULES))
    parser.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float32"), default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    sizes = SMALL_SIZES if args.small else SIZES
    repeats = args.repeats or (20 if args.small else 100)

    rows = []
    for size, shape in sizes.items():
        for dtype in args.dtypes:
            for rule in args.rules:
                case = bench_case(size, shape, rule, jnp.dtype(dtype), repeats)
                rows += case
                for r in case:
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    env = {"machine": platform.machine(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
           "device": str(jax.devices()[0]), "jax": jax.__version__, "repeats": repeats,
           "pallas_interpret_mode": on_cpu, "load_average_1_5_15min": list(os.getloadavg())}
    decision = _decision(rows, on_cpu, args.small)
    lines = ["| size | shape | dtype | rule | implementation | time (us) | GB/s (min. traffic) | speedup vs xla | "
             "compile (s) | max abs diff pallas vs xla |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']} | {r['shape']} | {r['dtype']} | {r['rule']} | {r['impl']} | {r['time_us']:.1f} | "
                     f"{r['gb_per_s']:.3g} | {r['speedup_vs_xla']:.3g} | {r['compile_s']:.1f} | "
                     f"{r['max_abs_diff_pallas_vs_xla']:.1e} |")
    table = "\n".join(lines)
    print(table)
    print(decision)
    caveat = ("**CPU run: Pallas executes in interpret mode (each grid program emulated with XLA ops, one "
              "after another), so these timings say nothing about GPU/TPU speed; they only show the script "
              "runs and the implementations agree.**\n\n" if on_cpu else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_guidance.json").write_text(
        json.dumps({"env": env, "decision": decision, "rows": rows}, indent=2) + "\n")
    (RESULTS / "bench_guidance.md").write_text(
        "# Guidance combine: Pallas kernel vs jitted plain JAX (XLA fusion)\n\n"
        f"{caveat}"
        "Both implementations are `jdpt.kernels.guidance.guidance_combine` under `jax.jit` on the stacked "
        "predictions `[K, B, ...]` (traced scales; CFG-Zero* at a step past zero-init), output in the input "
        "dtype. K = 2 for cfg / cfg_zero_star, 3 for pag (with CFG). GB/s = minimal traffic (K reads + 1 "
        "write, + 2 reads for CFG-Zero*'s reduction) / median time of interleaved repeats after warm-up; "
        "speedup = xla time / pallas time. Produced by `python experiments/bench_guidance.py"
        f"{' --small' if args.small else ''}`.\n\n"
        "Decision rule: the kernel becomes the guidance objects' default (`combine_impl`) only if its "
        "speedup is >= 1.10 on the target accelerator for every full-size case (Flux 1024 px [2, 4096, 64], "
        "SD [2, 128, 128, 4]; bf16 and fp32; each rule).\n\n"
        f"**Outcome of this run:** {decision}\n\n{table}\n\nEnvironment: `{json.dumps(env)}`\n"
    )


if __name__ == "__main__":
    main()
