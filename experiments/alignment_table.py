"""Alignment methods on the Shapes world: GenEval-lite before/after a fixed compute budget.

Seven post-training methods start from the same cached base model (``jdpt.world.base_model``)
and train for the same wall-clock budget each (or a fixed number of steps):

- offline, on one preference data set made once by the base model and the verifier: SFT on the
  winners, Diffusion-DPO (its flow form: velocity MSEs), MaPO;
- online, the verifier's 0/1 score (GenEval-lite) as the reward: DDPO (DDIM eta = 1 rollouts
  through ``flow_as_epsilon``), Flow-GRPO, DiffusionNFT;
- reward backprop (AlignProp: randomised truncation) on a differentiable surrogate, the soft
  colour-mass reward below (the verifier is not differentiable).

Per method: GenEval-lite per category and overall on a fixed held-out prompt set with fixed seeds,
before and after; a reward-vs-step curve (a small probe set scored by the verifier every few
steps, plus the training reward of the online methods); mean step time after compile; the train
step's compiled memory (``memory_analysis()``: arguments + outputs + temporaries); steps done;
the paper's headline number beside ours. DiffusionNFT vs Flow-GRPO: the steps NFT needs to reach
Flow-GRPO's final probe score.

    python experiments/alignment_table.py [--preset default] [--budget-seconds 240 | --steps N]
        [--methods sft,dpo,...] [--full] [--out experiments/results]

Writes ``alignment.json``, ``alignment.md`` and ``alignment_curves.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from jdpt.data.preference import preference_pairs
from jdpt.data.shapes import CATEGORIES, PALETTE, Prompt, ShapesConfig, render, sample_prompts
from jdpt.diffusion.pipeline import to_uint8
from jdpt.diffusion.samplers import euler_flow
from jdpt.diffusion.schedules import DDPMSchedule, flow_sigmas
from jdpt.models.flux import unpack_latents
from jdpt.models.lora import add_lora
from jdpt.objectives import DDPO, DPO, NFT, SFT, AlignProp, FlowGRPO, MaPO, PerPromptStatTracker
from jdpt.objectives.advantages import group_advantages
from jdpt.objectives.ddpo import flow_as_epsilon
from jdpt.objectives.denoiser import world_velocity
from jdpt.objectives.nft import update_old
from jdpt.parallel import make_mesh, make_train_step
from jdpt.parallel.step import Frozen
from jdpt.rewards.verifier import verify
from jdpt.world.cache import PRESETS, base_model, model_dir
from jdpt.world.model import CFG_SCALE, SAMPLING_STEPS, WorldModel
from jdpt.world.pretraining import eval_prompts

RESULTS = Path(__file__).parent / "results"
METHODS = ("sft", "dpo", "mapo", "ddpo", "reward_backprop", "flow_grpo", "nft")
OFFLINE = ("sft", "dpo", "mapo")
LABELS = {"sft": "SFT on winners", "dpo": "Diffusion-DPO", "mapo": "MaPO", "ddpo": "DDPO",
          "reward_backprop": "Reward backprop (AlignProp)", "flow_grpo": "Flow-GRPO", "nft": "DiffusionNFT"}
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
REWARDS = {
    "sft": "none: denoising regression on the verifier's winners (offline)",
    "dpo": "verifier preference pairs (offline)",
    "mapo": "verifier preference pairs (offline)",
    "ddpo": "verifier score 0/1 (online)",
    "reward_backprop": "soft colour-mass surrogate (differentiable; blind to shape and position)",
    "flow_grpo": "verifier score 0/1 (online)",
    "nft": "verifier score 0/1 (online)",
}
# Flow-GRPO's LoRA targets for SD3 (attention projections of both streams), Flux names.
LORA_TARGETS = [r"attn\.to_[qkv]", r"attn\.to_out\.0", r"attn\.add_[qkv]_proj", r"attn\.to_add_out"]
# Learning rates with LoRA: the papers' where they train LoRA (DDPO, Flow-GRPO, DiffusionNFT
# 3e-4; AlignProp 1e-3); SFT / DPO / MaPO are full fine-tunes in their papers: 3e-4 too here.
# Full fine-tuning (--full) divides them by 10.
LORA_LR = {"sft": 3e-4, "dpo": 3e-4, "mapo": 3e-4, "ddpo": 3e-4, "reward_backprop": 1e-3,
           "flow_grpo": 3e-4, "nft": 3e-4}
CLIP_NORM = {"reward_backprop": 5.0}  # AlignProp's max_grad_norm; the rest: Flow-GRPO's 1.0


@dataclasses.dataclass(frozen=True)
class Settings:
    """The run's toy-scale settings (the papers' values in comments where they differ).

    Attributes:
        prompts_per_step: prompts per online iteration (Flow-GRPO / NFT: 48 groups).
        group_size: samples per prompt (Flow-GRPO / NFT: 24).
        pairs_per_step: preference pairs (SFT: winner images) per offline step.
        rollout_steps: sampler steps of online rollouts and reward backprop (Flow-GRPO / NFT: 10;
            DDPO: 50 DDIM; AlignProp: 50).
        offline_prompts, offline_samples: the offline data: prompts x samples of the base model.
        max_pairs_per_prompt: preference pairs kept per prompt.
        lora_rank: adapter rank (alpha = 2 rank, Flow-GRPO's r32 / alpha 64 ratio).
        eval_per_category: held-out GenEval-lite prompts per category (before / after).
        probe_per_category: prompts per category of the curve's probe set.
        probes: probe evaluations along a run (plus one at step 0).
        seed: data, noise and initialisation seed.
    """

    prompts_per_step: int = 4
    group_size: int = 8
    pairs_per_step: int = 32
    rollout_steps: int = 10
    offline_prompts: int = 64
    offline_samples: int = 8
    max_pairs_per_prompt: int = 8
    lora_rank: int = 16
    eval_per_category: int = 32
    probe_per_category: int = 8
    probes: int = 10
    seed: int = 0


# ---------------------------------------------------------------- the differentiable surrogate


def object_areas(config: ShapesConfig, n: int = 64, seed: int = 0) -> dict[str, float]:
    """Mean foreground pixels of one rendered object of each shape (sizes and offsets random)."""
    images = render([f"a {s}" for s in config.shapes for _ in range(n)], seed, config)
    pixels = (images.max(axis=-1) > 127).sum(axis=(1, 2)).reshape(len(config.shapes), n)
    return {s: float(p.mean()) for s, p in zip(config.shapes, pixels)}


def mass_targets(prompts: list[Prompt], config: ShapesConfig, areas: dict[str, float]) -> dict[str, np.ndarray]:
    """What :func:`colour_mass_reward` compares against, per prompt: ``mass_target [B, K]`` (pixels
    of each of the ``K`` colours named), ``mass_named [B, K]`` (1 where named) and
    ``mass_total [B]`` (all foreground pixels), from the objects named: ``count x areas[shape]``."""
    k = len(config.colors)
    target, named = np.zeros((len(prompts), k), np.float32), np.zeros((len(prompts), k), np.float32)
    total = np.zeros(len(prompts), np.float32)
    for i, prompt in enumerate(prompts):
        for spec in prompt.objects:
            mass = spec.count * areas[spec.shape]
            total[i] += mass
            if spec.color is not None:
                c = config.colors.index(spec.color)
                target[i, c] += mass
                named[i, c] = 1.0
    return {"mass_target": target, "mass_named": named, "mass_total": total}


def colour_mass_reward(images: jax.Array, targets: dict, colors: tuple[str, ...], *,
                       fg_temperature: float = 0.05, color_temperature: float = 0.05) -> jax.Array:
    """A smooth stand-in for GenEval-lite's colour and count checks: ``[B]`` rewards <= 0.

    ``images [B, H, W, 3]`` in ``[-1, 1]``. A pixel is foreground with weight
    ``sigmoid((max_rgb - 1/2) / fg_temperature)`` (the verifier's threshold, softened) and belongs
    to colour ``k`` with ``softmax_k(cos(rgb, palette_k) / color_temperature)`` (the verifier's
    nearest RGB direction, softened). With soft pixel masses ``m_k`` and ``s(d) = sqrt(d² + 1) - 1``:

        r = -[sum_{k named} s(m_k - target_k) + s(sum_k m_k - total)] / total

    i.e. the pixel-mass error of each named colour and of the whole foreground, relative to the
    foreground the prompt asks for (``targets`` from :func:`mass_targets`). Blind to shape and
    position.
    """
    x = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    fg = jax.nn.sigmoid((x.max(axis=-1) - 0.5) / fg_temperature)  # [B, H, W]
    dirs = np.array([PALETTE[c] for c in colors], np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    unit = x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)
    share = jax.nn.softmax(unit @ dirs.T / color_temperature, axis=-1)  # [B, H, W, K]
    mass = jnp.sum(fg[..., None] * share, axis=(1, 2))  # [B, K]
    smooth_abs = lambda d: jnp.sqrt(d * d + 1.0) - 1.0  # noqa: E731
    colour = jnp.sum(targets["mass_named"] * smooth_abs(mass - targets["mass_target"]), axis=-1)
    total = smooth_abs(mass.sum(axis=-1) - targets["mass_total"])
    return -(colour + total) / targets["mass_total"]


# ---------------------------------------------------------------- sampling and scoring


def latent_shape(model: WorldModel) -> tuple[int, int]:
    h, w = model.latent_size
    return h * w // 4, model.config.flux_config().in_channels


def decode(model: WorldModel, x0: jax.Array) -> jax.Array:
    """Packed latents ``[B, N, C]`` -> float images ``[B, H, W, 3]`` in ``[-1, 1]``."""
    h, w = model.latent_size
    return model.config.codec().decode_latents(unpack_latents(x0.astype(jnp.float32), h, w))


@jax.jit
def _generate(params: nnx.State, frozen: Frozen, ids: jax.Array, key: jax.Array) -> jax.Array:
    """The world's evaluation sampler (20 Euler steps, no CFG): uint8 ``[B, H, W, 3]``."""
    return frozen.model(params).generate(ids, key, steps=SAMPLING_STEPS, cfg_scale=CFG_SCALE)


@functools.partial(jax.jit, static_argnames=("steps", "shift"))
def _euler_rollout(params, frozen: Frozen, ids, noise, *, steps: int, shift: float):
    """Deterministic Euler samples ``x0 [B, N, C]`` (DiffusionNFT's rollouts, CFG 1)."""
    model = frozen.model(params)
    cond = {"input_ids": ids}
    b = noise.shape[0]
    return euler_flow(lambda x, s: world_velocity(model, x, jnp.full((b,), s), cond), noise,
                      flow_sigmas(steps, shift=shift))


def geneval(params, frozen: Frozen, prompts: list[Prompt], config: ShapesConfig, *, seed: int,
            batch_size: int = 64) -> tuple[dict[str, float], np.ndarray]:
    """GenEval-lite of one sample per prompt (seeded per chunk like ``jdpt.world.evaluate``):
    the per-category summary and the ``[B]`` 0/1 scores."""
    key = jax.random.key(seed)
    tokenize = frozen.model(params).tokenize
    chunks = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids = tokenize([p.text for p in chunk])
        ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - len(ids), axis=0)])
        chunks.append(np.asarray(_generate(params, frozen, ids, jax.random.fold_in(key, i)))[: len(chunk)])
    verdict = verify(np.concatenate(chunks), prompts, config)
    return verdict.summary(), verdict.score


