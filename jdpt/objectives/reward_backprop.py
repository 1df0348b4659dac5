"""Reward backpropagation through sampling: DRaFT, AlignProp, ReFL.

The loss samples from noise with the policy inside the graph and differentiates a differentiable
reward of the result (no rollout/update split, no host step):

- DRaFT-K (Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable Rewards",
  ICLR 2024): ``L = -mean(r(x0))`` with gradients through the last ``K`` steps only; DRaFT-LV
  (``lv_samples = n``): the sample re-noised ``n`` times to the last step's level and denoised
  by that one differentiated step, rewards averaged (a lower-variance ``K = 1`` estimator).
- AlignProp (Prabhudesai et al., "Aligning Text-to-Image Diffusion Models with Reward
  Backpropagation", 2023; mihirp1998/AlignProp): the same with a random truncation point.
- ReFL (Xu et al., "ImageReward", NeurIPS 2023; THUDM/ImageReward ``ReFL.py``): no gradient up to
  a random late step, one gradient step to the predicted ``x0``, ``L = lambda mean(relu(2 - r))``.

Every method runs the no-gradient part with ``stop_gradient`` params (no backward work, no
stored activations) and wraps each differentiated denoiser step in ``jax.checkpoint`` (memory:
one step's activations at a time, plus the states).

Sampling: with ``schedule=None`` the model is a flow model (``t = sigma``) integrated with Euler
steps over ``flow_sigmas(num_steps, shift=shift)``, the predicted ``x0`` being ``x - sigma v``;
with a :class:`DDPMSchedule`, deterministic DDIM (eta = 0) over its inference timesteps, ``x0``
from ``prediction_to_x0_eps``.

Reward: ``reward_fn(x0, cond) -> [B]``, a differentiable JAX function of the final latents (decode
inside it when the reward needs pixels) and the batch's ``cond``. Batch: ``{"noise": [B, ...],
"cond": pytree of [B, ...]}`` plus ``"uncond"`` when ``cfg_scale != 1``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jdpt.diffusion.samplers import ddim_step
from jdpt.diffusion.schedules import DDPMSchedule, alpha_cumprod_at, flow_sigmas, inference_timesteps, prediction_to_x0_eps
from jdpt.objectives.ddpo import guided_prediction
from jdpt.objectives.denoiser import Denoiser, check_prediction
from jdpt.parallel.step import Frozen

Array = jax.Array
Metrics = dict[str, Array]
Predict = Callable[[Array, Array], Array]  # (x [B, ...], t scalar) -> prediction [B, ...]
Step = Callable[[Array, Array, Array, Array], Array]  # (prediction, x, t, t_next) -> x_next
RewardFn = Callable[[Array, Any], Array]


def truncated_sample(predict: Predict, predict_nograd: Predict, x: Array, times: Array, times_next: Array,
                     step: Step, first_grad_step: int | Array) -> Array:
    """Deterministic sampling ``x -> x0`` whose gradient flows only through steps
    ``i >= first_grad_step``.

    Steps before it run with ``predict_nograd`` (the model with ``stop_gradient`` params: no
    backward work) and their output is ``stop_gradient``-ed, so gradients wrt the initial ``x``,
    and wrt anything steps ``< first_grad_step`` read, are exactly 0. The differentiated steps are
    rematerialised (``jax.checkpoint``).

    Args:
        predict, predict_nograd: ``(x, t) -> prediction``.
        x: ``[B, ...]`` initial noise; times, times_next: ``[N]`` each step's times.
        step: ``(prediction, x, t, t_next) -> x_next``.
        first_grad_step: a Python int in ``[0, N]`` (static) or a traced int32 (AlignProp).
    Returns:
        ``[B, ...]`` the sample.
    """
    n = times.shape[0]

    def frozen_step(i, x):
        return jax.lax.stop_gradient(step(predict_nograd(x, times[i]), x, times[i], times_next[i]))

    grad_step = jax.checkpoint(lambda x, t, t_next: step(predict(x, t), x, t, t_next))
    x = _run_frozen(frozen_step, x, first_grad_step)
    if isinstance(first_grad_step, int):
        x, _ = jax.lax.scan(lambda x, tt: (grad_step(x, *tt), None), x,
                            (times[first_grad_step:], times_next[first_grad_step:]))
        return x

    def body(x, inputs):
        i, t, t_next = inputs
        return jax.lax.cond(i >= first_grad_step, grad_step, lambda x, *_: x, x, t, t_next), None

    x, _ = jax.lax.scan(body, x, (jnp.arange(n), times, times_next))
    return x


def _run_frozen(frozen_step, x: Array, stop: int | Array) -> Array:
    """Steps ``[0, stop)`` without gradient; ``x`` itself keeps its gradient when ``stop == 0``.
    The loop only ever sees ``stop_gradient(x)`` (a traced ``stop`` makes it a while loop, which
    reverse-mode cannot differentiate)."""
    if isinstance(stop, int):
        return x if stop == 0 else jax.lax.fori_loop(0, stop, frozen_step, jax.lax.stop_gradient(x))
    return jnp.where(stop == 0, x, jax.lax.fori_loop(0, stop, frozen_step, jax.lax.stop_gradient(x)))


def refl_prediction(predict: Predict, predict_nograd: Predict, x: Array, times: Array, times_next: Array,
                    step: Step, to_x0: Callable[[Array, Array, Array], Array], grad_step: int | Array) -> Array:
    """ReFL's ``x0``-hat: steps ``< grad_step`` without gradient, then one differentiated
    prediction at ``times[grad_step]`` mapped to ``x0`` by ``to_x0(prediction, x, t)``.
    Arguments as :func:`truncated_sample`. Returns ``[B, ...]``."""

    def frozen_step(i, x):
        return jax.lax.stop_gradient(step(predict_nograd(x, times[i]), x, times[i], times_next[i]))

    x = _run_frozen(frozen_step, x, grad_step)
    t = times[grad_step]
    return to_x0(jax.checkpoint(predict)(x, t), x, t)


def refl_loss(rewards: Array, threshold: float = 2.0, scale: float = 1e-3) -> Array:
    """ReFL's ``scale * mean(relu(threshold - r))``: 0, with zero gradient, once every ``r > threshold``."""
    return scale * jnp.mean(jax.nn.relu(threshold - rewards))


