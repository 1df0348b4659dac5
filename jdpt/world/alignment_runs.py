"""The per-method pieces of Shapes-world post-training (used by :mod:`jdpt.world.alignment`).

A :class:`Method` is what a user composes for a real model: the library's objective through the
world's adapter, a grain loader and, for the online methods, the reward that scores the rollouts
(:func:`jdpt.train.online.make_online_step`). Offline methods (SFT, Diffusion-DPO, MaPO) read one
preference data set the base model and the verifier make once (:func:`make_offline_data`); online
methods (DDPO, Flow-GRPO, DiffusionNFT) roll out on fresh grammar prompts and are scored by the
verifier; reward backprop (AlignProp) differentiates the soft colour-mass surrogate
(:mod:`jdpt.world.colour_mass`) through its rollouts.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import grain
import jax
import numpy as np

from jdpt.data.loading import make_loader
from jdpt.data.preference import PreferencePairs, preference_pairs
from jdpt.diffusion.schedules import DDPMSchedule
from jdpt.objectives import DDPO, DPO, NFT, SFT, AlignProp, FlowGRPO, MaPO
from jdpt.objectives.ddpo import flow_as_epsilon
from jdpt.world.adapter import world_velocity
from jdpt.world.colour_mass import colour_mass_reward, mass_targets
from jdpt.world.data import NoiseBatches, PromptBatches, stream
from jdpt.world.evaluation import evaluate
from jdpt.world.model import WorldModel
from jdpt.world.scenes import Prompt, sample_prompts
from jdpt.world.verifier import Verdict, VerifierReward

METHODS = ("sft", "dpo", "mapo", "ddpo", "reward_backprop", "flow_grpo", "nft")
OFFLINE = ("sft", "dpo", "mapo")


@dataclasses.dataclass(frozen=True)
class AlignSettings:
    """Toy-scale settings of Shapes-world post-training (the papers' values in brackets where
    they differ: Flow-GRPO, Liu et al. 2025; DiffusionNFT, Zheng et al. 2025; DDPO, Black et al.
    2024; AlignProp, Prabhudesai et al. 2023).

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
        strict_reward: score training samples (the online methods' rewards, the offline pairs and
            winners) with the strict verifier, which fails an image holding an object its prompt
            does not name. GenEval's own rules only check that the named objects are present, so
            a policy trained on them can gain by drawing more objects. Reward backprop's
            colour-mass surrogate does not use the verifier and refuses this setting.
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
    strict_reward: bool = False

    def __post_init__(self):
        if not isinstance(self.strict_reward, bool):
            raise ValueError(f"AlignSettings.strict_reward={self.strict_reward!r} must be True or False")
        for f in dataclasses.fields(self):
            if f.name == "strict_reward":
                continue
            value = getattr(self, f.name)
            low = {"seed": None, "offline_prompts": 0, "group_size": 2, "offline_samples": 2}.get(f.name, 1)
            if low is not None and value < low:
                raise ValueError(f"AlignSettings.{f.name}={value} must be >= {low}")


def geneval(model: WorldModel, prompts: list[Prompt], *, seed: int, strict: bool = False) -> Verdict:
    """The verifier's verdict on one sample per prompt of ``model``
    (:func:`jdpt.world.evaluation.evaluate`): ``.summary()`` is GenEval-lite per category,
    ``.score`` the ``[B]`` 0/1 scores, ``.clutter()`` objects drawn vs named."""
    return evaluate(model, prompts, seed=seed, strict=strict, progress=False)[1]


def standard_error(summary: dict[str, float], n_per_category: int) -> float:
    """Binomial standard error of the overall score (the mean of the category means)."""
    cats = [v for k, v in summary.items() if k != "overall"]
    return math.sqrt(sum(p * (1 - p) / n_per_category for p in cats)) / len(cats)


def copy_tree(tree):
    """A pytree of fresh copies of ``tree``'s arrays (no buffer shared with donated state)."""
    return jax.tree.map(lambda x: jax.numpy.array(x, copy=True), tree)


# ---------------------------------------------------------------- offline data


@dataclasses.dataclass
class OfflineData:
    """The base model's samples on the training prompts, scored, and their preference pairs."""

    latents: np.ndarray  # [P, K, N, C]
    ids: np.ndarray  # [P, L]
    pairs: PreferencePairs
    winners: np.ndarray  # [W, 2] unique (prompt, sample) of the pairs' winners
    score: float  # mean verifier score of the samples
    seconds: float
    strict: bool = False  # scored by the strict verifier (AlignSettings.strict_reward)


