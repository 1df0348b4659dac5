"""Online post-training as one train step: a rollout phase, then the update, driven by ``fit``.

``step = make_online_step(objective, update, reward=..., decode=..., latent_shape=...,
group_size=G)`` turns an online objective (DDPO, DPOK, Flow-GRPO, DiffusionNFT) and its
:func:`jdpt.parallel.make_train_step` update into ``step(state, batch, key) -> (state,
metrics)``, the same signature as an offline step, so :func:`jdpt.train.fit` runs it, checkpoints
it and resumes it bit for bit. One call:

1. **rollout** (one jitted function): each of the batch's ``P`` prompts is repeated ``G`` times
   on the device, initial noise is drawn from the key, the objective samples with its sampling
   policy (the current params, or NFT's old policy from ``state.aux``) and the samples are decoded
   to uint8 images;
2. **reward** (host): only the images ``[P G, H, W, 3]`` leave the device; the
   :class:`~jdpt.rewards.reward.Reward` scores them against their prompts;
3. **advantages** (jitted): the objective turns the rewards ``[P G]`` into advantages and attaches
   them to the rollout's trajectories, which never left the device (stateful estimators, DDPO's
   per-prompt stat tracker, keep their state in ``state.aux``);
4. **update**: the objective's train step on those trajectories.

Metrics add ``reward`` (the mean score), ``reward_std``, ``rollout_seconds`` (host wall-clock
of phases 1-3: the rollout, which the reward waits for, the reward and the advantages) and the
objective's advantage metrics to the update's.

The host batch (from a grain loader) holds ``cond``: the prompts' model conditions, a pytree of
``[P, ...]`` arrays; ``prompt``: the ``P`` prompt texts; optionally ``uncond`` (the
unconditional conditions, for rollouts with classifier-free guidance).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdpt.diffusion.pipeline import to_uint8
from jdpt.objectives.advantages import prompt_ids
from jdpt.parallel.step import Frozen, Step, TrainState
from jdpt.rewards.reward import Reward, score

Array = jax.Array
# decode(model, frozen, x0) -> images [B, H, W, 3] in [-1, 1]; model: the sampling policy.
Decode = Callable[[nnx.Module, Frozen, Array], Array]


def _repeat(tree: Any, g: int) -> Any:
    return jax.tree.map(lambda x: jnp.repeat(jnp.asarray(x), g, axis=0), tree)


def make_online_step(objective, update: Step, *, reward: Reward, decode: Decode, latent_shape: tuple[int, ...],
                     group_size: int = 1) -> Step:
    """The online train step of ``objective`` (module docstring).

    Args:
        objective: has ``rollout(model, cond, noise, key, *, uncond=None) -> (batch, x0)`` and
            ``advantages(aux, batch, rewards, ids) -> (aux, batch, metrics)``; optionally
            ``sampling_params(params, aux)`` (the params that sample; default: the current ones).
        update: ``make_train_step(objective, ...)``'s step.
        reward: scores the decoded images against their prompts on the host.
        decode: ``decode(model, frozen, x0)``: samples ``x0`` -> images in ``[-1, 1]``, e.g. with
            the VAE's state in the frozen extras (``init_state(model, extra={"vae": state})``):
            ``lambda m, frozen, x0: adapter.images(nnx.merge(vae_graph, frozen.extra["vae"]), x0)``.
        latent_shape: one sample's initial-noise shape (e.g. ``adapter.latent_shape(model)``).
        group_size: samples per prompt ``G`` (Flow-GRPO / DiffusionNFT: their group size).

    The rollout's repeated batch and the trajectories are split over the update's batch axes
    (``update.batch_sharding``, which ``make_train_step``'s step carries); they stay on the
    devices from the rollout to the update.

    Returns:
        ``step(state, batch, key) -> (state, metrics)``; ``key`` is split between the rollout
        and the update. ``step.prepare(state, batch, key) -> (state, trajectories, update_key,
        metrics)`` runs phases 1-3 alone (the trajectories, advantages attached, on the device);
        ``step.lower(state, batch, key)`` lowers the update for them (memory analysis).
    """
    for name in ("rollout", "advantages"):
        if not callable(getattr(objective, name, None)):
            raise ValueError(f"{type(objective).__name__} is not an online objective (it has no {name}()); "
                             "train it with make_train_step on a data loader instead")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    if jax.process_count() > 1:
        raise ValueError("make_online_step scores rollouts with a host reward on one process; "
                         f"{jax.process_count()} processes are not supported yet")
    sharding = getattr(update, "batch_sharding", None)
    sampling_params = getattr(objective, "sampling_params", lambda params, aux: params)

    def place(tree):
        return tree if sharding is None else jax.lax.with_sharding_constraint(tree, sharding)

    @jax.jit
    def rollout(params, frozen: Frozen, aux, cond, uncond, key):
        key_noise, key_sample = jax.random.split(key)
        cond = place(_repeat(cond, group_size))
        uncond = None if uncond is None else place(_repeat(uncond, group_size))
        b = jax.tree.leaves(cond)[0].shape[0]
        noise = place(jax.random.normal(key_noise, (b, *latent_shape), jnp.float32))
        model = frozen.model(frozen.cast(sampling_params(params, aux)))
        batch, x0 = objective.rollout(model, cond, frozen.cast(noise), key_sample, uncond=uncond)
        return batch, to_uint8(decode(model, frozen, x0.astype(jnp.float32)))

    attach = jax.jit(objective.advantages)

    def prepare(state: TrainState, batch: dict, key: Array):
        """Rollout, reward and advantages: ``(state with its new aux, trajectories, update key,
        metrics)``."""
        missing = [k for k in ("cond", "prompt") if k not in batch]
        if missing:
            raise ValueError(f"an online batch holds 'cond' (the prompts' model conditions) and 'prompt' (their "
                             f"texts); it lacks {missing}")
        start = time.perf_counter()
        prompts = [p.decode() if isinstance(p, bytes) else str(p) for p in np.asarray(batch["prompt"]).reshape(-1)]
        key_rollout, key_update = jax.random.split(key)
        trajectories, images = rollout(state.params, state.frozen, state.aux, batch["cond"], batch.get("uncond"),
                                       key_rollout)
        rewards = score(reward, np.asarray(images), [p for p in prompts for _ in range(group_size)])
        aux, trajectories, metrics = attach(state.aux, trajectories, rewards,
                                            np.repeat(prompt_ids(prompts), group_size))
        if sharding is not None:  # device to device: the update's batch layout
            trajectories = jax.device_put(trajectories, sharding)
        if aux is not None:  # back where the update expects it
            aux = jax.device_put(aux, jax.tree.map(lambda x: x.sharding, state.aux))
        metrics = {**metrics, "reward": jnp.float32(rewards.mean()), "reward_std": jnp.float32(rewards.std()),
                   "rollout_seconds": time.perf_counter() - start}
        return state.replace(aux=aux), trajectories, key_update, metrics

    def step(state: TrainState, batch: dict, key: Array) -> tuple[TrainState, dict]:
        state, trajectories, key_update, metrics = prepare(state, batch, key)
        state, update_metrics = update(state, trajectories, key_update)
        return state, {**update_metrics, **metrics}

    def lower(state: TrainState, batch: dict, key: Array) -> jax.stages.Lowered:
        """The update's ahead-of-time stage for the trajectories that ``batch`` rolls out
        (``.compile().memory_analysis()``); runs the rollout and reward, not the update."""
        state, trajectories, key_update, _ = prepare(state, batch, key)
        return update.lower(state, trajectories, key_update)

    step.rollout, step.prepare, step.lower = rollout, prepare, lower
    return step