@dataclasses.dataclass(frozen=True)
class _RewardBackprop:
    denoise: Denoiser
    reward_fn: RewardFn
    num_steps: int = 50
    cfg_scale: float = 7.5
    schedule: DDPMSchedule | None = DDPMSchedule.stable_diffusion()
    shift: float = 1.0

    def __post_init__(self):
        prediction = "velocity" if self.schedule is None else self.schedule.prediction_type
        check_prediction(self.denoise, prediction, type(self).__name__)
        if self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps} must be >= 1")

    def solver(self) -> tuple[np.ndarray, np.ndarray, Step, Callable[[Array, Array, Array], Array]]:
        """``(times [N], times_next [N], step, to_x0)`` of the deterministic sampler."""
        if self.schedule is None:
            sigmas = flow_sigmas(self.num_steps, shift=self.shift)

            def step(v, x, sigma, sigma_next):
                return (x.astype(jnp.float32) + (sigma_next - sigma) * v.astype(jnp.float32)).astype(x.dtype)

            def to_x0(v, x, sigma):
                return x.astype(jnp.float32) - sigma * v.astype(jnp.float32)

            return sigmas[:-1], sigmas[1:], step, to_x0
        schedule = self.schedule
        times = inference_timesteps(schedule, self.num_steps)
        times_next = times - schedule.num_train_timesteps // self.num_steps

        def step(prediction, x, t, t_next):
            mean, _ = ddim_step(prediction, x, t, t_next, schedule, 0.0)
            return mean.astype(x.dtype)

        def to_x0(prediction, x, t):
            return prediction_to_x0_eps(prediction, x.astype(jnp.float32), alpha_cumprod_at(schedule, t),
                                        schedule.prediction_type)[0]

        return times, times_next, step, to_x0

    def predictors(self, params: nnx.State, frozen: Frozen, batch: dict[str, Any]) -> tuple[Predict, Predict]:
        """``predict`` (policy) and ``predict_nograd`` (the policy with ``stop_gradient`` params)."""
        for name in ("noise", "cond"):
            if name not in batch:
                raise ValueError(f"the batch lacks {name!r}: reward backprop needs {{'noise': [B, ...], 'cond': ...}}")
        b = batch["noise"].shape[0]
        leaves = jax.tree.leaves(batch["cond"])
        if any(leaf.shape[:1] != (b,) for leaf in leaves):
            raise ValueError(f"batch['cond'] leaves must all be [B = {b}, ...] like batch['noise']; got "
                             f"{[tuple(leaf.shape) for leaf in leaves]}")

        def make(model):
            def predict(x, t):
                t = jnp.full((b,), t)
                return guided_prediction(self.denoise, model, frozen.cast(x), t, batch["cond"], batch.get("uncond"),
                                         self.cfg_scale)
            return predict

        return make(frozen.model(params)), make(frozen.model(jax.lax.stop_gradient(params)))

    def renoise(self, x0: Array, eps: Array, t: Array) -> Array:
        """The forward process at the sampler's time ``t``: ``(1 - t) x0 + t eps`` (flow) or
        ``sqrt(a_t) x0 + sqrt(1 - a_t) eps`` (DDPM schedule). ``x0, eps``: ``[B, ...]``; fp32."""
        x0, eps = x0.astype(jnp.float32), eps.astype(jnp.float32)
        if self.schedule is None:
            return (1 - t) * x0 + t * eps
        a = alpha_cumprod_at(self.schedule, t)
        return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * eps

    def rewards(self, x0: Array, batch: dict[str, Any]) -> Array:
        r = self.reward_fn(x0, batch["cond"])
        if r.shape != (x0.shape[0],):
            raise ValueError(f"reward_fn must return [B] = [{x0.shape[0]}] rewards; got shape {r.shape}")
        return r.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class DRaFT(_RewardBackprop):
    """DRaFT-K (Clark et al., ICLR 2024): ``L = -mean(r(x0))``, gradients through the last
    ``truncation = K`` sampling steps only (``K = num_steps``: full DRaFT; ``K = 1``: DRaFT-1,
    the paper's most efficient setting). 50 DDIM steps, CFG 7.5 (SD1.4 pipeline settings;
    unverified against the paper's table).

    DRaFT-LV (``lv_samples = n > 0``, needs ``K = 1``; the paper uses ``n = 2``): the whole chain
    runs without gradient to ``x0``; ``x0`` is re-noised ``n`` times to the last step's time
    ``t_L`` (``x_L^i = renoise(x0, eps_i, t_L)``), each copy is denoised by the last sampler
    step with gradient (``x0^i = step(model(x_L^i), x_L^i, t_L, t_next_L)``) and
    ``L = -mean_{i, b} r(x0^i_b)``: ``n`` reward gradients of the final step for the cost of one
    sampling chain. The noises are ``eps = jax.random.normal(key, (n, B, ...))`` (the loss key),
    copy ``i`` of sample ``b`` using ``eps[i, b]``; the ``n B`` copies run as one batch.
    """

    truncation: int = 1
    lv_samples: int = 0

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.truncation <= self.num_steps:
            raise ValueError(f"truncation K={self.truncation} must be in [1, num_steps={self.num_steps}]")
        if self.lv_samples < 0:
            raise ValueError(f"lv_samples={self.lv_samples} must be >= 0 (0: plain DRaFT-K; DRaFT-LV uses 2)")
        if self.lv_samples and self.truncation != 1:
            raise ValueError(f"DRaFT-LV (lv_samples={self.lv_samples}) is the K = 1 estimator; got truncation "
                             f"K={self.truncation}: set truncation=1 or lv_samples=0")

    def loss(self, params: nnx.State, frozen: Frozen, batch: dict[str, Any],
             key: Array) -> tuple[Array, Metrics]:
        if self.lv_samples:
            return self._lv_loss(params, frozen, batch, key)
        predict, predict_nograd = self.predictors(params, frozen, batch)
        times, times_next, step, _ = self.solver()
        x0 = truncated_sample(predict, predict_nograd, batch["noise"], jnp.asarray(times), jnp.asarray(times_next),
                              step, self.num_steps - self.truncation)
        r = self.rewards(x0, batch)
        return -jnp.mean(r), {"reward": jnp.mean(r)}

    def _lv_loss(self, params: nnx.State, frozen: Frozen, batch: dict[str, Any],
                 key: Array) -> tuple[Array, Metrics]:
        n = self.lv_samples
        _, predict_nograd = self.predictors(params, frozen, batch)
        times, times_next, step, _ = self.solver()
        x0 = jax.lax.stop_gradient(truncated_sample(predict_nograd, predict_nograd, batch["noise"], jnp.asarray(times),
                                                    jnp.asarray(times_next), step, self.num_steps))
        copies = {name: jax.tree.map(lambda x: jnp.concatenate([x] * n), batch[name])
                  for name in ("cond", "uncond") if name in batch}
        eps = jax.random.normal(key, (n, *x0.shape), jnp.float32).reshape(n * x0.shape[0], *x0.shape[1:])
        t, t_next = times[-1], times_next[-1]
        x_last = self.renoise(jnp.concatenate([x0] * n), eps, t).astype(x0.dtype)
        predict, _ = self.predictors(params, frozen, {**copies, "noise": x_last})
        r = self.rewards(step(predict(x_last, t), x_last, t, t_next), copies)
        return -jnp.mean(r), {"reward": jnp.mean(r)}