def standard_error(summary: dict[str, float], n_per_category: int) -> float:
    """Binomial standard error of the overall score (mean of the category means)."""
    cats = [v for k, v in summary.items() if k != "overall"]
    return math.sqrt(sum(p * (1 - p) / n_per_category for p in cats)) / len(cats)


# ---------------------------------------------------------------- the methods


@dataclasses.dataclass
class Run:
    """One method's pieces: ``batch(state, i) -> (batch, train reward or None)`` does the host
    work of iteration ``i`` (rollout, reward, advantages, or drawing offline data);
    ``after(state, i) -> state`` runs after the update (NFT's old-policy refresh)."""

    objective: Any
    batch: Callable[[Any, int], tuple[dict, float | None]]
    extra: Callable[[nnx.State], Any] = lambda params: None
    after: Callable[[Any, int], Any] = lambda state, i: state
    reward_name: str = ""


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _world_images(model: WorldModel, x0) -> np.ndarray:
    return np.asarray(to_uint8(decode(model, jnp.asarray(x0))))


@dataclasses.dataclass
class OfflineData:
    """The base model's samples on the training prompts, scored, and their preference pairs."""

    latents: np.ndarray  # [P, K, N, C]
    ids: np.ndarray  # [P, L]
    pairs: Any  # PreferencePairs
    winners: np.ndarray  # [W, 2] unique (prompt, sample) of the pairs' winners
    score: float  # mean verifier score of the samples
    seconds: float


