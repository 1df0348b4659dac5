"""DiffusionNFT: online RL on the forward process (Zheng et al., "DiffusionNFT: Online Diffusion
Reinforcement with Forward Process", 2025; NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py``).

Images sampled by the *old* policy (any solver) are scored; training needs only their clean
latents ``x0`` and advantages ``A``. With fresh noise, ``x_t = (1 - t) x0 + t eps`` and

    r    = clip((clip(A, +-5) / 5) / 2 + 0.5, 0, 1)            (optimality probability)
    v+   = beta v_theta + (1 - beta) sg(v_old)                  (implicit positive policy)
    v-   = (1 + beta) sg(v_old) - beta v_theta                  (implicit negative policy)
    x0+- = x_t - t v+-
    l+-  = mean((x0+- - x0)^2 / sg(mean |x0+- - x0|))           (adaptive weight, per sample)
    L    = 5 mean[(r l+ + (1 - r) l-) / beta] + beta_KL mean((v_theta - v_ref)^2)

with ``beta = 1`` (0.1 for OCR / multi-reward) and ``beta_KL = 1e-4`` (the code's
``config.beta`` and ``train.beta``). The loss lives in x0 space as in the code (the paper writes
it in velocity space; DiffusionNFT issue #13). After each update the old policy, kept in the
train state, moves towards the trained one: :func:`update_old`.
"""

from __future__ import annotations

import dataclasses

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdpt.diffusion.samplers import euler_flow
from jdpt.diffusion.schedules import flow_sigmas
from jdpt.objectives.advantages import device_group_advantages
from jdpt.objectives.denoiser import Denoiser, check_prediction, reference_model
from jdpt.objectives.sft import check_cond, per_sample_mse
from jdpt.parallel.step import Frozen

Array = jax.Array


def nft_r(advantage: Array, adv_clip: float = 5.0) -> Array:
    """Advantages ``[B]`` -> optimality probabilities ``r`` in ``[0, 1]``: ``A = 0 -> 1/2``,
    ``A >= adv_clip -> 1``, ``A <= -adv_clip -> 0``."""
    a = jnp.clip(jnp.asarray(advantage, jnp.float32), -adv_clip, adv_clip) / adv_clip
    return jnp.clip(a / 2 + 0.5, 0.0, 1.0)


def nft_velocities(v_theta: Array, v_old: Array, beta: float) -> tuple[Array, Array]:
    """The implicit positive and negative velocities ``(v+, v-)`` (shapes of ``v_theta``);
    ``v_old`` is treated as a constant (stop-gradient)."""
    v_old = jax.lax.stop_gradient(v_old)
    return beta * v_theta + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_theta


def adaptive_x0_loss(x0_hat: Array, x0: Array, floor: float = 1e-5) -> Array:
    """``mean((x0_hat - x0)^2 / sg(max(mean |x0_hat - x0|, floor)))`` per sample: ``[B, ...]``
    x2 -> ``[B]`` (fp32). The weight is the per-sample mean absolute error, without gradient."""
    diff = (x0_hat.astype(jnp.float32) - x0.astype(jnp.float32)).reshape(x0.shape[0], -1)
    weight = jax.lax.stop_gradient(jnp.maximum(jnp.abs(diff).mean(axis=1, keepdims=True), floor))
    return (jnp.square(diff) / weight).mean(axis=1)


def nft_loss(v_theta: Array, v_old: Array, x_t: Array, x0: Array, t: Array, advantage: Array, *,
             beta: float = 1.0, v_ref: Array | None = None, kl_beta: float = 1e-4,
             adv_clip: float = 5.0, floor: float = 1e-5) -> tuple[Array, dict[str, Array]]:
    """DiffusionNFT's loss on arrays.

    Args:
        v_theta, v_old: policy and old-policy velocities ``[B, ...]`` at ``x_t``.
        x_t, x0: the noisy input and the clean latents ``[B, ...]``.
        t: ``[B]`` sigmas of ``x_t``.
        advantage: ``[B]``.
        beta: the implicit-policy strength (``config.beta``).
        v_ref: reference velocities ``[B, ...]`` for the KL term (``None``: no KL term).
        kl_beta: the KL weight (``train.beta``).
        adv_clip: advantages are clipped to ``+-adv_clip`` and the policy term scaled by it.
        floor: lower bound of the adaptive weight.

    Returns:
        ``(loss, metrics)``: ``policy_loss``, ``kl``, ``loss_pos``, ``loss_neg``, ``r`` (means).
    """
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0 (the policy term divides by it)")
    r = nft_r(advantage, adv_clip)
    v_pos, v_neg = nft_velocities(v_theta.astype(jnp.float32), v_old.astype(jnp.float32), beta)
    x_t = x_t.astype(jnp.float32)
    t = t.astype(jnp.float32).reshape(t.shape + (1,) * (x_t.ndim - 1))
    loss_pos = adaptive_x0_loss(x_t - t * v_pos, x0, floor)
    loss_neg = adaptive_x0_loss(x_t - t * v_neg, x0, floor)
    policy = adv_clip * jnp.mean((r * loss_pos + (1 - r) * loss_neg) / beta)
    kl = jnp.zeros((), jnp.float32) if v_ref is None else per_sample_mse(v_theta, jax.lax.stop_gradient(v_ref)).mean()
    metrics = {"policy_loss": policy, "kl": kl, "loss_pos": loss_pos.mean(), "loss_neg": loss_neg.mean(),
               "r": r.mean()}
    return policy + kl_beta * kl, metrics


