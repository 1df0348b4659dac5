"""DDPO and DPOK: policy-gradient fine-tuning on DDIM (eta = 1) sampling trajectories.

DDPO (Black et al., "Training Diffusion Models with Reinforcement Learning", ICLR 2024;
kvablack/ddpo-pytorch) treats each DDIM step ``x_t -> x_{t-1}`` with ``eta = 1`` as a Gaussian
policy action. DPOK (Fan et al., "DPOK: Reinforcement Learning for Fine-tuning Text-to-Image
Diffusion Models", NeurIPS 2023; google-research/dpok) adds a KL-like penalty to the pretrained
model. One online iteration (:func:`jdpt.train.online.make_online_step` runs it as one step of
``jdpt.train.fit``):

1. ``batch, x0 = objective.rollout(model, cond, noise, key)`` with the CURRENT policy: the
   trajectories' states, timesteps and ``logp_old``, kept on the device.
2. The decoded samples are scored on the host; ``objective.advantages(aux, batch, rewards, ids)``
   turns the rewards into ``batch["advantages"]`` on the device: ``[B]`` from DDPO's per-prompt
   stat tracker (:class:`jdpt.objectives.advantages.PerPromptStatTracker`, its table in the train
   state), ``[B, K]`` per transition from DPOK's learned value net
   (:class:`jdpt.objectives.value.ValueBaseline`, trained there first, also in the train state).
3. The update of ``make_train_step(objective, ...)``: the loss re-evaluates every stored
   transition's log-prob under the new params (``ddim_step_logprob``).

Models: :data:`Denoiser` in the DDPM convention (integer timesteps, ``schedule.prediction_type``
output). A flow-matching model (the Shapes world) joins through :func:`flow_as_epsilon`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdpt.diffusion.samplers import ddim_sample, ddim_step_logprob
from jdpt.diffusion.schedules import DDPMSchedule, alpha_cumprod_at
from jdpt.guidance.cfg import cfg
from jdpt.objectives.advantages import PerPromptStatTracker
from jdpt.objectives.denoiser import Denoiser, check_prediction, reference_model
from jdpt.objectives.value import ValueBaseline, value_advantages, value_batch
from jdpt.parallel.step import Frozen

Array = jax.Array
Metrics = dict[str, Array]


def guided_prediction(denoise: Denoiser, model: nnx.Module, x: Array, t: Array, cond: Any,
                      uncond: Any = None, cfg_scale: float = 1.0) -> Array:
    """The model's prediction ``[B, ...]`` with classifier-free guidance
    ``u + cfg_scale (c - u)`` (Ho & Salimans 2022) from one forward on ``[uncond; cond]``;
    ``cfg_scale == 1``: the conditional prediction alone (``uncond`` unused).

    Args:
        x: ``[B, ...]`` states; t: ``[B]`` times; cond, uncond: model conditions, pytrees of
            ``[B, ...]`` arrays of one structure.
    """
    if cfg_scale == 1.0:
        return denoise(model, x, t, cond)
    if uncond is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs the unconditional input: pass uncond= (a rollout) or "
                         "batch['uncond'] (the update), shaped like cond; or set cfg_scale=1.0")
    both = jax.tree.map(lambda u, c: jnp.concatenate([u, c]), uncond, cond)
    out = denoise(model, jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    return cfg(*jnp.split(out, 2), cfg_scale)


def flow_as_epsilon(denoise: Denoiser, schedule: DDPMSchedule) -> Denoiser:
    """A flow-matching velocity model (``x_s = (1 - s) x0 + s eps``, ``v = eps - x0``, e.g.
    :func:`jdpt.objectives.denoiser.world_velocity`) as an epsilon model at integer timesteps of
    ``schedule``, so DDIM-based objectives run on it.

    The variance-preserving state ``x_t = sqrt(a) x0 + sqrt(1 - a) eps`` divided by
    ``c = sqrt(a) + sqrt(1 - a)`` is the flow state at ``s = sqrt(1 - a) / c``; there
    ``eps = x_s + (1 - s) v``.
    """
    if schedule.prediction_type != "epsilon":
        raise ValueError(f"flow_as_epsilon gives epsilon predictions; use a schedule with "
                         f"prediction_type='epsilon' (got {schedule.prediction_type!r})")

    def epsilon(model: nnx.Module, x_t: Array, t: Array, cond: Any) -> Array:
        a = alpha_cumprod_at(schedule, t)
        root_a, root_b = jnp.sqrt(a), jnp.sqrt(1 - a)
        c = (root_a + root_b).reshape(a.shape + (1,) * (x_t.ndim - 1))
        sigma = root_b / (root_a + root_b)
        x_s = x_t.astype(jnp.float32) / c
        v = denoise(model, x_s.astype(x_t.dtype), sigma, cond).astype(jnp.float32)
        return x_s + (1 - sigma.reshape(c.shape)) * v

    return epsilon


def clipped_surrogate(logp: Array, logp_old: Array, advantages: Array, clip_range: float,
                      adv_clip: float) -> tuple[Array, Metrics]:
    """PPO's clipped surrogate as DDPO / Flow-GRPO use it:
    ``mean(max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range)))``, ``r = exp(logp - logp_old)``,
    ``A = clip(advantages, -adv_clip, adv_clip)``.

    Args:
        logp, logp_old: ``[B, K]`` (or ``[B]``) per-transition log-probs.
        advantages: ``[B]`` per-sample advantages (broadcast over the ``K`` transitions).
    Returns:
        ``(loss, metrics)``: ``clipfrac`` (share of ratios outside the clip range), ``approx_kl``
        (``mean((logp - logp_old)²) / 2``), ``ratio`` (mean).
    """
    adv = jnp.clip(advantages, -adv_clip, adv_clip).astype(jnp.float32)
    adv = adv.reshape(adv.shape + (1,) * (logp.ndim - adv.ndim))
    diff = logp.astype(jnp.float32) - logp_old.astype(jnp.float32)
    ratio = jnp.exp(diff)
    loss = jnp.mean(jnp.maximum(-adv * ratio, -adv * jnp.clip(ratio, 1 - clip_range, 1 + clip_range)))
    return loss, _ratio_metrics(ratio, diff, clip_range)


def dpok_surrogate(logp: Array, logp_old: Array, advantages: Array, clip_range: float,
                   alpha: float) -> tuple[Array, Metrics]:
    """DPOK's policy term ``mean(-alpha A clamp(r, 1 - clip_range, 1 + clip_range))`` (a plain
    clamp: no gradient once the ratio leaves the range; dpok ``train_online_pg.py``).
    Shapes as :func:`clipped_surrogate`."""
    adv = advantages.astype(jnp.float32)
    adv = adv.reshape(adv.shape + (1,) * (logp.ndim - adv.ndim))
    diff = logp.astype(jnp.float32) - logp_old.astype(jnp.float32)
    ratio = jnp.exp(diff)
    loss = jnp.mean(-alpha * adv * jnp.clip(ratio, 1 - clip_range, 1 + clip_range))
    return loss, _ratio_metrics(ratio, diff, clip_range)


def _ratio_metrics(ratio: Array, diff: Array, clip_range: float) -> Metrics:
    return {"clipfrac": jnp.mean((jnp.abs(ratio - 1) > clip_range).astype(jnp.float32)),
            "approx_kl": 0.5 * jnp.mean(diff**2), "ratio": jnp.mean(ratio)}


def ddim_rollout(denoise: Denoiser, model: nnx.Module, cond: Any, noise: Array, key: Array, *,
                 schedule: DDPMSchedule, num_steps: int, eta: float = 1.0, cfg_scale: float = 1.0,
                 uncond: Any = None) -> tuple[dict[str, Any], Array]:
    """Sample DDIM trajectories with ``model`` (the current policy) and record what a DDPO/DPOK
    update needs. Pure: jit it with the objective's settings static.

    Args:
        cond, uncond: conditions, pytrees of ``[B, ...]`` arrays (``uncond`` for ``cfg_scale != 1``).
        noise: ``[B, ...]`` initial states ``x_T``.
        key: PRNG key of the per-step noise.
    Returns:
        ``(batch, x0)``: ``x0`` ``[B, ...]`` the samples; ``batch`` holds ``x_t``, ``x_next``
        ``[B, N, ...]`` (each step's input and output state), ``t``, ``t_next`` ``[B, N]``
        int32, ``logp_old`` ``[B, N]`` fp32, ``cond`` (and ``uncond`` when guided). Add
        ``advantages`` ``[B]`` before the update.
    """
    b = noise.shape[0]

    def predict(x, t):
        return guided_prediction(denoise, model, x, jnp.full((b,), t), cond, uncond, cfg_scale)

    traj = ddim_sample(predict, noise, schedule, num_steps, eta=eta, key=key, return_trajectory=True)
    batch = _trajectory_batch(traj.samples, traj.t, traj.t_next, traj.log_probs, cond, uncond, cfg_scale)
    return batch, traj.samples[-1]


def _trajectory_batch(samples, t, t_next, log_probs, cond, uncond, cfg_scale) -> dict[str, Any]:
    """Batch-major transitions ``[B, N, ...]`` from a sampler's step-major ``[N(+1), B, ...]``."""
    b, n = samples.shape[1], t.shape[0]
    batch = {"x_t": jnp.swapaxes(samples[:-1], 0, 1), "x_next": jnp.swapaxes(samples[1:], 0, 1),
             "t": jnp.broadcast_to(t, (b, n)), "t_next": jnp.broadcast_to(t_next, (b, n)),
             "logp_old": log_probs.T, "cond": cond}
    if cfg_scale != 1.0:
        batch["uncond"] = uncond
    return batch


def tracked_advantages(tracker: PerPromptStatTracker | None, aux: Any, rewards: Array,
                       ids: Array) -> tuple[Any, Array, dict[str, Array]]:
    """``(aux, advantages [B], metrics)``: ``rewards`` normalised per prompt by ``tracker`` (its
    table in ``aux["tracker"]``), or by the batch's mean and std (+1e-8) when it is None."""
    r = jnp.asarray(rewards, jnp.float32)
    if tracker is None:
        return aux, (r - r.mean()) / (r.std() + 1e-8), {}
    table, adv = tracker.update(aux["tracker"], ids, r)
    return {**aux, "tracker": table}, adv, {"tracker_overflow": table["overflow"].astype(jnp.float32)}


def check_transitions(batch: dict[str, Any], times: tuple[str, str] = ("t", "t_next"),
                      per_transition: bool = False) -> tuple[int, int]:
    """``(B, K)`` of a rollout batch; ValueError naming the bad entry otherwise. ``advantages``
    must be ``[B]``, or ``[B, K]`` (one per transition) when ``per_transition``."""
    need = ("x_t", "x_next", *times, "logp_old", "advantages", "cond")
    missing = [k for k in need if k not in batch]
    if missing:
        raise ValueError(f"the batch lacks {missing}: build it with the objective's rollout() and add "
                         "batch['advantages'] [B] from the rewards")
    logp_old = batch["logp_old"]
    if logp_old.ndim != 2:
        raise ValueError(f"batch['logp_old'] must be [B, K] (K recorded transitions); got {logp_old.shape}")
    b, k = logp_old.shape
    x_t = batch["x_t"]
    expected = {"x_t": (b, k), "x_next": tuple(x_t.shape), times[0]: (b, k), times[1]: (b, k),
                "advantages": (b, k) if per_transition else (b,)}
    for name, shape in expected.items():
        got = tuple(batch[name].shape)
        ok = got[:2] == shape and x_t.ndim > 2 if name == "x_t" else got == shape
        if not ok:
            raise ValueError(f"batch[{name!r}] has shape {got}; expected {shape}{' + state dims' if name == 'x_t' else ''} "
                             f"for logp_old of shape {(b, k)}")
    return b, k


def select_steps(batch: dict[str, Any], num_train: int, key: Array,
                 keys: tuple[str, ...] = ("x_t", "x_next", "t", "t_next", "logp_old")) -> dict[str, Any]:
    """Keep ``num_train`` of the ``K`` recorded transitions of each sample, a random subset per
    sample (ddpo-pytorch's per-sample timestep permutation with ``timestep_fraction``); all of
    them, in order, when ``num_train == K``."""
    b, k = batch["logp_old"].shape
    if num_train >= k:
        return batch
    order = jnp.argsort(jax.random.uniform(key, (b, k)), axis=1)[:, :num_train]

    def take(x):
        idx = order.reshape(order.shape + (1,) * (x.ndim - 2))
        return jnp.take_along_axis(x, idx, axis=1)

    return {**batch, **{name: take(batch[name]) for name in keys}}


def _num_train(k: int, fraction: float) -> int:
    if not 0 < fraction <= 1:
        raise ValueError(f"timestep_fraction={fraction} must be in (0, 1]")
    return max(1, int(k * fraction))


def scan_transitions(step_fn, params: nnx.State, batch: dict[str, Any], keys: tuple[str, ...]):
    """``step_fn(params, *transition)`` over the ``K`` axis of ``batch[keys]`` (``[B, K, ...]``),
    rematerialised per step (``jax.checkpoint``: one step's activations live at a time).
    Returns its outputs stacked ``[K, ...]``."""
    step_fn = jax.checkpoint(step_fn)
    xs = tuple(jnp.swapaxes(batch[name], 0, 1) for name in keys)
    _, out = jax.lax.scan(lambda carry, x: (carry, step_fn(params, *x)), None, xs)
    return out


@dataclasses.dataclass(frozen=True)
class DDPO:
    """DDPO (Black et al., ICLR 2024): PPO on DDIM (eta = 1) transitions, no KL term.

    Defaults are ddpo-pytorch's (``config/base.py``): 50 DDIM steps, ``eta = 1``, CFG 5.0,
    ``clip_range = 1e-4``, ``adv_clip_max = 5``, ``timestep_fraction = 1.0`` (SD1.4 + LoRA,
    lr 3e-4, AdamW wd 1e-4: the optimizer's settings).

    Attributes:
        denoise: the model adapter (DDPM convention; :func:`flow_as_epsilon` for flow models).
        schedule: the DDPM schedule the sampler and log-probs use (SD's by default).
        num_steps, eta, cfg_scale: rollout sampling (the update's predictions use the same CFG:
            two forwards per transition, batched as one).
        estimator: ``"is"`` (DDPO_IS: the clipped importance-sampling surrogate) or ``"sf"``
            (DDPO_SF: the score function ``-A exp(logp - sg(logp))``, value ``-mean(A)``,
            gradient ``-A grad logp``; only exact on-policy, i.e. the first update of a rollout).
        clip_range: PPO ratio clip; adv_clip: advantages clipped to ``+-adv_clip``.
        timestep_fraction: share of each trajectory's transitions trained (a random subset per
            sample, drawn from the loss key).
        tracker: the per-prompt reward normaliser of the online advantages (ddpo-pytorch's
            ``per_prompt_stat_tracking``: buffer 16, min count 16), its table in ``aux["tracker"]``;
            None: the batch's ``(r - mean) / (std + 1e-8)`` (ddpo-pytorch without tracking).
    """

    denoise: Denoiser
    schedule: DDPMSchedule = DDPMSchedule.stable_diffusion()
    num_steps: int = 50
    eta: float = 1.0
    cfg_scale: float = 5.0
    estimator: str = "is"
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    timestep_fraction: float = 1.0
    tracker: PerPromptStatTracker | None = PerPromptStatTracker()

    def __post_init__(self):
        check_prediction(self.denoise, self.schedule.prediction_type, "DDPO")
        if self.estimator not in ("is", "sf"):
            raise ValueError(f"estimator={self.estimator!r}: use 'is' (clipped importance sampling) or 'sf' (score function)")
        if self.eta <= 0:
            raise ValueError(f"eta={self.eta}: DDPO's transitions need noise (eta > 0; the paper uses 1.0)")
        _num_train(self.num_steps, self.timestep_fraction)

    def rollout(self, model: nnx.Module, cond: Any, noise: Array, key: Array, *,
                uncond: Any = None) -> tuple[dict[str, Any], Array]:
        """:func:`ddim_rollout` with this objective's sampling settings."""
        return ddim_rollout(self.denoise, model, cond, noise, key, schedule=self.schedule,
                            num_steps=self.num_steps, eta=self.eta, cfg_scale=self.cfg_scale, uncond=uncond)

    def init_aux(self, params: nnx.State) -> Any:
        return None if self.tracker is None else {"tracker": self.tracker.init()}

    def advantages(self, aux: Any, batch: dict[str, Any], rewards: Array, ids: Array):
        """Per-prompt normalised ``rewards`` ``[B]`` (prompt ``ids`` ``[B]``) as
        ``batch["advantages"]``. Returns ``(aux, batch, metrics)``; jittable."""
        aux, adv, metrics = tracked_advantages(self.tracker, aux, rewards, ids)
        return aux, {**batch, "advantages": adv}, metrics

    def _logprob(self, frozen: Frozen, batch: dict[str, Any]):
        def step(params, x_t, x_next, t, t_next):
            prediction = guided_prediction(self.denoise, frozen.model(params), frozen.cast(x_t), t,
                                           batch["cond"], batch.get("uncond"), self.cfg_scale)
            return ddim_step_logprob(prediction, x_t, x_next, t, t_next, self.schedule, self.eta)

        return step

    def loss(self, params: nnx.State, frozen: Frozen, batch: dict[str, Any],
             key: Array) -> tuple[Array, Metrics]:
        """Batch: a :meth:`rollout` batch plus ``advantages`` ``[B]``."""
        _, k = check_transitions(batch)
        batch = select_steps(batch, _num_train(k, self.timestep_fraction), key)
        logp = scan_transitions(self._logprob(frozen, batch), params, batch,
                                ("x_t", "x_next", "t", "t_next")).T  # [B, K]
        if self.estimator == "sf":
            adv = jnp.clip(batch["advantages"], -self.adv_clip, self.adv_clip)[:, None]
            loss = jnp.mean(-adv * jnp.exp(logp - jax.lax.stop_gradient(logp)))
            _, metrics = clipped_surrogate(logp, batch["logp_old"], batch["advantages"],
                                           self.clip_range, self.adv_clip)
            return loss, metrics
        return clipped_surrogate(logp, batch["logp_old"], batch["advantages"], self.clip_range, self.adv_clip)


@dataclasses.dataclass(frozen=True)
class DPOK:
    """DPOK (Fan et al., NeurIPS 2023): ``L = -alpha A clamp(r, 1 +- clip_range)
    + beta mean((pred_theta - pred_pre)²)`` on DDIM (eta = 1) transitions, both predictions
    CFG-combined; the pretrained model is :func:`jdpt.objectives.denoiser.reference_model`
    (the LoRA base, or ``frozen.extra["reference"]``).

    Defaults from google-research/dpok ``train_online_pg.py`` as the spec records them:
    ``alpha = 100`` (reward weight), ``beta = 0.01`` (KL weight), ``clip_range = 1e-4``, 50
    steps, CFG 7.5 (SD1.5's pipeline default), lr 1e-5, LoRA rank 4.

    Advantages (``baseline``):

    - ``"value"`` (the paper's): ``batch["advantages"]`` ``[B, K]``, one per transition,
      ``r - V(x_t, c, t)`` from DPOK's learned value net. Online, ``value`` (a
      :class:`jdpt.objectives.value.ValueBaseline`) keeps the net and its optimizer in the train
      state and trains it on each rollout before the advantages (:meth:`advantages`).
    - ``"batch"``: ``[B]``, per sample: the reward normalised per prompt by ``tracker``
      (:class:`jdpt.objectives.advantages.PerPromptStatTracker`, its table in the train state) or,
      without one, by the batch.

    The reference samples its policy mini-batches from a replay buffer of recent transitions;
    here the update trains on the given rollout batch (``timestep_fraction`` of its steps).
    """

    denoise: Denoiser
    schedule: DDPMSchedule = DDPMSchedule.stable_diffusion()
    num_steps: int = 50
    eta: float = 1.0
    cfg_scale: float = 7.5
    alpha: float = 100.0
    beta: float = 0.01
    clip_range: float = 1e-4
    timestep_fraction: float = 1.0
    baseline: str = "value"
    value: ValueBaseline | None = None
    tracker: PerPromptStatTracker | None = None

    def __post_init__(self):
        check_prediction(self.denoise, self.schedule.prediction_type, "DPOK")
        if self.eta <= 0:
            raise ValueError(f"eta={self.eta}: DPOK's transitions need noise (eta > 0)")
        if self.baseline not in ("value", "batch"):
            raise ValueError(f"baseline={self.baseline!r}: use 'value' (r - V(x_t, c, t), advantages [B, K]) or "
                             "'batch' (host-side per-sample advantages [B])")
        _num_train(self.num_steps, self.timestep_fraction)

    def rollout(self, model: nnx.Module, cond: Any, noise: Array, key: Array, *,
                uncond: Any = None) -> tuple[dict[str, Any], Array]:
        """:func:`ddim_rollout` with this objective's sampling settings."""
        batch, x0 = ddim_rollout(self.denoise, model, cond, noise, key, schedule=self.schedule,
                                 num_steps=self.num_steps, eta=self.eta, cfg_scale=self.cfg_scale, uncond=uncond)
        if self.baseline == "value" and self.value is not None:
            batch["text"] = self.value.text(model, cond)
        return batch, x0

    def init_aux(self, params: nnx.State) -> Any:
        if self.baseline == "value":
            return None if self.value is None else {"value": self.value.init()}
        return None if self.tracker is None else {"tracker": self.tracker.init()}

    def advantages(self, aux: Any, batch: dict[str, Any], rewards: Array, ids: Array):
        """``batch["advantages"]`` from ``rewards`` ``[B]`` (prompt ``ids`` ``[B]``): ``[B, K]``
        ``r - V`` after training the value net on this rollout (``baseline="value"``), or ``[B]``
        per-prompt normalised rewards (``"batch"``). Returns ``(aux, batch, metrics)``; jittable."""
        if self.baseline == "batch":
            aux, adv, metrics = tracked_advantages(self.tracker, aux, rewards, ids)
            return aux, {**batch, "advantages": adv}, metrics
        if self.value is None:
            raise ValueError("DPOK(baseline='value') computes its advantages with a learned value net: pass "
                             "value=jdpt.objectives.value.ValueBaseline(...), or baseline='batch'")
        rows = value_batch(batch, rewards, batch["text"])
        state, metrics = self.value.fit(aux["value"], rows)
        adv = value_advantages(self.value.net(state["params"]), batch, rewards, batch["text"])
        return {**aux, "value": state}, {**batch, "advantages": adv}, metrics

    def loss(self, params: nnx.State, frozen: Frozen, batch: dict[str, Any],
             key: Array) -> tuple[Array, Metrics]:
        """Batch: a :meth:`rollout` batch plus ``advantages``: ``[B, K]`` (``baseline="value"``)
        or ``[B]`` (``"batch"``)."""
        per_transition = self.baseline == "value"
        adv = batch.get("advantages")
        if per_transition and adv is not None and jnp.ndim(adv) == 1:
            raise ValueError(f"DPOK(baseline='value') needs per-transition advantages [B, K] = r - V(x_t, c, t) "
                             f"(jdpt.objectives.value.value_advantages); got shape {jnp.shape(adv)}. For "
                             "per-sample advantages [B] use DPOK(baseline='batch')")
        _, k = check_transitions(batch, per_transition=per_transition)
        keys = ("x_t", "x_next", "t", "t_next", "logp_old") + (("advantages",) if per_transition else ())
        batch = select_steps(batch, _num_train(k, self.timestep_fraction), key, keys)
        uncond = batch.get("uncond")

        def step(params, x_t, x_next, t, t_next):
            x_in = frozen.cast(x_t)
            pred = guided_prediction(self.denoise, frozen.model(params), x_in, t, batch["cond"], uncond,
                                     self.cfg_scale)
            ref = guided_prediction(self.denoise, reference_model(frozen, params), x_in, t, batch["cond"],
                                    uncond, self.cfg_scale)
            ref = jax.lax.stop_gradient(ref)
            kl = jnp.mean((pred.astype(jnp.float32) - ref.astype(jnp.float32)) ** 2,
                          axis=tuple(range(1, pred.ndim)))
            return ddim_step_logprob(pred, x_t, x_next, t, t_next, self.schedule, self.eta), kl

        logp, kl = scan_transitions(step, params, batch, ("x_t", "x_next", "t", "t_next"))
        policy, metrics = dpok_surrogate(logp.T, batch["logp_old"], batch["advantages"], self.clip_range, self.alpha)
        kl = jnp.mean(kl)
        return policy + self.beta * kl, {**metrics, "policy_loss": policy, "kl": kl}
