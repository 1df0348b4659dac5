"""Flow-GRPO: GRPO on the flow-matching SDE's Gaussian transitions (Liu et al. 2025,
"Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470; yifan123/flow_grpo).

The flow ODE is turned into an SDE with the same marginals (``flow_sde_step``); each SDE step is a
Gaussian policy action whose log-prob (fp32) enters DDPO's clipped surrogate, plus a KL penalty
between the policy's and the reference's step means. One online iteration:

1. ``batch, x0 = objective.rollout(model, cond, noise, key)`` with the CURRENT policy,
   ``G`` samples per prompt, consecutive;
2. the decoded samples are scored on the host and :meth:`FlowGRPO.advantages` attaches the group
   advantages ``(R - mean_group) / (std + 1e-4)`` to the trajectories on the device;
3. the update of ``make_train_step(objective, ...)`` re-evaluates the recorded transitions under
   the new params (``flow_sde_step_logprob``).

:func:`jdpt.train.online.make_online_step` runs the three as one step of ``jdpt.train.fit``.

Samples whose advantage is 0 (groups with equal rewards) are kept, not filtered as the reference
does (static shapes): their surrogate term is 0, only the KL term acts on them.

Variants: ``FlowGRPO(sde="cps")`` samples and scores with coefficients-preserving steps
(``flow_cps_step``; Wang & Yu 2025, flow_grpo ``sde_type="cps"``) instead of the SDE; Flow-GRPO's
evaluation / checkpoint weights are an EMA of the trained ones, :func:`ema_update` (decay 0.9
every 8 steps): ``FlowGRPO(ema=True)`` keeps it in the train state (``aux["ema"]``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdpt.diffusion.samplers import (cps_log_prob, flow_cps_sample, flow_cps_step, flow_sde_sample, flow_sde_step,
                                     gaussian_log_prob)
from jdpt.diffusion.schedules import flow_sigmas
from jdpt.objectives.advantages import device_group_advantages
from jdpt.objectives.ddpo import (check_transitions, clipped_surrogate, guided_prediction,
                                  scan_transitions)
from jdpt.objectives.denoiser import Denoiser, check_prediction, reference_model
from jdpt.parallel.step import Frozen

Array = jax.Array
Metrics = dict[str, Array]


def mean_kl(mean: Array, mean_ref: Array, std: Array) -> Array:
    """Flow-GRPO's KL term between the policy's and the reference's step means:
    ``mean_CHW((mean - mean_ref)²) / (2 std²)`` ``[B]``. 0 where ``std == 0``.

    :class:`FlowGRPO` passes what flow_grpo's ``sd3_sde_with_logprob`` returns as ``std_dev_t``
    and ``train_sd3.py`` divides by: for the SDE the noise scale ``s_t`` (without the step's
    ``sqrt(|dt|)``, so this is the exact Gaussian KL times ``|dt|``: the paper's ``beta`` was tuned
    on this form), for CPS the step std ``sigma_next sin(a pi / 2)``.

    Args:
        mean, mean_ref: ``[B, ...]``; std: ``[B]`` or broadcastable ``[B, 1, ...]``.
    """
    sq = jnp.mean((mean.astype(jnp.float32) - mean_ref.astype(jnp.float32)) ** 2, axis=tuple(range(1, mean.ndim)))
    std = jnp.reshape(jnp.asarray(std, jnp.float32), (sq.shape[0], -1))[:, 0]
    noisy = std > 0
    return jnp.where(noisy, sq / (2 * jnp.where(noisy, std, 1.0) ** 2), 0.0)


@dataclasses.dataclass(frozen=True)
class FlowGRPO:
    """Flow-GRPO (Liu et al. 2025): ``L = clipped_surrogate(logp, logp_old, A) + beta KL``.

    Defaults from flow_grpo ``config/grpo.py`` (SD3.5-M): 10 training sampler steps,
    ``noise_level a = 0.7``, CFG 4.5, ``clip_range = 1e-4``, ``adv_clip_max = 5``, ``beta = 0.04``
    (GenEval/OCR; 0.01 for PickScore), ``timestep_fraction = 0.99`` (the first
    ``int(0.99 N)`` transitions are trained: 9 of 10). Groups of 24 per prompt, LoRA r32, lr 3e-4
    belong to the caller. ``shift = 3.0`` is SD3's static schedule shift (the Shapes world uses 1.0).

    Flow-GRPO-Fast: ``sde_window_size = w`` draws a window start ``s`` per rollout uniformly with
    ``[s, s + w)`` inside ``sde_window_range`` (default ``(0, num_steps // 2)``, our choice);
    only those steps are SDE steps (ODE elsewhere) and only they are trained.

    Flow-CPS: ``sde="cps"`` replaces every SDE step by :func:`jdpt.diffusion.samplers.flow_cps_step`
    (noise std ``sigma_next sin(a pi / 2)``, ``a = noise_level`` in ``(0, 1]``) in rollouts and
    in the loss, whose log-probs are then the reference's ``-mean((x' - mean)²)``; the KL term
    divides by the CPS step's std (flow_grpo returns it as ``std_dev_t``). The last step
    (``sigma_next = 0``) is deterministic and, with ``timestep_fraction < 1``, not trained.

    Attributes:
        denoise: the velocity model adapter (``t = sigma``; e.g. ``world_velocity``).
        num_steps, shift: the rollout grid ``flow_sigmas(num_steps, shift=shift)``.
        noise_level: the SDE's (or CPS's) ``a``; cfg_scale: guidance in rollouts and the update
            (two forwards per transition, batched as one).
        clip_range, adv_clip: the surrogate's ratio clip and advantage clip.
        beta: KL weight (0 skips the reference forward).
        sde: ``"flow"`` (Flow-GRPO's SDE) or ``"cps"`` (coefficients-preserving sampling).
        global_std: advantages divide by the whole batch's reward std (flow_grpo's default).
        ema: keep flow_grpo's EMA of the trained weights (evaluation weights; the update never
            reads them) in ``aux["ema"]``. flow_grpo's configs enable it; jdpt's default is off, as
            it costs a copy of the trainable weights and changes no training step.
    """

    denoise: Denoiser
    num_steps: int = 10
    shift: float = 3.0
    noise_level: float = 0.7
    cfg_scale: float = 4.5
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    beta: float = 0.04
    timestep_fraction: float = 0.99
    sde_window_size: int | None = None
    sde_window_range: tuple[int, int] | None = None
    sde: str = "flow"
    global_std: bool = True
    ema: bool = False

    def __post_init__(self):
        check_prediction(self.denoise, "velocity", "FlowGRPO")
        if self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps} must be >= 1")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction={self.timestep_fraction} must be in (0, 1]")
        if self.sde not in ("flow", "cps"):
            raise ValueError(f"sde={self.sde!r}: use 'flow' (Flow-GRPO's SDE) or 'cps' (coefficients-preserving)")
        if self.noise_level <= 0:
            raise ValueError(f"noise_level={self.noise_level}: the SDE needs noise (> 0; Flow-GRPO uses 0.7)")
        if self.sde == "cps" and self.noise_level > 1:
            raise ValueError(f"noise_level={self.noise_level}: CPS's a must be in (0, 1] (std = sigma_next sin(a pi / 2))")
        if self.sde_window_size is not None:
            lo, hi = self.window_range
            if not (1 <= self.sde_window_size <= hi - lo and 0 <= lo and hi <= self.num_steps):
                raise ValueError(f"sde_window_size={self.sde_window_size} must fit in sde_window_range={(lo, hi)} "
                                 f"inside [0, num_steps={self.num_steps}]")

    @property
    def window_range(self) -> tuple[int, int]:
        return self.sde_window_range or (0, self.num_steps // 2)

    @property
    def num_train(self) -> int:
        """Transitions recorded (and trained) per sample."""
        if self.sde_window_size is not None:
            return self.sde_window_size
        return max(1, int(self.num_steps * self.timestep_fraction))

    def sigmas(self) -> np.ndarray:
        return flow_sigmas(self.num_steps, shift=self.shift)

    def rollout(self, model: nnx.Module, cond: Any, noise: Array, key: Array, *,
                uncond: Any = None) -> tuple[dict[str, Any], Array]:
        """Sample flow-SDE trajectories with ``model`` (the current policy). Pure: jit it.

        Args:
            cond, uncond: conditions, pytrees of ``[B, ...]`` (``uncond`` when ``cfg_scale != 1``).
            noise: ``[B, ...]`` initial states at ``sigma = 1``.
            key: PRNG key (per-step noise and the Fast variant's window).
        Returns:
            ``(batch, x0)``: ``x0`` ``[B, ...]``; ``batch`` holds the ``K = num_train`` trained
            transitions ``x_t``, ``x_next`` ``[B, K, ...]``, ``sigma``, ``sigma_next``,
            ``logp_old`` ``[B, K]`` fp32, ``cond`` (and ``uncond`` when guided). Add ``advantages`` ``[B]`` before the update.
        """
        b = noise.shape[0]
        sigmas = jnp.asarray(self.sigmas())
        key_noise, key_window = jax.random.split(key)
        window, start = None, 0
        if self.sde_window_size is not None:
            lo, hi = self.window_range
            start = jax.random.randint(key_window, (), lo, hi - self.sde_window_size + 1)
            window = (start, start + self.sde_window_size)

        def predict(x, sigma):
            return guided_prediction(self.denoise, model, x, jnp.full((b,), sigma), cond, uncond, self.cfg_scale)

        sample = flow_cps_sample if self.sde == "cps" else flow_sde_sample
        traj = sample(predict, noise, sigmas, key=key_noise, noise_level=self.noise_level, sde_window=window,
                      return_trajectory=True)
        k = self.num_train

        def steps(x):  # [N, ...] -> the trained [K, ...]
            return jax.lax.dynamic_slice_in_dim(x, start, k, axis=0)

        batch = {"x_t": jnp.swapaxes(steps(traj.samples[:-1]), 0, 1),
                 "x_next": jnp.swapaxes(steps(traj.samples[1:]), 0, 1),
                 "sigma": jnp.broadcast_to(steps(traj.t), (b, k)),
                 "sigma_next": jnp.broadcast_to(steps(traj.t_next), (b, k)),
                 "logp_old": steps(traj.log_probs).T, "cond": cond}
        if self.cfg_scale != 1.0:
            batch["uncond"] = uncond
        return batch, traj.samples[-1]

    def advantages(self, aux: Any, batch: dict[str, Any], rewards: Array, ids: Array):
        """Group advantages of ``rewards`` ``[B]`` by prompt ``ids`` ``[B]`` as
        ``batch["advantages"]``. Returns ``(aux, batch, metrics)``; jittable."""
        adv = device_group_advantages(rewards, ids, global_std=self.global_std)
        return aux, {**batch, "advantages": adv}, {"advantage_abs": jnp.abs(adv).mean()}

    def init_aux(self, params: nnx.State) -> Any:
        return {"ema": params} if self.ema else None

    def update_aux(self, aux: Any, params: nnx.State, step: Array) -> Any:
        # flow_grpo steps the EMA with its global step after the update
        return aux if aux is None else {**aux, "ema": ema_update(aux["ema"], params, step + 1)}

    def transition(self, velocity: Array, x: Array, sigma: Array, sigma_next: Array) -> tuple[Array, Array]:
        """The rollout's step ``(mean, std)`` for ``velocity`` at ``x`` (``flow_sde_step`` with
        Flow-GRPO's ``sigma_max = sigmas[1]``, or ``flow_cps_step``)."""
        if self.sde == "cps":
            return flow_cps_step(velocity, x, sigma, sigma_next, noise_level=self.noise_level)
        return flow_sde_step(velocity, x, sigma, sigma_next, sigma_max=float(self.sigmas()[1]),
                             noise_level=self.noise_level)

    def kl_std(self, std: Array, sigma: Array, sigma_next: Array) -> Array:
        """The std the KL term divides by (flow_grpo's ``std_dev_t``): the SDE step's ``s_t =
        std / sqrt(sigma - sigma_next)``, or the CPS step's std itself."""
        if self.sde == "cps":
            return std
        dt = jnp.reshape(jnp.asarray(sigma - sigma_next, jnp.float32), (-1,) + (1,) * (jnp.ndim(std) - 1))
        return std / jnp.sqrt(dt)

    def loss(self, params: nnx.State, frozen: Frozen, batch: dict[str, Any],
             key: Array) -> tuple[Array, Metrics]:
        """Batch: a :meth:`rollout` batch plus ``advantages`` ``[B]``."""
        check_transitions(batch, ("sigma", "sigma_next"))
        cond, uncond = batch["cond"], batch.get("uncond")
        log_prob = cps_log_prob if self.sde == "cps" else gaussian_log_prob

        def step(params, x_t, x_next, sigma, sigma_next):
            x_in = frozen.cast(x_t)
            v = guided_prediction(self.denoise, frozen.model(params), x_in, sigma, cond, uncond, self.cfg_scale)
            mean, std = self.transition(v, x_t, sigma, sigma_next)
            logp = log_prob(x_next, mean, std)
            if self.beta == 0:
                return logp, jnp.zeros_like(logp)
            v_ref = guided_prediction(self.denoise, reference_model(frozen, params), x_in, sigma, cond, uncond,
                                      self.cfg_scale)
            mean_ref, _ = self.transition(jax.lax.stop_gradient(v_ref), x_t, sigma, sigma_next)
            return logp, mean_kl(mean, mean_ref, self.kl_std(std, sigma, sigma_next))

        logp, kl = scan_transitions(step, params, batch, ("x_t", "x_next", "sigma", "sigma_next"))
        policy, metrics = clipped_surrogate(logp.T, batch["logp_old"], batch["advantages"], self.clip_range,
                                            self.adv_clip)
        kl = jnp.mean(kl)
        return policy + self.beta * kl, {**metrics, "policy_loss": policy, "kl": kl}


def ema_update(ema: Any, params: Any, step: int | Array, *, decay: float = 0.9, every: int = 8) -> Any:
    """Flow-GRPO's EMA of the trained weights (flow_grpo ``EMAModuleWrapper.step``, created with
    ``decay=0.9, update_step_interval=8``; used for evaluation and saved checkpoints):

    ``d = min((1 + step) / (10 + step), decay)``; when ``(step + 1) % every == 0``,
    ``ema <- ema + (1 - d) (params - ema)``, else ``ema`` unchanged. Pure and jittable (``step``
    may be traced); start from ``ema = params`` at step 0.

    Args:
        ema, params: pytrees of one structure (e.g. ``state.params`` of the train state).
        step: the optimizer step count the reference passes (its ``global_step`` after the update).
        decay: the EMA decay (Flow-GRPO: 0.9; the warm-up ``(1 + step) / (10 + step)`` caps it
            early on); every: update interval in steps (Flow-GRPO: 8).
    Returns:
        The new EMA pytree (each leaf in its input dtype).
    """
    if every < 1 or not 0 <= decay < 1:
        raise ValueError(f"ema_update needs every >= 1 and 0 <= decay < 1; got every={every}, decay={decay}")
    step = jnp.asarray(step, jnp.int32)
    n = step.astype(jnp.float32)
    rate = jnp.where((step + 1) % every == 0, 1 - jnp.minimum((1 + n) / (10 + n), decay), 0.0)

    def update(e, p):
        e32 = jnp.asarray(e, jnp.float32)
        return (e32 + rate * (jnp.asarray(p, jnp.float32) - e32)).astype(jnp.asarray(e).dtype)

    return jax.tree.map(update, ema, params)