def make_offline_data(base: WorldModel, settings: Settings, *, progress: bool) -> OfflineData:
    """``offline_prompts x offline_samples`` base-model samples (the evaluation sampler) on
    training prompts, scored by the verifier; pairs of differing scores (shared by SFT / DPO / MaPO)."""
    start = time.perf_counter()
    config = base.config.shapes
    prompts = sample_prompts(settings.seed + 1, settings.offline_prompts, config)
    k = settings.offline_samples
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)
    frozen = Frozen(graphdef, rest)
    ids = base.tokenize([p.text for p in prompts])
    flat_ids = np.repeat(ids, k, axis=0)
    flat_prompts = [p for p in prompts for _ in range(k)]
    images = []
    key = jax.random.key(settings.seed + 2)
    for i in tqdm(range(0, len(flat_ids), 64), desc="offline data", disable=not progress):
        chunk = flat_ids[i:i + 64]
        pad = np.concatenate([chunk, np.repeat(chunk[-1:], 64 - len(chunk), axis=0)])
        images.append(np.asarray(_generate(params, frozen, pad, jax.random.fold_in(key, i)))[: len(chunk)])
    images = np.concatenate(images)
    scores = verify(images, flat_prompts, config).score.reshape(len(prompts), k)
    pairs = preference_pairs(scores, settings.seed, max_pairs_per_prompt=settings.max_pairs_per_prompt)
    if len(pairs) == 0:
        raise ValueError(f"the base model's {len(prompts)} x {k} offline samples gave no preference pair "
                         f"(mean score {scores.mean():.3f}): raise --offline-prompts / --offline-samples")
    latents = np.asarray(base.latents(jnp.asarray(images))).reshape(len(prompts), k, *latent_shape(base))
    winners = np.unique(np.stack([pairs.prompt, pairs.winner], axis=1), axis=0)
    return OfflineData(latents, ids, pairs, winners, float(scores.mean()), time.perf_counter() - start)


