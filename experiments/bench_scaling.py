"""Train-step scaling: step time and per-device memory of one flow-matching update of a tiny Flux
on 1, 2, 4 and 8 devices under each sharding preset (``dp``, ``fsdp``, ``fsdp_tp``).

Every configuration runs the same update (:func:`jdpt.parallel.make_train_step`, AdamW) from the
same weights, batch and key: the first step's loss must agree with the 1-device loss (fp32,
relative difference printed; the tests hold it to 1e-5), so the rows compare like with like.
Reported per row:

- step time: median wall time of ``repeats`` updates after a warm-up one (compile time apart);
- param + optimizer bytes per device: read from the arrays' shards (the largest device), against
  the replicated total;
- XLA's ``compiled.memory_analysis()`` of the update (per device: arguments, outputs, temporaries,
  generated code) where the backend reports it.

Meshes: ``dp``: ``data=n``; ``fsdp``: ``fsdp=n``; ``fsdp_tp``: ``tensor=2, fsdp=n/2`` (1 device:
all 1). On a machine without accelerators the devices are simulated CPU devices
(``jax_num_cpu_devices``) sharing the same cores: times then show the partitioning overhead, not
a speed-up; the memory columns are exact either way. On GPU/TPU the same command uses the real
devices (counts above the number present are skipped).

    python experiments/bench_scaling.py [--devices 1 2 4 8] [--presets dp fsdp fsdp_tp] [--repeats 5]
        [--size tiny|small] [--batch 8]

Writes ``experiments/results/bench_scaling.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts; only the CPU backend reads it

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jdpt.models.flux import FluxConfig, FluxTransformer, image_ids  # noqa: E402
from jdpt.parallel import make_mesh, make_train_step  # noqa: E402

RESULTS = Path(__file__).parent / "results"
# Every sharded dimension divides by 8. tiny: width 4 heads x 16 = 64 (MLP 256), 16 image
# tokens (an 8x8 latent packed 2x2) and 4 text tokens; small: width 128, 64 + 8 tokens.
SIZES = {
    "tiny": (FluxConfig(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                        num_attention_heads=4, joint_attention_dim=16, pooled_projection_dim=8,
                        axes_dims_rope=(4, 6, 6)), 8, 4),
    "small": (FluxConfig(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
                         num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32,
                         axes_dims_rope=(8, 12, 12)), 16, 8),
}


@dataclasses.dataclass(frozen=True)
class FlowMatchingSFT:
    """Rectified-flow SFT loss (Liu et al. 2022; Esser et al. 2024's logit-normal t):
    ``x_t = (1 - t) x0 + t eps``, target velocity ``eps - x0``, ``t = sigmoid(N(0, 1))``.

    Batch: ``latents`` ``[B, S_img, C]``, ``context`` ``[B, S_txt, D]``, ``pooled`` ``[B, P]``.
    """

    img_ids: jax.Array
    txt_ids: jax.Array

    def loss(self, params, frozen, batch, key):
        x0 = batch["latents"]
        k_t, k_eps = jax.random.split(key)
        t = jax.nn.sigmoid(jax.random.normal(k_t, x0.shape[:1]))
        eps = jax.random.normal(k_eps, x0.shape)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        v = frozen.model(params)(*frozen.cast((x_t, batch["context"], batch["pooled"])), t,
                                 self.img_ids, self.txt_ids)
        return jnp.mean((v.astype(jnp.float32) - (eps - x0)) ** 2), {"t": t.mean()}


def _mesh(preset: str, devices: list[jax.Device]):
    n = len(devices)
    sizes = {"dp": dict(data=n), "fsdp": dict(data=1, fsdp=n),
             "fsdp_tp": dict(data=1, fsdp=max(n // 2, 1), tensor=min(n, 2))}[preset]
    return make_mesh(**sizes, devices=devices)


def _random_model(config: FluxConfig, seed: int) -> FluxTransformer:
    """Every variable random (0.1-scale Gaussian), held in host arrays."""
    model = nnx.eval_shape(lambda: FluxTransformer(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(nnx.state(model)):
        var.set_value((rng.normal(size=var.get_value().shape) * 0.1).astype(np.float32))
    return model


def _batch(config: FluxConfig, size: int, latent: int, text: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    tokens = (latent // 2) ** 2
    return {"latents": rng.normal(size=(size, tokens, config.in_channels)).astype(np.float32),
            "context": rng.normal(size=(size, text, config.joint_attention_dim)).astype(np.float32),
            "pooled": rng.normal(size=(size, config.pooled_projection_dim)).astype(np.float32)}


def _bytes_per_device(tree) -> dict[jax.Device, int]:
    held: dict[jax.Device, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return held


def _memory_analysis(compiled) -> dict | None:
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError):
        return None
    if stats is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {name: int(getattr(stats, name)) for name in fields if hasattr(stats, name)}


def run_case(preset: str, devices: list[jax.Device], model, batch, objective, repeats: int) -> dict:
    mesh = _mesh(preset, devices)
    init, step = make_train_step(objective, optax.adamw(1e-4), mesh, model=model, rules=preset)
    state = init(model)
    key = jax.random.key(0)
    held = _bytes_per_device((state.params, state.opt_state))
    replicated = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))

    start = time.perf_counter()
    compiled = step.lower(state, batch, key).compile()
    compile_s = time.perf_counter() - start
    memory = _memory_analysis(compiled)

    state, metrics = step(state, batch, key)  # warm-up (the jit cache holds the compiled update)
    first_loss = float(metrics["loss"])
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        state, metrics = step(state, batch, jax.random.fold_in(key, i + 1))
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {
        "preset": preset,
        "devices": len(devices),
        "mesh": dict(mesh.shape),
        "step_s": statistics.median(times),
        "compile_s": compile_s,
        "first_loss": first_loss,
        "param_opt_bytes_per_device_max": max(held.values()),
        "param_opt_bytes_replicated": replicated,
        "memory_analysis": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--presets", nargs="+", choices=["dp", "fsdp", "fsdp_tp"],
                        default=["dp", "fsdp", "fsdp_tp"])
    parser.add_argument("--batch", type=int, default=8, help="global batch (a multiple of every device count)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    args = parser.parse_args()
    config, latent, text = SIZES[args.size]

    available = jax.devices()
    counts = [n for n in args.devices if n <= len(available)]
    skipped = [n for n in args.devices if n > len(available)]
    bad = [n for n in counts if args.batch % n]
    if bad:
        raise SystemExit(f"--batch {args.batch} is not divisible by device count(s) {bad}; "
                         "use a multiple of every count")
    model, batch = _random_model(config, 0), _batch(config, args.batch, latent, text)
    objective = FlowMatchingSFT(image_ids(latent, latent), jnp.zeros((text, 3)))
    wall = time.perf_counter()
    rows = []
    for n in counts:
        for preset in args.presets:
            row = run_case(preset, available[:n], model, batch, objective, args.repeats)
            rows.append(row)
            print(f"{preset:8s} {n} devices: {1e3 * row['step_s']:.1f} ms/step", flush=True)
    reference = {r["preset"]: r["first_loss"] for r in rows if r["devices"] == min(counts)}
    for r in rows:
        r["first_loss_rel_diff_vs_fewest_devices"] = abs(r["first_loss"] / reference[r["preset"]] - 1)

    simulated = available[0].platform == "cpu"
    env = {
        "platform": available[0].platform,
        "device_kind": available[0].device_kind,
        "devices_available": len(available),
        "simulated_cpu_devices": simulated,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "size": args.size,
        "model": dataclasses.asdict(config),
        "tokens": {"image": (latent // 2) ** 2, "text": text},
        "global_batch": args.batch,
        "repeats": args.repeats,
        "optimizer": "adamw (fp32 params and moments)",
        "skipped_device_counts": skipped,
        "wall_s": round(time.perf_counter() - wall, 1),
    }

    def mib(x):
        return f"{x / 2**20:.2f}"

    lines = ["| preset | devices | mesh (data, fsdp, tensor) | step (ms) | compile (s) | "
             "param+opt MiB/device (max) | / replicated | XLA args MiB | XLA temp MiB | "
             f"first loss | rel. diff vs {min(counts)} device(s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["memory_analysis"] or {}
        lines.append(
            f"| {r['preset']} | {r['devices']} | {tuple(r['mesh'].values())} | {1e3 * r['step_s']:.1f} | "
            f"{r['compile_s']:.1f} | {mib(r['param_opt_bytes_per_device_max'])} | "
            f"{r['param_opt_bytes_per_device_max'] / r['param_opt_bytes_replicated']:.3f} | "
            f"{mib(m['argument_size_in_bytes']) if 'argument_size_in_bytes' in m else 'n/a'} | "
            f"{mib(m['temp_size_in_bytes']) if 'temp_size_in_bytes' in m else 'n/a'} | "
            f"{r['first_loss']:.6f} | {r['first_loss_rel_diff_vs_fewest_devices']:.1e} |")
    table = "\n".join(lines)
    print(table)
    where = (f"{len(available)} simulated CPU devices (`jax_num_cpu_devices`) sharing {os.cpu_count()} "
             "CPU cores: the step times show partitioning and communication overhead, not a "
             "speed-up (more devices = the same cores doing more bookkeeping)"
             if simulated else f"{len(available)} x {available[0].device_kind}")
    print(f"\nRan on {where}.")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_scaling.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    (RESULTS / "bench_scaling.md").write_text(
        "# Train-step scaling by sharding preset\n\n"
        f"Ran on {where}. Produced by `python experiments/bench_scaling.py"
        f"{' --devices ' + ' '.join(map(str, args.devices)) if args.devices != [1, 2, 4, 8] else ''}"
        f"{' --repeats ' + str(args.repeats) if args.repeats != 5 else ''}"
        f"{' --size ' + args.size if args.size != 'tiny' else ''}`.\n\n"
        f"One flow-matching SFT update (AdamW) of a {args.size} Flux ({config.num_layers} double + "
        f"{config.num_single_layers} single blocks, width {config.inner_dim}), global batch "
        f"{args.batch}, {(latent // 2) ** 2} image + {text} text tokens, fp32. Step time: median of "
        f"{args.repeats} updates after a warm-up. param+opt MiB/device: the largest device's share of "
        "the parameters and optimizer state, read from the arrays' shards; `/ replicated` divides it "
        "by the unsharded total (1 = every device holds everything). XLA args/temp: "
        "`compiled.memory_analysis()` of the update, per device. The first step's loss agrees across "
        "meshes (last column): the rows compute the same update.\n\n"
        f"{table}\n\nEnvironment: `{json.dumps(env)}`\n")


if __name__ == "__main__":
    main()
