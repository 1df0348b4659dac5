"""The per-method pieces of Shapes-world post-training (used by :mod:`jdpt.world.alignment`).

A :class:`Run` is what one method adds to the shared training loop: its objective and the host
work of each iteration. Offline methods (SFT, Diffusion-DPO, MaPO) draw from one preference data
set the base model and the verifier make once (:func:`make_offline_data`); online methods (DDPO,
Flow-GRPO, DiffusionNFT) roll out the current policy on fresh grammar prompts and score the samples
with the verifier; reward backprop (AlignProp) differentiates the soft colour-mass surrogate
(:mod:`jdpt.world.colour_mass`) through its rollouts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from jdpt.data.preference import PreferencePairs, preference_pairs
from jdpt.diffusion.pipeline import to_uint8
from jdpt.diffusion.samplers import euler_flow
from jdpt.diffusion.schedules import DDPMSchedule, flow_sigmas
from jdpt.models.flux import unpack_latents
from jdpt.objectives import DDPO, DPO, NFT, SFT, AlignProp, FlowGRPO, MaPO, PerPromptStatTracker
from jdpt.objectives.advantages import group_advantages
from jdpt.objectives.ddpo import flow_as_epsilon
from jdpt.objectives.nft import update_old
from jdpt.parallel.step import Frozen
from jdpt.world.adapter import world_velocity
from jdpt.world.colour_mass import colour_mass_reward, mass_targets
from jdpt.world.model import CFG_SCALE, SAMPLING_STEPS, WorldModel
from jdpt.world.scenes import Prompt, ShapesConfig, sample_prompts
from jdpt.world.verifier import Verdict, verify

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


# ---------------------------------------------------------------- sampling and scoring


def latent_shape(model: WorldModel) -> tuple[int, int]:
    """``(N, C)`` of the world's packed latents."""
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


def geneval(params: nnx.State, frozen: Frozen, prompts: list[Prompt], config: ShapesConfig, *, seed: int,
            batch_size: int = 64) -> Verdict:
    """The verifier's verdict on one sample per prompt of the model ``frozen.model(params)``
    (seeded per chunk like ``jdpt.world.evaluate``): ``.summary()`` is GenEval-lite per category,
    ``.score`` the ``[B]`` 0/1 scores, ``.clutter()`` objects drawn vs named."""
    if not prompts:
        raise ValueError("geneval needs at least one prompt; got an empty list")
    key = jax.random.key(seed)
    tokenize = frozen.model(params).tokenize
    chunks = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        ids = tokenize([p.text for p in chunk])
        ids = np.concatenate([ids, np.repeat(ids[-1:], batch_size - len(ids), axis=0)])
        chunks.append(np.asarray(_generate(params, frozen, ids, jax.random.fold_in(key, i)))[: len(chunk)])
    return verify(np.concatenate(chunks), prompts, config)


def standard_error(summary: dict[str, float], n_per_category: int) -> float:
    """Binomial standard error of the overall score (the mean of the category means)."""
    cats = [v for k, v in summary.items() if k != "overall"]
    return math.sqrt(sum(p * (1 - p) / n_per_category for p in cats)) / len(cats)


# ---------------------------------------------------------------- the methods


@dataclasses.dataclass
class Run:
    """One method's pieces: ``batch(state, i) -> (batch, train reward or None)`` does the host
    work of iteration ``i`` (rollout, reward, advantages, or drawing offline data);
    ``extra(params)`` is the objective's frozen pytree; ``after(state, i) -> state`` runs after
    the update (NFT's old-policy refresh)."""

    objective: Any
    batch: Callable[[Any, int], tuple[dict, float | None]]
    extra: Callable[[nnx.State], Any] = lambda params: None
    after: Callable[[Any, int], Any] = lambda state, i: state
    reward_name: str = ""


