"""jdpt vs diffusers: forward and forward+backward time of the same model, same run, same machine.

Both sides load the same random weights (diffusers' init plus 0.05-scale Gaussian noise on every
parameter, so no zero-initialised weight hides a mismatch; diffusers writes them, jdpt loads the
folder). Times are medians over repeats after warm-up, the four measurements interleaved in every
repeat; jdpt's compile time is reported separately. The backward pass differentiates a scalar loss
with respect to every parameter (a training step's work without the optimizer).

    python experiments/bench_models.py [--models flux unet] [--repeats 10] [--threads N]

Writes ``experiments/results/bench_models.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdpt.models.attention import AttentionPlan, register_implementation
from jdpt.timing import interleaved_medians

RESULTS = Path(__file__).parent / "results"
TARGET = 0.5  # the goal: jdpt forward+backward at most half of diffusers' time
BATCH = 2

FLUX = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=64,
            num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=128,
            guidance_embeds=False, axes_dims_rope=(16, 24, 24))
UNET = dict(block_out_channels=(64, 128, 256), layers_per_block=1, cross_attention_dim=256,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def _free_attention(q, k, v, **_):
    """A stand-in for attention that costs nothing (the values for self-attention, their mean
    over the keys otherwise): a model timed with it shows what its other layers take."""
    return (v if q.shape == v.shape else jnp.broadcast_to(v.mean(axis=1, keepdims=True), q.shape)), None


register_implementation("free", _free_attention)


def _busy_cpu_s() -> float:
    """CPU seconds used by all processes since boot (Linux ``/proc/stat``: all but idle and iowait)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")



def _compare(ref, inputs: dict[str, np.ndarray], repeats: int, *,
             torch_inputs: dict[str, np.ndarray] | None = None,
             to_jdpt_layout: Callable[[np.ndarray], np.ndarray] = lambda out: out) -> dict:
    """Time diffusers module ``ref`` against the jdpt model loaded from its ``save_pretrained`` folder.

    ``inputs`` are the jdpt model's keyword arguments (numpy); diffusers gets ``torch_inputs``
    (default: the same arrays) and its ``.sample`` output is brought to jdpt's layout by
    ``to_jdpt_layout`` for the max |Δ| check.
    """
    import torch

    import jdpt

    torch.manual_seed(0)
    with torch.no_grad():  # random everything, so that the output check covers every weight
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = jdpt.from_diffusers(folder)

    # diffusers
    targs = {k: torch.from_numpy(v) for k, v in (torch_inputs or inputs).items()}

    def torch_forward():
        with torch.no_grad():
            return ref(**targs).sample

    def torch_train():
        ref.zero_grad(set_to_none=True)
        ref(**targs).sample.pow(2).mean().backward()

    for fn in (torch_forward, torch_train):
        fn()

    # jdpt
    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
    jin = {k: jnp.asarray(v) for k, v in inputs.items()}

    @jax.jit
    def forward(params, inputs):
        return nnx.merge(graphdef, params, rest)(**inputs)

    @jax.jit
    def train(params, inputs, plans=None):
        return jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(**inputs, plans=plans) ** 2))(params)

    free = AttentionPlan(impl="free")
    jax.block_until_ready(train(params, jin, free))
    compile_times = {}
    for name, fn in (("forward", forward), ("forward+backward", train)):
        start = time.perf_counter()
        jax.block_until_ready(fn(params, jin))
        compile_times[name] = time.perf_counter() - start

    # Same numbers, so the timing compares like with like (the parity tests' tolerance).
    expected = to_jdpt_layout(torch_forward().numpy())
    err, scale = float(np.abs(np.asarray(forward(params, jin)) - expected).max()), float(np.abs(expected).max())
    if err > 1e-4 * max(1.0, scale):
        raise AssertionError(f"{type(ref).__name__}: max |jdpt - diffusers| = {err:.2e} exceeds 1e-4 * "
                             f"max(1, {scale:.2e}); the timings would compare different computations")
    t = interleaved_medians({
        "diffusers forward": torch_forward,
        "jdpt forward": lambda: jax.block_until_ready(forward(params, jin)),
        "diffusers forward+backward": torch_train,
        "jdpt forward+backward": lambda: jax.block_until_ready(train(params, jin)),
        "jdpt forward+backward, free attention": lambda: jax.block_until_ready(train(params, jin, free)),
    }, repeats)
    t_fwd, t_train = t["diffusers forward"], t["diffusers forward+backward"]
    j_fwd, j_train = t["jdpt forward"], t["jdpt forward+backward"]
    return {
        "inputs": {k: list(v.shape) for k, v in inputs.items()},
        "dtype": str(next(iter(inputs.values())).dtype),
        "max_abs_diff_vs_diffusers": err,
        "max_abs_diffusers_output": scale,
        "diffusers_s": {"forward": t_fwd, "forward+backward": t_train},
        "jdpt_s": {"forward": j_fwd, "forward+backward": j_train},
        "jdpt_compile_s": compile_times,
        "ratio_jdpt_over_diffusers": {"forward": j_fwd / t_fwd, "forward+backward": j_train / t_train},
        "jdpt_free_attention_forward+backward_s": t["jdpt forward+backward, free attention"],
    }