def make_offline_data(base: WorldModel, settings: AlignSettings, *, progress: bool = True) -> OfflineData:
    """``offline_prompts x offline_samples`` base-model samples (the evaluation sampler, seed
    ``settings.seed + 2``) on training prompts, scored by the verifier (strict when
    ``settings.strict_reward``); pairs of differing scores (shared by SFT / DPO / MaPO)."""
    if settings.offline_prompts < 1:
        raise ValueError(f"AlignSettings.offline_prompts={settings.offline_prompts}: the offline methods "
                         f"{OFFLINE} need training prompts; set it >= 1")
    start = time.perf_counter()
    prompts = sample_prompts(settings.seed + 1, settings.offline_prompts, base.config.shapes)
    k = settings.offline_samples
    images, verdict = evaluate(base, [p for p in prompts for _ in range(k)], seed=settings.seed + 2,
                               strict=settings.strict_reward, progress=progress)
    scores = verdict.score.reshape(len(prompts), k)
    pairs = preference_pairs(scores, settings.seed, max_pairs_per_prompt=settings.max_pairs_per_prompt)
    if len(pairs) == 0:
        raise ValueError(f"the base model's {len(prompts)} x {k} offline samples gave no preference pair "
                         f"(mean score {scores.mean():.3f}): raise offline_prompts / offline_samples")
    latents = np.asarray(base.latents(images)).reshape(len(prompts), k, *world_velocity.latent_shape(base))
    winners = np.unique(np.stack([pairs.prompt, pairs.winner], axis=1), axis=0)
    return OfflineData(latents, base.tokenize([p.text for p in prompts]), pairs, winners, float(scores.mean()),
                       time.perf_counter() - start, strict=settings.strict_reward)


# ---------------------------------------------------------------- the methods


@dataclasses.dataclass
class Method:
    """One method as library pieces: ``objective``; ``loader`` (grain; its batches feed the
    train step: data, or prompts for the rollouts); ``online``: the keyword arguments of
    :func:`jdpt.train.online.make_online_step` (None for a plain train step)."""

    objective: Any
    loader: grain.DataLoader
    online: dict | None = None
    reward_name: str = ""


def offline_method(method: str, data: OfflineData, settings: AlignSettings) -> Method:
    """SFT on the winners, or Diffusion-DPO / MaPO on the pairs: ``pairs_per_step`` records per
    step from a shuffled loader (reshuffled every epoch, seed ``settings.seed + 3``)."""
    if method not in OFFLINE:
        raise ValueError(f"offline_method: {method!r} is not an offline method; choose from {OFFLINE}")
    options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4 * settings.pairs_per_step)
    if method == "sft":
        records = [{"x0": data.latents[p, w], "cond": {"input_ids": data.ids[p]}} for p, w in data.winners]
        objective = SFT(world_velocity)
    else:
        pairs = data.pairs
        records = [{"x0_w": data.latents[p, w], "x0_l": data.latents[p, lo], "cond": {"input_ids": data.ids[p]}}
                   for p, w, lo in zip(pairs.prompt, pairs.winner, pairs.loser)]
        objective = DPO(world_velocity) if method == "dpo" else MaPO(world_velocity)
    loader = make_loader(records, batch_size=settings.pairs_per_step, seed=settings.seed + 3, read_options=options)
    return Method(objective, loader)


def online_method(method: str, model: WorldModel, settings: AlignSettings,
                  areas: dict[str, float] | None) -> Method:
    """DDPO / Flow-GRPO / DiffusionNFT (verifier score 0/1, strict with ``strict_reward``) or
    reward backprop (colour mass; needs ``areas`` from :func:`jdpt.world.colour_mass.object_areas`),
    on ``prompts_per_step`` fresh grammar prompts per step (seed ``settings.seed + 4``)."""
    config = model.config.shapes
    prompts = PromptBatches(config, settings.prompts_per_step, settings.seed + 4)
    if method == "reward_backprop":
        if settings.strict_reward:
            raise ValueError("AlignSettings.strict_reward applies to the verifier's rewards; reward_backprop "
                             "optimises the differentiable colour-mass surrogate instead: set strict_reward=False")
        if areas is None:
            raise ValueError("reward_backprop needs areas=object_areas(config) for its colour-mass targets")
        colors = config.colors

        def reward_fn(x0, cond):
            return colour_mass_reward(world_velocity.images(model, x0), cond, colors)

        objective = AlignProp(world_velocity, reward_fn, num_steps=settings.rollout_steps, cfg_scale=1.0,
                              schedule=None, shift=model.config.shift, truncation_range=(0, settings.rollout_steps))
        batches = NoiseBatches(prompts, world_velocity.latent_shape(model),
                               lambda chosen: mass_targets(chosen, config, areas))
        return Method(objective, stream(batches), reward_name="soft colour-mass reward (in-graph)")
    if method == "ddpo":
        objective = DDPO(flow_as_epsilon(world_velocity, DDPMSchedule.stable_diffusion()),
                         num_steps=settings.rollout_steps, cfg_scale=1.0)
    elif method == "flow_grpo":
        objective = FlowGRPO(world_velocity, num_steps=settings.rollout_steps, shift=model.config.shift,
                             cfg_scale=1.0)
    elif method == "nft":
        objective = NFT(world_velocity, num_steps=settings.rollout_steps, shift=model.config.shift)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    reward = VerifierReward(config, strict=settings.strict_reward)
    online = {"reward": reward, "decode": lambda m, frozen, x0: world_velocity.images(m, x0),
              "latent_shape": world_velocity.latent_shape(model), "group_size": settings.group_size}
    sampler = "the old policy's samples" if method == "nft" else "the rollouts"
    return Method(objective, stream(prompts), online, reward_name=f"{reward.name.removesuffix(' 0/1')} of {sampler}")
