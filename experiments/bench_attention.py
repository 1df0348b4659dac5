"""Perturbed (SoftPAG/PAG) flash attention: the Pallas kernel vs jax.nn.dot_product_attention, the
dense plain-JAX reference and jdpt's default ``"xla"`` attention, same inputs, same run.

Every implementation computes the same thing; the XLA/cuDNN baselines express the perturbation
as a per-head mask (a PAG head, u = 1, attends only to its own key: mask = eye), so ``u`` is 0 or
1 per head: ``u=0`` (no head perturbed), ``u=1`` (every head), ``mixed`` (every other head).
Times are medians over repeats after warm-up, the implementations interleaved in every repeat;
TFLOP/s use the dense count 4*B*H*T^2*D for every row (so the kernel's skipped u = 1 heads show
as a higher *effective* rate). forward+backward differentiates sum(out * w) w.r.t. q, k, v.

    python experiments/bench_attention.py                 # accelerator: S in {1024, 4096, 16384}
    python experiments/bench_attention.py --small         # the default on CPU (interpret mode)

Writes ``experiments/results/bench_attention.{json,md}``. CPU runs use Pallas interpret mode:
their timings say nothing about GPU/TPU speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdpt.kernels.attention import attention_flops, perturbed_attention, perturbed_attention_reference
from jdpt.models.attention import AttentionPlan, attention
from jdpt.timing import interleaved_medians

RESULTS = Path(__file__).parent / "results"
U_MODES = ("u=0", "u=1", "mixed")



def _head_weights(mode: str, heads: int) -> np.ndarray:
    if mode == "u=0":
        return np.zeros(heads, np.float32)
    if mode == "u=1":
        return np.ones(heads, np.float32)
    return (np.arange(heads) % 2).astype(np.float32)  # mixed: every other head is a PAG head


def _implementations(u: jax.Array, seq: int, on_gpu: bool) -> dict[str, Callable]:
    """name -> f(q, k, v) -> out, all with identical semantics for u in {0, 1} per head."""
    pert = u > 0.5
    any_pert = bool(np.any(np.asarray(pert)))
    mask = jnp.where(pert[None, :, None, None], jnp.eye(seq, dtype=bool), True) if any_pert else None

    def dpa(impl):
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)

    fns = {
        "pallas": lambda q, k, v: perturbed_attention(q, k, v, u),
        f"jax.nn xla{' (eye mask)' if any_pert else ''}": dpa("xla"),
        "plain-JAX reference": lambda q, k, v: perturbed_attention_reference(q, k, v, u),
        # The library's default: the SoftPAG plan on the "xla" implementation (its backward
        # recomputes the probabilities in query chunks from T * S = RECOMPUTE_MIN_SCORES).
        'jdpt attention, impl="xla"': lambda q, k, v: attention(q, k, v, plan=AttentionPlan(head_weight=u))[0],
    }
    if on_gpu:
        fns[f"jax.nn cudnn{' (eye mask)' if any_pert else ''}"] = dpa("cudnn")
    return fns


def bench_case(batch: int, seq: int, heads: int, dim: int, mode: str, dtype, passes: list[str],
               repeats: int, on_gpu: bool) -> list[dict]:
    keys = jax.random.split(jax.random.PRNGKey(seq), 4)
    q, k, v, w = (jax.random.normal(kk, (batch, seq, heads, dim), jnp.float32).astype(dtype) for kk in keys)
    u = jnp.asarray(_head_weights(mode, heads))
    flops = attention_flops(batch, seq, seq, heads, dim)
    rows, jitted, expected = [], {}, None
    for name, fn in _implementations(u, seq, on_gpu).items():
        for p in passes:
            if p == "forward":
                f = jax.jit(fn)
            else:
                f = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32) * w),
                                     (0, 1, 2)))
            row = {"impl": name, "pass": p, "batch": batch, "seq": seq, "heads": heads, "dim": dim,
                   "u": mode, "dtype": jnp.dtype(dtype).name}
            try:
                start = time.perf_counter()
                out = jax.block_until_ready(f(q, k, v))
                row["compile_s"] = time.perf_counter() - start
            except Exception as err:  # OOM of the dense reference, cuDNN refusing a mask, ...
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                rows.append(row)
                continue
            if p == "forward":  # same numbers, so the timing compares like with like
                out = np.asarray(out, np.float32)
                expected = out if expected is None else expected
                row["max_abs_diff_vs_pallas"] = float(np.abs(out - expected).max())
            jitted[(name, p)] = f
            rows.append(row)
    times = interleaved_medians(
        {key: (lambda f=f: jax.block_until_ready(f(q, k, v))) for key, f in jitted.items()}, repeats)
    for row in rows:
        key = (row["impl"], row["pass"])
        if key in times:
            row["time_ms"] = 1e3 * times[key]
            mult = 1.0 if row["pass"] == "forward" else 3.5  # fwd + bwd ~ 2.5x the forward's matmuls
            row["tflops"] = mult * flops / times[key] / 1e12
    return rows


def main() -> None:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action=argparse.BooleanOptionalAction, default=on_cpu,
                        help="small shapes (default on CPU, where Pallas runs in interpret mode)")
    parser.add_argument("--seq", type=int, nargs="+", default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--u", nargs="+", choices=U_MODES, default=list(U_MODES))
    parser.add_argument("--passes", nargs="+", choices=("forward", "forward+backward"), default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    seqs = args.seq or ([128, 256] if args.small else [1024, 4096, 16384])
    heads = args.heads or (4 if args.small else 24)
    passes = args.passes or (["forward"] if args.small else ["forward", "forward+backward"])
    repeats = args.repeats or (3 if args.small else 20)
    on_gpu = jax.default_backend() == "gpu"

    rows = []
    for seq in seqs:
        for mode in args.u:
            case = bench_case(args.batch, seq, heads, args.dim, mode, jnp.bfloat16, passes, repeats, on_gpu)
            rows += case
            for r in case:
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
    env = {"machine": platform.machine(), "cpus": os.cpu_count(), "backend": jax.default_backend(),
           "device": str(jax.devices()[0]), "jax": jax.__version__, "repeats": repeats,
           "pallas_interpret_mode": on_cpu, "load_average_1_5_15min": list(os.getloadavg())}
    header = ("| S | u | pass | implementation | time (ms) | TFLOP/s (dense count) | compile (s) | "
              "max abs diff vs pallas |\n|---|---|---|---|---|---|---|---|")
    lines = [header]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seq']} | {r['u']} | {r['pass']} | {r['impl']} | {r['error']} | | | |")
            continue
        diff = f"{r['max_abs_diff_vs_pallas']:.1e}" if "max_abs_diff_vs_pallas" in r else ""
        lines.append(f"| {r['seq']} | {r['u']} | {r['pass']} | {r['impl']} | {r['time_ms']:.2f} | "
                     f"{r['tflops']:.4g} | {r['compile_s']:.1f} | {diff} |")
    table = "\n".join(lines)
    print(table)
    caveat = ("**CPU run: Pallas executes in interpret mode (the kernel body emulated with XLA ops), "
              "so these timings say nothing about GPU/TPU speed; they only show the script runs and "
              "the implementations agree.**\n\n" if on_cpu else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_attention.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    (RESULTS / "bench_attention.md").write_text(
        "# Perturbed flash attention: Pallas vs jax.nn.dot_product_attention vs plain JAX vs jdpt xla\n\n"
        f"{caveat}"
        f"B={args.batch}, H={heads}, D={args.dim}, bf16. u=0: no head perturbed; u=1: every head a "
        "PAG head (the kernel skips QK^T there; XLA/cuDNN get an eye mask); mixed: every other head. "
        "Median of interleaved repeats after warm-up; TFLOP/s = 4*B*H*S^2*D (x3.5 for "
        "forward+backward) over time for every row. Produced by `python experiments/bench_attention.py"
        f"{' --small' if args.small else ''}`.\n\n{table}\n\nEnvironment: `{json.dumps(env)}`\n"
    )


if __name__ == "__main__":
    main()