def copy_tree(tree):
    """A pytree of fresh copies of ``tree``'s arrays (no buffer shared with donated state)."""
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def _world_images(model: WorldModel, x0) -> np.ndarray:
    return np.asarray(to_uint8(decode(model, jnp.asarray(x0))))


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
    """``offline_prompts x offline_samples`` base-model samples (the evaluation sampler) on
    training prompts, scored by the verifier (strict when ``settings.strict_reward``); pairs of
    differing scores (shared by SFT / DPO / MaPO)."""
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
    if not images:
        raise ValueError(f"AlignSettings.offline_prompts={settings.offline_prompts}: the offline methods "
                         f"{OFFLINE} need training prompts; set it >= 1")
    images = np.concatenate(images)
    scores = verify(images, flat_prompts, config, strict=settings.strict_reward).score.reshape(len(prompts), k)
    pairs = preference_pairs(scores, settings.seed, max_pairs_per_prompt=settings.max_pairs_per_prompt)
    if len(pairs) == 0:
        raise ValueError(f"the base model's {len(prompts)} x {k} offline samples gave no preference pair "
                         f"(mean score {scores.mean():.3f}): raise offline_prompts / offline_samples")
    latents = np.asarray(base.latents(jnp.asarray(images))).reshape(len(prompts), k, *latent_shape(base))
    winners = np.unique(np.stack([pairs.prompt, pairs.winner], axis=1), axis=0)
    return OfflineData(latents, ids, pairs, winners, float(scores.mean()), time.perf_counter() - start,
                       strict=settings.strict_reward)


def offline_run(method: str, data: OfflineData, settings: AlignSettings) -> Run:
    """SFT on the winners, or Diffusion-DPO / MaPO on the pairs: ``pairs_per_step`` draws per step."""
    if method not in OFFLINE:
        raise ValueError(f"offline_run: {method!r} is not an offline method; choose from {OFFLINE}")
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
        return Run(SFT(world_velocity), winner_batch)
    return Run(DPO(world_velocity) if method == "dpo" else MaPO(world_velocity), pair_batch)


class Prompts:
    """Training prompts of the online methods: ``prompts_per_step`` fresh grammar prompts per
    iteration, each repeated ``group_size`` times (consecutive groups), and their rollout noise."""

    def __init__(self, model: WorldModel, settings: AlignSettings):
        self.model, self.settings = model, settings
        self.rng = np.random.default_rng(settings.seed + 4)

    def draw(self) -> tuple[list[Prompt], np.ndarray, np.ndarray]:
        """``(prompts [B], ids [B, L], noise [B, N, C])`` with ``B = prompts_per_step x group_size``."""
        s = self.settings
        prompts = [p for p in sample_prompts(self.rng, s.prompts_per_step, self.model.config.shapes)
                   for _ in range(s.group_size)]
        noise = self.rng.standard_normal((len(prompts), *latent_shape(self.model))).astype(np.float32)
        return prompts, self.model.tokenize([p.text for p in prompts]), noise


def online_run(method: str, model: WorldModel, settings: AlignSettings, areas: dict[str, float] | None) -> Run:
    """DDPO / Flow-GRPO / DiffusionNFT (verifier score 0/1) or reward backprop (colour mass;
    needs ``areas`` from :func:`jdpt.world.colour_mass.object_areas`)."""
    config = model.config.shapes
    source = Prompts(model, settings)
    key = jax.random.key(settings.seed + 5)
    g = settings.group_size

    if method == "reward_backprop" and settings.strict_reward:
        raise ValueError("AlignSettings.strict_reward applies to the verifier's rewards; reward_backprop "
                         "optimises the differentiable colour-mass surrogate instead: set strict_reward=False")
    verifier = "strict verifier" if settings.strict_reward else "verifier"

    def verifier_reward(prompts, x0) -> np.ndarray:
        return verify(_world_images(model, x0), prompts, config, strict=settings.strict_reward).score

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

        return Run(objective, rl_batch, reward_name=f"{verifier} score of the rollouts")

    if method == "nft":
        sigmas = flow_sigmas(settings.rollout_steps, shift=model.config.shift)
        num_train = max(1, int(settings.rollout_steps * 0.99))  # the reference trains 9 of 10 steps
        objective = NFT(world_velocity, timesteps=tuple(float(s) for s in sigmas[:num_train]))

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

        return Run(objective, nft_batch, extra=lambda params: {"old": copy_tree(params)}, after=refresh_old,
                   reward_name=f"{verifier} score of the old policy's samples")

    if method == "reward_backprop":
        if areas is None:
            raise ValueError("reward_backprop needs areas=object_areas(config) for its colour-mass targets")
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