@dataclasses.dataclass(frozen=True)
class AlignProp(_RewardBackprop):
    """AlignProp (Prabhudesai et al. 2023): reward backprop with randomised truncation: the first
    differentiated step is drawn uniformly from ``[truncation_range[0], truncation_range[1])``
    (clipped to ``[0, num_steps)``) at every loss call, from the loss key, one draw for the
    whole (micro-)batch, as trl's ``AlignPropTrainer`` does per step (the original draws once per
    batch too). Defaults: 50 DDIM steps, CFG 7.5, range ``(0, 50)``, loss ``-r``;
    ``target=10.0`` gives AlignProp's aesthetic loss ``mean|r - 10|``. Optimizer (the
    caller's): LoRA, lr 1e-3, wd 0.1, max_grad_norm 5.
    """

    truncation_range: tuple[int, int] = (0, 50)
    target: float | None = None

    def __post_init__(self):
        super().__post_init__()
        lo, hi = self.truncation_range
        if not 0 <= lo < hi:
            raise ValueError(f"truncation_range={self.truncation_range} must satisfy 0 <= low < high")

    def loss(self, params: nnx.State, frozen: Frozen, batch: dict[str, Any],
             key: Array) -> tuple[Array, Metrics]:
        predict, predict_nograd = self.predictors(params, frozen, batch)
        times, times_next, step, _ = self.solver()
        lo, hi = self.truncation_range
        lo, hi = min(lo, self.num_steps - 1), min(hi, self.num_steps)
        first = jax.random.randint(key, (), lo, max(hi, lo + 1))
        x0 = truncated_sample(predict, predict_nograd, batch["noise"], jnp.asarray(times), jnp.asarray(times_next),
                              step, first)
        r = self.rewards(x0, batch)
        loss = -jnp.mean(r) if self.target is None else jnp.mean(jnp.abs(r - self.target))
        return loss, {"reward": jnp.mean(r), "first_grad_step": first.astype(jnp.float32)}


