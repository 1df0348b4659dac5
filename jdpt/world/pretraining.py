"""Pretraining a Shapes-world model from scratch, through the one training loop.

Text tower and denoiser are trained jointly on (prompt, scene) pairs rendered on the fly
(:class:`jdpt.world.data.SceneBatches`) with the library's :class:`~jdpt.objectives.SFT`
objective through the world's adapter, by ``jdpt.parallel.make_train_step`` and
``jdpt.train.fit``: a killed or interrupted pretraining resumes from its last checkpoint. The
Flux world trains with rectified flow, ``x_t = (1 - t) x0 + t eps``, ``t`` logit-normal centred
at ``noise_mean`` (SD3's sampling of training noise levels, Esser et al. 2024), target velocity
``eps - x0``; the UNet world as an eps-prediction DDPM. Prompts are dropped to the empty prompt
with probability ``uncond_prob`` so the model also learns the unconditional prediction that
classifier-free guidance needs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path

import jax
import optax
from flax import nnx

from jdpt.objectives.sft import SFT, ForwardProcess
from jdpt.parallel import make_mesh, make_train_step
from jdpt.train import fit
from jdpt.world.adapter import unet_world_eps, world_velocity
from jdpt.world.data import SceneBatches, stream
from jdpt.world.model import WorldConfig, WorldModel
from jdpt.world.unet_model import UNetWorldConfig, UNetWorldModel


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Optimisation of the Shapes-world model.

    Attributes:
        steps: optimizer steps.
        batch_size: (prompt, scene) pairs per step.
        learning_rate: AdamW peak rate (linear warm-up, cosine decay to 10%).
        warmup_steps: linear warm-up length.
        weight_decay: AdamW decoupled weight decay.
        grad_clip: global gradient-norm clip.
        uncond_prob: probability of replacing a prompt by the empty prompt.
        seed: initialisation, data and noise seed.
    """

    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    uncond_prob: float = 0.1
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 <= self.uncond_prob < 1:
            raise ValueError(f"uncond_prob={self.uncond_prob} must be in [0, 1)")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")

    def optimizer(self) -> optax.GradientTransformation:
        warmup = min(self.warmup_steps, max(self.steps - 1, 1))
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, warmup, max(self.steps, warmup + 1), end_value=0.1 * self.learning_rate
        )
        return optax.chain(optax.clip_by_global_norm(self.grad_clip),
                           optax.adamw(schedule, b2=0.99, weight_decay=self.weight_decay))


def pretraining_objective(world: WorldConfig | UNetWorldConfig) -> SFT:
    """The world's pretraining loss: :class:`SFT` through its adapter (rectified flow with
    logit-normal(``noise_mean``, 1) sigmas for the Flux world, DDPM eps for the UNet world)."""
    if isinstance(world, UNetWorldConfig):
        return SFT(unet_world_eps, ForwardProcess.ddpm(world.schedule()))
    return SFT(world_velocity, ForwardProcess(timesteps="logit_normal", logit_mean=world.noise_mean))


def pretrain(world: WorldConfig | UNetWorldConfig, train: PretrainConfig, *, progress: bool = True,
             log_every: int = 50, checkpoint_dir: str | Path | None = None,
             save_every: int = 1000) -> tuple[WorldModel | UNetWorldModel, dict]:
    """Train a Shapes-world model from scratch with ``jdpt.train.fit``; returns it and its history
    (``step`` and ``loss`` every ``log_every`` steps of the whole run, ``seconds`` of this call).

    ``checkpoint_dir``: the run's folder; a run interrupted there (Ctrl-C, a kill) resumes from
    its last checkpoint (every ``save_every`` steps) when called again with it. None: a temporary
    folder, removed at the end. Scenes are rendered by grain's reader threads while the previous
    step runs; one device trains (the world is small).
    """
    model = world.build(nnx.Rngs(train.seed))
    mesh = make_mesh(devices=jax.devices()[:1])
    init_state, step = make_train_step(pretraining_objective(world), train.optimizer(), mesh, model=model)
    loader = stream(SceneBatches(world, train.batch_size, train.seed, train.uncond_prob), train.steps)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else Path(tempfile.mkdtemp(prefix="jdpt-pretrain-"))
    start = time.perf_counter()
    try:
        state, _ = fit(step, init_state(model), loader, key=jax.random.key(train.seed + 1),
                             num_steps=train.steps, checkpoint_dir=directory, save_every=save_every,
                             log_every=log_every, progress=progress)
        lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    finally:
        if checkpoint_dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    nnx.update(model, state.params)
    return model, {"step": [line["step"] for line in lines], "loss": [line["loss"] for line in lines],
                   "seconds": time.perf_counter() - start}