def update_old(old, params, step):
    """The old policy's update after an epoch: ``old <- d old + (1 - d) params`` with
    ``d = min(0.001 step, 0.5)`` (step 0: ``old = params``). Pure; any matching pytrees."""
    d = jnp.minimum(0.001 * jnp.asarray(step, jnp.float32), 0.5)
    return jax.tree.map(lambda o, p: (d * o.astype(jnp.float32) + (1 - d) * p.astype(jnp.float32)).astype(o.dtype),
                        old, params)


def check_advantages(advantage) -> None:
    """Raise a ValueError naming the bad rows if ``advantage`` (host values) has NaN or inf."""
    a = np.asarray(advantage, np.float64)
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        raise ValueError(f"advantage has {bad.size} non-finite value(s) at rows {bad[:8].tolist()}; "
                         "drop those samples or fix the reward (NaN rewards give NaN advantages)")


@dataclasses.dataclass(frozen=True)
class NFT:
    """DiffusionNFT hyper-parameters (NVlabs/DiffusionNFT ``config/nft.py``) and the model adapter.

    Attributes:
        denoise: the model's velocity adapter (flow models: ``x_t = (1 - t) x0 + t eps``).
        beta: implicit-policy strength ``config.beta`` (1.0; 0.1 for OCR / multi-reward).
        kl_beta: weight of ``mean((v_theta - v_ref)^2)``, ``train.beta`` (1e-4); 0 skips the
            reference forward.
        adv_clip: advantage clip and policy-term scale (5).
        floor: lower bound of the adaptive x0 weight (1e-5).
        num_steps, shift: the rollout sampler, deterministic Euler on ``flow_sigmas(num_steps,
            shift=shift)`` with CFG 1 (the paper samples with any solver, CFG-free; 10 steps,
            SD3's shift 3).
        timestep_fraction: the training noise levels are the grid's first
            ``int(num_steps * timestep_fraction)`` sigmas (the reference trains 9 of 10 steps):
            :meth:`advantages` repeats every sample once per training sigma.
        timesteps: explicit training sigmas instead (a batch without ``t`` draws uniformly from
            them); ``"uniform"``: ``t ~ U(0, 1)``.
        global_std: advantages normalise by the whole batch's reward std (flow_grpo's stat
            tracker, which DiffusionNFT uses: ``global_std=True``), else per prompt.

    Train state: ``aux["old"]``, the old (sampling) policy, a copy of the trainable params at the
    start (:meth:`init_aux`), moved towards them after every update by :func:`update_old`
    (:meth:`update_aux`); the loss reads it as ``frozen.aux["old"]``. The reference is
    :func:`jdpt.objectives.denoiser.reference_model` (LoRA: the base; full fine-tuning:
    ``extra["reference"]``).

    Batch: ``{"x0": [B, ...] clean latents of the old policy's samples, "cond": pytree of
    [B, ...], "advantage": [B]}`` and optionally ``"t"`` ``[B]`` (each row's sigma; drawn when
    absent). Online (:func:`jdpt.train.online.make_online_step`): :meth:`rollout` samples with
    the old policy, :meth:`advantages` turns the rewards into per-prompt group advantages and
    repeats each sample at every training sigma, all on the device. Non-finite advantages raise
    a ValueError when the loss sees host values (:func:`check_advantages`); inside ``jit`` they
    cannot raise: the loss and gradients become NaN and ``metrics["nonfinite_advantages"]``
    counts them.
    Metrics: those of :func:`nft_loss`, ``nonfinite_advantages`` and ``t`` (mean).
    """

    denoise: Denoiser
    beta: float = 1.0
    kl_beta: float = 1e-4
    adv_clip: float = 5.0
    floor: float = 1e-5
    num_steps: int = 10
    shift: float = 3.0
    timestep_fraction: float = 0.99
    timesteps: tuple[float, ...] | str | None = None
    global_std: bool = True

    def __post_init__(self):
        check_prediction(self.denoise, "velocity", "NFT")
        if self.beta <= 0 or self.adv_clip <= 0 or self.kl_beta < 0:
            raise ValueError(f"NFT needs beta > 0, adv_clip > 0, kl_beta >= 0; got beta={self.beta}, "
                             f"adv_clip={self.adv_clip}, kl_beta={self.kl_beta}")
        if self.num_steps < 1 or not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"NFT needs num_steps >= 1 and timestep_fraction in (0, 1]; got {self.num_steps}, "
                             f"{self.timestep_fraction}")
        explicit = self.timesteps not in (None, "uniform")
        if explicit and not (len(self.timesteps) and all(0 <= s <= 1 for s in self.timesteps)):
            raise ValueError(f"timesteps={self.timesteps}: give a non-empty tuple of sigmas in [0, 1], "
                             "'uniform' or None (the rollout grid)")

    def sigmas(self) -> np.ndarray:
        """The rollout grid ``[num_steps + 1]``."""
        return flow_sigmas(self.num_steps, shift=self.shift)

    def train_sigmas(self) -> np.ndarray | None:
        """The training sigmas (None: uniform on [0, 1])."""
        if self.timesteps == "uniform":
            return None
        if self.timesteps is not None:
            return np.asarray(self.timesteps, np.float32)
        return self.sigmas()[:max(1, int(self.num_steps * self.timestep_fraction))].astype(np.float32)

    def sample_t(self, key: Array, batch: int) -> Array:
        """``[batch]`` fp32 sigmas: uniform on the training sigmas or on ``[0, 1]``."""
        grid = self.train_sigmas()
        if grid is None:
            return jax.random.uniform(key, (batch,), jnp.float32)
        return jax.random.choice(key, jnp.asarray(grid), (batch,))

    # --- the train state: the old policy

    def init_aux(self, params):
        return {"old": params}

    def update_aux(self, aux, params, step):
        return {**aux, "old": update_old(aux["old"], params, step)}

    # --- online: rollout with the old policy, advantages on the device

    def sampling_params(self, params, aux):
        """The params that sample: the old policy."""
        return aux["old"]

    def rollout(self, model, cond: Any, noise: Array, key: Array, *, uncond: Any = None) -> tuple[dict, Array]:
        """Deterministic Euler samples ``x0`` of ``model`` (the old policy; jit it). ``key`` and
        ``uncond`` are unused (ODE, CFG 1). Returns ``({"x0", "cond"}, x0)``."""
        b = noise.shape[0]
        x0 = euler_flow(lambda x, s: self.denoise(model, x, jnp.full((b,), s), cond), noise, self.sigmas())
        return {"x0": x0, "cond": cond}, x0

    def advantages(self, aux, batch: dict, rewards: Array, ids: Array):
        """Group advantages of ``rewards`` ``[B]`` by prompt ``ids`` ``[B]``, attached to every
        sample once per training sigma (``[B K]`` rows, ``t`` set; ``K = 1`` and ``t`` drawn in
        the loss when training uniformly). Returns ``(aux, batch, metrics)``."""
        adv = device_group_advantages(rewards, ids, global_std=self.global_std)
        grid = self.train_sigmas()
        k = 1 if grid is None else len(grid)
        rows = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), {"x0": batch["x0"], "cond": batch["cond"]})
        rows["advantage"] = jnp.repeat(adv, k)
        if grid is not None:
            rows["t"] = jnp.tile(jnp.asarray(grid), adv.shape[0])
        return aux, rows, {"advantage_abs": jnp.abs(adv).mean()}

    def loss(self, params, frozen: Frozen, batch: dict, key: Array) -> tuple[Array, dict[str, Array]]:
        x0, cond, advantage = batch["x0"], batch["cond"], batch["advantage"]
        if jnp.shape(advantage) != (x0.shape[0],):
            raise ValueError(f"advantage has shape {jnp.shape(advantage)}; expected ({x0.shape[0]},), "
                             "one per x0 row")
        check_cond(cond, x0.shape[0], "x0")
        if not isinstance(advantage, jax.core.Tracer):
            check_advantages(advantage)
        if not (isinstance(frozen.aux, dict) and "old" in frozen.aux):
            raise ValueError("NFT needs the old policy in the train state: build it with make_train_step "
                             "(init_state makes aux={'old': copy of the trainable params})")
        key_t, key_eps = jax.random.split(key)
        t = batch["t"].astype(jnp.float32) if "t" in batch else self.sample_t(key_t, x0.shape[0])
        eps = jax.random.normal(key_eps, x0.shape, jnp.float32)
        x0 = x0.astype(jnp.float32)
        sigma = t.reshape(t.shape + (1,) * (x0.ndim - 1))
        x_t = (1 - sigma) * x0 + sigma * eps
        inputs = frozen.cast(x_t)
        v_theta = self.denoise(frozen.model(params), inputs, t, cond)
        v_old = jax.lax.stop_gradient(self.denoise(frozen.model(frozen.aux["old"]), inputs, t, cond))
        v_ref = None
        if self.kl_beta > 0:
            v_ref = jax.lax.stop_gradient(self.denoise(reference_model(frozen, params), inputs, t, cond))
        loss, metrics = nft_loss(v_theta, v_old, x_t, x0, t, advantage, beta=self.beta, v_ref=v_ref,
                                 kl_beta=self.kl_beta, adv_clip=self.adv_clip, floor=self.floor)
        nonfinite = jnp.sum(~jnp.isfinite(jnp.asarray(advantage, jnp.float32))).astype(jnp.float32)
        return loss, {**metrics, "nonfinite_advantages": nonfinite, "t": t.mean()}