@dataclasses.dataclass(frozen=True)
class ReFL(_RewardBackprop):
    """ReFL (Xu et al., NeurIPS 2023; THUDM/ImageReward ``ReFL.py``): sample without gradient up
    to step ``m ~ U{30..39}`` of 40, predict ``x0`` there with gradient, and minimise
    ``scale * mean(relu(threshold - r))`` (``scale = 1e-3``, ``threshold = 2``). For
    ``num_steps != 40`` the range scales: ``m = floor(U{30..39} * num_steps / 40)``. CFG 7.5
    (SD1.4 pipeline default; unverified).
    """

    num_steps: int = 40
    grad_step_range: tuple[int, int] = (30, 40)
    threshold: float = 2.0
    scale: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        lo, hi = self.grad_step_range
        if not 0 <= lo < hi <= 40:
            raise ValueError(f"grad_step_range={self.grad_step_range} (out of 40 steps) must satisfy 0 <= low < high <= 40")

    def loss(self, params: nnx.State, frozen: Frozen, batch: dict[str, Any],
             key: Array) -> tuple[Array, Metrics]:
        predict, predict_nograd = self.predictors(params, frozen, batch)
        times, times_next, step, to_x0 = self.solver()
        lo, hi = self.grad_step_range
        m = jax.random.randint(key, (), lo, hi) * self.num_steps // 40
        x0 = refl_prediction(predict, predict_nograd, batch["noise"], jnp.asarray(times), jnp.asarray(times_next),
                             step, to_x0, m)
        r = self.rewards(x0, batch)
        return refl_loss(r, self.threshold, self.scale), {"reward": jnp.mean(r), "grad_step": m.astype(jnp.float32)}
