"""An online method through the one loop survives a kill: DiffusionNFT (rollouts, host rewards,
on-device advantages, the old policy in the train state) run by ``jdpt.train.fit`` in a child
process that is SIGKILLed mid-run, then resumed in another, equals an uninterrupted run (a third
child) bit for bit: every logged metric, the trained adapters and the old policy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

from jdpt.models.lora import add_lora
from jdpt.objectives import NFT
from jdpt.parallel import make_mesh, make_train_step
from jdpt.rewards import jpeg_compressibility
from jdpt.train import fit, make_online_step
from jdpt.world import WorldConfig, WorldModel, world_velocity
from jdpt.world.data import PromptBatches, stream

ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY, KILL_AT = 6, 2, 5
TINY = WorldConfig(width=32, heads=2, text_layers=1, double_layers=1, single_layers=0)
WALL_CLOCK = ("time", "rollout_seconds")  # logged, but not a function of the run's inputs


def run(directory: str | Path, kill_at: int | None = None):
    """NFT with LoRA on a tiny random world model, 2 prompts x 2 samples per step, JPEG
    compressibility rewards (they vary between random images); SIGKILL after step ``kill_at``."""
    model = WorldModel(TINY, rngs=nnx.Rngs(0))
    add_lora(model, [r"attn\.to_[qkv]"], rank=2, rngs=nnx.Rngs(1))
    objective = NFT(world_velocity, num_steps=2, shift=1.0)
    init, update = make_train_step(objective, optax.adamw(3e-3), make_mesh(devices=jax.devices()[:1]), model=model,
                                   trainable="lora")
    step = make_online_step(objective, update, reward=jpeg_compressibility, group_size=2,
                            decode=lambda m, frozen, x0: world_velocity.images(m, x0),
                            latent_shape=world_velocity.latent_shape(model))

    def kill(done, state, metrics):
        if done == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    return fit(step, init(model), stream(PromptBatches(TINY.shapes, 2, seed=5), threads=1),
               key=jax.random.key(3), num_steps=STEPS, checkpoint_dir=directory, save_every=SAVE_EVERY, log_every=1,
               progress=False, hooks=[kill])


def _lines(directory: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
            for line in (directory / "metrics.jsonl").read_text().splitlines()]


def child(directory: str, kill_at: int) -> None:
    """The body of a child process: :func:`run` (killed after step ``kill_at`` > 0), then the final
    params and old policy into ``directory/final.npz``."""
    state, _ = run(directory, kill_at=kill_at or None)
    leaves = jax.tree.leaves(jax.device_get((state.params, state.aux)))
    np.savez(Path(directory) / "final.npz", *leaves, step=int(state.step))


def _child(directory: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    """:func:`child` in a fresh interpreter configured as this test suite (8 simulated devices,
    XLA's optimisation passes off): every run of the comparison starts from the same process state."""
    code = ("import jax; jax.config.update('jax_num_cpu_devices', 8); "
            "jax.config.update('jax_disable_most_optimizations', True); import sys; "
            "from tests.train.test_online_resume import child; child(sys.argv[1], int(sys.argv[2]))")
    return subprocess.run([sys.executable, "-c", code, str(directory), str(kill_at)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_killed_online_run_resumes_bit_for_bit(tmp_path):
    reference, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    done = _child(reference)
    assert done.returncode == 0, done.stderr[-3000:]
    died = _child(killed, KILL_AT)
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert len(_lines(killed)) == KILL_AT  # it logged every step up to the kill
    resumed = _child(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = _lines(reference)
    assert [line["step"] for line in want] == list(range(1, STEPS + 1))
    assert _lines(killed) == want  # the resumed run logged the steps after its checkpoint again, once
    assert len({line["reward"] for line in want}) > 1 and any(line["advantage_abs"] > 0 for line in want)
    got, ref = np.load(killed / "final.npz"), np.load(reference / "final.npz")
    assert int(got["step"]) == STEPS and sorted(got.files) == sorted(ref.files) and len(got.files) > 2
    for name in ref.files:  # the adapters, then the old policy
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