def offline_run(method: str, data: OfflineData, settings: Settings) -> Run:
    rng = np.random.default_rng(settings.seed + 3)
    n = settings.pairs_per_step

    def pair_batch(state, i):
        j = rng.integers(len(data.pairs), size=n)
        p, w, lo = data.pairs.prompt[j], data.pairs.winner[j], data.pairs.loser[j]
        return {"x0_w": data.latents[p, w], "x0_l": data.latents[p, lo], "cond": {"input_ids": data.ids[p]}}, None

    def winner_batch(state, i):
        p, w = data.winners[rng.integers(len(data.winners), size=n)].T
        return {"x0": data.latents[p, w], "cond": {"input_ids": data.ids[p]}}, None

    if method == "sft":
        return Run(SFT(), winner_batch)
    return Run(DPO() if method == "dpo" else MaPO(), pair_batch)


class Prompts:
    """Training prompts of the online methods: ``prompts_per_step`` fresh grammar prompts per
    iteration, each repeated ``group_size`` times (consecutive groups)."""

    def __init__(self, model: WorldModel, settings: Settings):
        self.model, self.settings = model, settings
        self.rng = np.random.default_rng(settings.seed + 4)

    def draw(self) -> tuple[list[Prompt], np.ndarray, np.ndarray]:
        s = self.settings
        prompts = [p for p in sample_prompts(self.rng, s.prompts_per_step, self.model.config.shapes)
                   for _ in range(s.group_size)]
        noise = self.rng.standard_normal((len(prompts), *latent_shape(self.model))).astype(np.float32)
        return prompts, self.model.tokenize([p.text for p in prompts]), noise