def flux_case(repeats: int) -> dict:
    """Flux transformer: 256 image tokens (a 16x16 grid) and 64 text tokens."""
    from diffusers import FluxTransformer2DModel

    rng = np.random.default_rng(0)
    n_img, n_txt = 256, 64
    grid = np.stack(np.meshgrid(np.zeros(1), np.arange(16), np.arange(16), indexing="ij"), -1)
    inputs = {
        "hidden_states": rng.normal(size=(BATCH, n_img, FLUX["in_channels"])),
        "encoder_hidden_states": rng.normal(size=(BATCH, n_txt, FLUX["joint_attention_dim"])),
        "pooled_projections": rng.normal(size=(BATCH, FLUX["pooled_projection_dim"])),
        "timestep": rng.uniform(size=(BATCH,)),
        "img_ids": grid.reshape(-1, 3),
        "txt_ids": np.zeros((n_txt, 3)),
    }
    inputs = {k: v.astype(np.float32) for k, v in inputs.items()}
    ref = FluxTransformer2DModel(**FLUX).eval()
    return {"model": "Flux", "config": FLUX, **_compare(ref, inputs, repeats)}


def unet_case(repeats: int) -> dict:
    """SD-style UNet: 32x32x4 latents (NHWC for jdpt, NCHW for diffusers), 77 text tokens."""
    from diffusers import UNet2DConditionModel

    rng = np.random.default_rng(0)
    inputs = {
        "sample": rng.normal(size=(BATCH, 32, 32, 4)).astype(np.float32),
        "timestep": rng.uniform(0, 1000, size=(BATCH,)).astype(np.float32),
        "encoder_hidden_states": rng.normal(size=(BATCH, 77, UNET["cross_attention_dim"])).astype(np.float32),
    }
    nchw = {**inputs, "sample": np.ascontiguousarray(inputs["sample"].transpose(0, 3, 1, 2))}
    ref = UNet2DConditionModel(**UNET).eval()
    return {"model": "UNet", "config": UNET,
            **_compare(ref, inputs, repeats, torch_inputs=nchw, to_jdpt_layout=lambda out: out.transpose(0, 2, 3, 1))}


CASES = {"flux": flux_case, "unet": unet_case}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="PyTorch intra-op threads (XLA uses all cores)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    wall, busy, own = time.perf_counter(), _busy_cpu_s(), sum(os.times()[:2])
    rows = [CASES[name](args.repeats) for name in args.models]
    # Other workers' CPU use while this ran: the check that the machine was quiet enough.
    others = (_busy_cpu_s() - busy - (sum(os.times()[:2]) - own)) / (time.perf_counter() - wall)
    env = {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "load_average_1_5_15min": {"start": [round(x, 2) for x in load_before],
                                   "end": [round(x, 2) for x in os.getloadavg()]},
        "other_processes_mean_cpu_cores": round(others, 2),
    }
    header = ("| model | pass | diffusers (ms) | jdpt (ms) | jdpt / diffusers | jdpt compile (s) |\n"
              "|---|---|---|---|---|---|")
    lines = [header]
    for r in rows:
        for p in ("forward", "forward+backward"):
            lines.append(
                f"| {r['model']} | {p} | {1e3 * r['diffusers_s'][p]:.1f} | {1e3 * r['jdpt_s'][p]:.1f} | "
                f"{r['ratio_jdpt_over_diffusers'][p]:.2f}x | {r['jdpt_compile_s'][p]:.1f} |"
            )
    table = "\n".join(lines)
    print(table)
    print(f"\n{env}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_models.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    notes = "\n".join(
        f"- {r['model']}: inputs {r['inputs']}, {r['dtype']}, "
        f"max |jdpt - diffusers| = {r['max_abs_diff_vs_diffusers']:.1e} (max |diffusers| = "
        f"{r['max_abs_diffusers_output']:.2g}); config {r['config']}"
        for r in rows
    )
    verdicts = "\n".join(
        f"- {r['model']} forward+backward: target <= {TARGET}x diffusers, reached "
        f"{r['ratio_jdpt_over_diffusers']['forward+backward']:.2f}x "
        f"({'met' if r['ratio_jdpt_over_diffusers']['forward+backward'] <= TARGET else 'NOT met'})"
        for r in rows
    )
    floors = "\n".join(
        f"- {r['model']} forward+backward with every attention call replaced by a free stand-in (its "
        f"projections kept): {1e3 * r['jdpt_free_attention_forward+backward_s']:.1f} ms = "
        f"{r['jdpt_free_attention_forward+backward_s'] / r['diffusers_s']['forward+backward']:.2f}x diffusers' "
        "forward+backward with attention (what jdpt's other layers take)"
        for r in rows
    )
    verdicts = f"{verdicts}\n{floors}"
    print(f"{verdicts}\n{notes}")
    (RESULTS / "bench_models.md").write_text(
        "# jdpt vs diffusers model timings\n\n"
        "Median wall time per call after warm-up, same weights and inputs, same process, the "
        "measurements interleaved repeat by repeat. "
        "forward+backward = gradient of mean(output^2) w.r.t. all parameters. "
        "Produced by `python experiments/bench_models.py`. PyTorch's OpenMP threads slow down far "
        "more than XLA's when other processes compete for the cores, so the ratios mean something only "
        "when `other_processes_mean_cpu_cores` (environment line) is near 0.\n\n"
        f"{table}\n\n{verdicts}\n\n{notes}\n\nEnvironment: `{json.dumps(env)}`\n"
    )


if __name__ == "__main__":
    main()
