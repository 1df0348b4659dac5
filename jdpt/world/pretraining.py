"""Pretraining the Shapes-world model from scratch with rectified-flow matching.

Text tower and Flux are trained jointly on (prompt, scene) pairs rendered on the fly:
``x_t = (1 - t) x_0 + t eps`` with ``t`` logit-normal (SD3's sampling of training noise levels,
Esser et al. 2024), target velocity ``eps - x_0``, mean squared error. Prompts are dropped to the
empty prompt with probability ``uncond_prob`` so the model also learns the unconditional velocity
that classifier-free guidance needs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from jdpt.world.model import CFG_SCALE, SAMPLING_STEPS, WorldConfig, WorldModel, empty_prompt, make_sampler
from jdpt.world.scenes import CATEGORIES, Prompt, as_rng, sample_pairs, sample_prompts
from jdpt.world.verifier import Verdict, verify


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


def flow_matching_loss(model: WorldModel, input_ids: jax.Array, images: jax.Array, key: jax.Array) -> jax.Array:
    """Rectified-flow loss of ``model`` on uint8 scenes ``[B, H, W, 3]`` and their token ids."""
    return model.training_loss(input_ids, images, key)


def make_pretrain_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation) -> Callable:
    """``step((params, opt_state), batch) -> ((params, opt_state), metrics)``; jit it once.

    ``batch`` holds ``input_ids`` ``[B, L]``, ``images`` uint8 ``[B, H, W, 3]`` and a ``key``.
    """

    def step(state, batch):
        params, opt_state = state

        def loss_fn(p):
            return nnx.merge(graphdef, p).training_loss(batch["input_ids"], batch["images"], batch["key"])

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


def pretrain(world: WorldConfig, train: PretrainConfig, *, progress: bool = True,
             log_every: int = 50) -> tuple[WorldModel, dict]:
    """Train a Shapes-world model from scratch; returns it and a history of the loss.

    Scenes are rendered on the host while the previous step runs (JAX dispatch is asynchronous);
    the loss is read back every ``log_every`` steps only.
    """
    model = world.build(nnx.Rngs(train.seed))
    graphdef, params = nnx.split(model)
    optimizer = train.optimizer()
    state = (params, optimizer.init(params))
    step = jax.jit(make_pretrain_step(graphdef, optimizer), donate_argnums=0)
    rng = np.random.default_rng(train.seed)
    key = jax.random.key(train.seed + 1)
    empty = empty_prompt()
    history = {"step": [], "loss": []}
    start = time.perf_counter()
    bar = tqdm(range(train.steps), desc="pretrain", unit="step", disable=not progress)
    pending = []
    for i in bar:
        prompts, images = sample_pairs(rng, train.batch_size, world.shapes)
        ids = model.tokenize([p.text for p in prompts])
        ids[rng.random(len(ids)) < train.uncond_prob] = empty
        state, metrics = step(state, {"input_ids": ids, "images": images, "key": jax.random.fold_in(key, i)})
        pending.append(metrics["loss"])
        if (i + 1) % log_every == 0 or i + 1 == train.steps:
            loss = float(np.mean(jax.device_get(pending)))
            pending = []
            history["step"].append(i + 1)
            history["loss"].append(loss)
            bar.set_postfix(loss=f"{loss:.4f}")
    bar.close()
    history["seconds"] = time.perf_counter() - start
    nnx.update(model, state[0])
    return model, history


def eval_prompts(n_per_category: int, world: WorldConfig, seed: int = 2024) -> list[Prompt]:
    """A fixed prompt set: ``n_per_category`` prompts of each GenEval category, category-major."""
    rng = as_rng(seed)
    return [p for c in CATEGORIES for p in sample_prompts(rng, n_per_category, world.shapes, categories=[c])]


def evaluate(model: WorldModel, prompts: list[Prompt], *, seed: int = 0, steps: int = SAMPLING_STEPS,
             cfg_scale: float = CFG_SCALE, batch_size: int = 64, progress: bool = True) -> tuple[np.ndarray, Verdict]:
    """Sample one image per prompt and score it with the verifier (GenEval-lite)."""
    sample = make_sampler(model, steps=steps, cfg_scale=cfg_scale)
    key = jax.random.key(seed)
    chunks = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="sample", unit="batch", disable=not progress):
        chunk = prompts[i:i + batch_size]
        ids = model.tokenize([p.text for p in chunk])
        pad = batch_size - len(ids)  # one compiled shape for every chunk
        ids = np.concatenate([ids, np.repeat(ids[-1:], pad, axis=0)])
        chunks.append(np.asarray(sample(ids, jax.random.fold_in(key, i)))[: len(chunk)])
    images = np.concatenate(chunks)
    return images, verify(images, prompts, model.config.shapes)