def online_run(method: str, model: WorldModel, settings: Settings, areas: dict[str, float]) -> Run:
    config = model.config.shapes
    source = Prompts(model, settings)
    key = jax.random.key(settings.seed + 5)
    g = settings.group_size

    def verifier_reward(prompts, x0) -> np.ndarray:
        return verify(_world_images(model, x0), prompts, config).score

    if method in ("ddpo", "flow_grpo"):
        if method == "ddpo":
            objective = DDPO(flow_as_epsilon(world_velocity, DDPMSchedule.stable_diffusion()),
                             num_steps=settings.rollout_steps, cfg_scale=1.0)
            tracker = PerPromptStatTracker()
        else:
            objective = FlowGRPO(world_velocity, num_steps=settings.rollout_steps, shift=model.config.shift,
                                 cfg_scale=1.0)
        rollout = jax.jit(lambda params, frozen, cond, noise, key: objective.rollout(
            frozen.model(params), cond, noise, key))

        def rl_batch(state, i):
            prompts, ids, noise = source.draw()
            batch, x0 = rollout(state.params, state.frozen, {"input_ids": ids}, noise, jax.random.fold_in(key, i))
            batch = jax.device_get(batch)
            rewards = verifier_reward(prompts, x0)
            batch["advantages"] = (tracker.update([p.text for p in prompts], rewards) if method == "ddpo"
                                   else group_advantages(rewards, g))
            return batch, float(rewards.mean())

        return Run(objective, rl_batch, reward_name="verifier score of the rollouts")

    if method == "nft":
        sigmas = flow_sigmas(settings.rollout_steps, shift=model.config.shift)
        num_train = max(1, int(settings.rollout_steps * 0.99))  # the reference trains 9 of 10 steps
        objective = NFT(timesteps=tuple(float(s) for s in sigmas[:num_train]))

        def nft_batch(state, i):
            prompts, ids, noise = source.draw()
            x0 = _euler_rollout(state.frozen.extra["old"], state.frozen, ids, noise,
                                steps=settings.rollout_steps, shift=model.config.shift)
            rewards = verifier_reward(prompts, x0)
            adv = group_advantages(rewards, g)
            rep = lambda a: np.repeat(np.asarray(a), num_train, axis=0)  # noqa: E731
            return {"x0": rep(x0), "cond": {"input_ids": rep(ids)}, "advantage": rep(adv)}, float(rewards.mean())

        def refresh_old(state, i):
            old = update_old(state.frozen.extra["old"], state.params, i)
            return state.replace(frozen=state.frozen.replace(extra={**state.frozen.extra, "old": old}))

        return Run(objective, nft_batch, extra=lambda params: {"old": _copy(params)}, after=refresh_old,
                   reward_name="verifier score of the old policy's samples")

    if method == "reward_backprop":
        colors = config.colors

        def reward_fn(x0, cond):
            return colour_mass_reward(decode(model, x0), cond, colors)

        objective = AlignProp(world_velocity, reward_fn, num_steps=settings.rollout_steps, cfg_scale=1.0,
                              schedule=None, shift=model.config.shift,
                              truncation_range=(0, settings.rollout_steps))

        def backprop_batch(state, i):
            prompts, ids, noise = source.draw()
            return {"noise": noise, "cond": {"input_ids": ids, **mass_targets(prompts, config, areas)}}, None

        return Run(objective, backprop_batch, reward_name="soft colour-mass reward (in-graph)")
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


# ---------------------------------------------------------------- training one method


def fresh_model(base: WorldModel, full: bool, settings: Settings) -> WorldModel:
    graphdef, state = nnx.split(base)
    model = nnx.merge(graphdef, _copy(state))
    if not full:
        add_lora(model, LORA_TARGETS, rank=settings.lora_rank, alpha=2 * settings.lora_rank,
                 rngs=nnx.Rngs(settings.seed))
    return model


# Full fine-tuning trains the Flux transformer (as the LoRA adapters sit there), not the text tower.
FULL = nnx.All(nnx.Param, nnx.PathContains("transformer"))


def memory_stats(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
    return out


def train_method(method: str, base: WorldModel, data: OfflineData | None, settings: Settings, *,
                 full: bool, budget: float | None, steps: int | None, lr: float | None, areas: dict[str, float],
                 eval_set: list[Prompt], probe_set: list[Prompt], progress: bool) -> dict:
    model = fresh_model(base, full, settings)
    run = offline_run(method, data, settings) if method in OFFLINE else online_run(method, model, settings, areas)
    rate = lr if lr is not None else LORA_LR[method] / (10 if full else 1)
    optimizer = optax.adamw(rate, weight_decay=1e-4)
    trainable = FULL if full else "lora"
    mesh = make_mesh(devices=jax.devices()[:1])
    init_state, step = make_train_step(run.objective, optimizer, mesh, model=model, trainable=trainable,
                                       clip_norm=CLIP_NORM.get(method, 1.0))
    params = nnx.state(model, FULL if full else nnx.LoRAParam)
    extra = run.extra(params)
    if full and method in ("dpo", "flow_grpo", "nft"):  # the objectives with a reference term
        extra = {**(extra or {}), "reference": _copy(params)}
    state = init_state(model, extra=extra)
    config = base.config.shapes
    key = jax.random.key(settings.seed + 6)

    def probe(state):
        return geneval(state.params, state.frozen, probe_set, config, seed=settings.seed + 7)[0]["overall"]

    curve = {"step": [0], "seconds": [0.0], "probe": [probe(state)]}
    train_curve = {"step": [], "reward": [], "loss": []}
    iteration_s, update_s = [], []
    elapsed, i, compile_s, memory = 0.0, 0, 0.0, None
    limit = steps if steps is not None else math.inf
    next_probe = 1
    bar = tqdm(desc=LABELS[method], unit="step", disable=not progress)
    while i < limit and (budget is None or elapsed < budget):
        t0 = time.perf_counter()
        batch, reward = run.batch(state, i)
        if i == 0:  # compile + memory analysis outside the budget
            c0 = time.perf_counter()
            memory = memory_stats(step.lower(state, batch, jax.random.fold_in(key, i)).compile())
            compile_s = time.perf_counter() - c0
            t0 += compile_s
        t1 = time.perf_counter()
        state, metrics = step(state, batch, jax.random.fold_in(key, i))
        metrics = jax.device_get(metrics)
        state = run.after(state, i)
        jax.block_until_ready(state.params)
        t2 = time.perf_counter()
        i += 1
        if i > 1:  # the first iteration compiles the rollout and the step
            iteration_s.append(t2 - t0)
            update_s.append(t2 - t1)
            elapsed += t2 - t0
        if reward is None and "reward" in metrics:
            reward = float(metrics["reward"])
        train_curve["step"].append(i)
        train_curve["loss"].append(float(metrics["loss"]))
        train_curve["reward"].append(reward)
        bar.update(1)
        bar.set_postfix(loss=f"{float(metrics['loss']):.4g}", t=f"{elapsed:.0f}s")
        due = (steps is not None and i >= next_probe * steps / settings.probes) or (
            budget is not None and elapsed >= next_probe * budget / settings.probes)
        done = i >= limit or (budget is not None and elapsed >= budget)
        if due or done:
            curve["step"].append(i)
            curve["seconds"].append(elapsed)
            curve["probe"].append(probe(state))
            next_probe += 1
    bar.close()
    after, scores = geneval(state.params, state.frozen, eval_set, config, seed=settings.seed + 8)
    return {
        "method": method, "label": LABELS[method], "reward": REWARDS[method], "headline": HEADLINES[method],
        "trainable": "full transformer" if full else f"LoRA r{settings.lora_rank}",
        "learning_rate": rate, "steps": i, "train_seconds": elapsed, "compile_seconds": compile_s,
        "mean_iteration_seconds": float(np.mean(iteration_s)) if iteration_s else None,
        "mean_update_seconds": float(np.mean(update_s)) if update_s else None,
        "memory": memory, "after": after, "after_scores": scores.tolist(),
        "probe_curve": curve, "train_curve": {**train_curve, "reward_name": run.reward_name},
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
    lines = [
        f"# Alignment methods on the Shapes world (preset `{report['preset']}`)",
        "",
        f"Base model `{report['model']}`; every method starts from it and trains "
        + (f"for a fixed budget of **{report['budget_seconds']:.0f} s** of wall-clock compute"
           if report["budget_seconds"] is not None else f"for **{report['max_steps']}** steps")
        + f" ({'full fine-tuning of the Flux transformer' if report['full'] else 'LoRA r%d' % s['lora_rank']})"
        f" on {report['machine']['cpus']} CPU cores ({report['machine']['device']}). "
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
        if "note" in versus:
            lines.append(versus["note"] + ".")
        reach, first = versus["nft_reach"], versus["grpo_first_reach"]
        lines.append(
            f"Flow-GRPO ended at {versus['grpo_final_probe']:.3f} (base {versus['base_probe']:.3f}) after "
            f"{versus['grpo_steps']} steps ({versus['grpo_seconds']:.0f} s), first reaching that score at step "
            f"{first[0]} ({first[1]:.0f} s). DiffusionNFT "
            + (f"reached it at step {reach[0]} ({reach[1]:.0f} s): {first[0] / max(reach[0], 1):.1f}x fewer steps "
               f"and {first[1] / max(reach[1], 1e-9):.1f}x less time than Flow-GRPO took to get there."
               if reach else f"never reached it (final {versus['nft_final_probe']:.3f})."))
        lines.append("The probe set is small (noisy) and scored only at the probe points, so step counts are "
                     "resolved to the probe spacing.")
    if s["offline_prompts"] and report["offline"]["pairs"]:
        o = report["offline"]
        lines += ["", f"Offline data (SFT / DPO / MaPO): {s['offline_prompts']} training prompts x "
                  f"{s['offline_samples']} base-model samples (mean verifier score {o['score']:.3f}), "
                  f"{o['pairs']} verifier preference pairs, {o['winners']} winner images; made in {o['seconds']:.0f} s."]
    lines += ["", "Reward backprop optimises the soft colour-mass surrogate (`colour_mass_reward`: the pixel "
              "mass of each named colour and of the whole foreground against what the prompt's objects need); "
              "it cannot see shape or position, so its GenEval-lite change measures transfer.",
              "", "![curves](alignment_curves.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="default", choices=[p for p in PRESETS if not p.startswith("unet")])
    parser.add_argument("--budget-seconds", type=float, default=240.0,
                        help="wall-clock training budget per method (ignored with --steps)")
    parser.add_argument("--steps", type=int, default=None, help="a fixed number of steps instead of a budget")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--full", action="store_true", help="full fine-tuning of the transformer instead of LoRA")
    parser.add_argument("--lr", type=float, default=None, help="one learning rate for every method")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--cache", default=None, help="model cache (default: $JDPT_CACHE or ~/.cache/jdpt)")
    parser.add_argument("--eval-per-category", type=int, default=Settings.eval_per_category)
    parser.add_argument("--probe-per-category", type=int, default=Settings.probe_per_category)
    parser.add_argument("--offline-prompts", type=int, default=Settings.offline_prompts)
    parser.add_argument("--prompts-per-step", type=int, default=Settings.prompts_per_step)
    parser.add_argument("--group-size", type=int, default=Settings.group_size)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"--methods {args.methods!r}: unknown {unknown}; choose from {METHODS}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps} must be >= 1")
    settings = Settings(eval_per_category=args.eval_per_category, probe_per_category=args.probe_per_category,
                        offline_prompts=args.offline_prompts, prompts_per_step=args.prompts_per_step,
                        group_size=args.group_size)
    progress = not args.quiet
    budget = None if args.steps is not None else args.budget_seconds

    base, _ = base_model(args.preset, cache_dir=args.cache, progress=progress)
    config = base.config.shapes
    eval_set = eval_prompts(settings.eval_per_category, base.config)
    probe_set = eval_prompts(settings.probe_per_category, base.config, seed=2025)
    graphdef, params, rest = nnx.split(base, nnx.Param, ...)
    before, before_scores = geneval(params, Frozen(graphdef, rest), eval_set, config, seed=settings.seed + 8)
    areas = object_areas(config)
    data = make_offline_data(base, settings, progress=progress) if set(methods) & set(OFFLINE) else None

    results = {}
    for method in methods:
        results[method] = train_method(method, base, data, settings, full=args.full, budget=budget,
                                       steps=args.steps, lr=args.lr, areas=areas, eval_set=eval_set,
                                       probe_set=probe_set, progress=progress)
    report = {
        "preset": args.preset, "model": str(model_dir(args.preset, args.cache)),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "device": jax.devices()[0].device_kind},
        "settings": dataclasses.asdict(settings), "full": args.full, "budget_seconds": budget,
        "max_steps": args.steps, "object_areas_px": areas,
        "before": before, "before_scores": before_scores.tolist(),
        "offline": None if data is None else {"score": data.score, "pairs": len(data.pairs),
                                              "winners": len(data.winners), "seconds": data.seconds},
        "results": results, "nft_vs_grpo": nft_vs_grpo(results),
    }
    if report["offline"] is None:
        report["offline"] = {"score": float("nan"), "pairs": 0, "winners": 0, "seconds": 0.0}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "alignment.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_curves(results, out / "alignment_curves.png")
    text = markdown(report)
    (out / "alignment.md").write_text(text)
    print(text)
    print(f"wrote {out / 'alignment.json'}, {out / 'alignment.md'} and {out / 'alignment_curves.png'}")
    return report


if __name__ == "__main__":
    main()
