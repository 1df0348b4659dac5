"""DPOK's learned value function ``V(x_t, c, t)``: the baseline of its policy gradient.

DPOK (Fan et al., "DPOK: Reinforcement Learning for Fine-tuning Text-to-Image Diffusion Models",
NeurIPS 2023; google-research/dpok ``train_online_pg.py``, ``reward_model.py ValueMulti``) uses
the advantage ``A = r - V(x_t, c, t)`` of each sampler transition, ``r`` the final image's
reward, with ``V`` a small network on the flattened latent ``x_t``, a text embedding ``c`` and the
step index ``t``, regressed onto the final reward by MSE with its own optimizer (AdamW, lr 1e-4,
256 transitions per update, 5 accumulated mini-batches per online iteration).

Here the value net is a separate model with its own train state: ``make_train_step(
ValueRegression(), optax.adamw(1e-4), mesh, model=value_net)``. One online DPOK iteration:

1. ``batch, x0 = dpok.rollout(policy, cond, noise, key)``; host rewards ``r`` ``[B]``.
2. ``value_state, _ = value_step(value_state, value_batch(batch, r, text), key)`` (the
   reference trains ``V`` before the policy, on a replay buffer of recent transitions; a caller
   may concatenate several rollouts' :func:`value_batch` rows the same way).
3. ``batch["advantages"] = value_advantages(value, batch, r, text)`` ``[B, K]`` (jit it with
   ``value = value_state.frozen.model(value_state.params)``), then the DPOK update(s) with
   ``DPOK(baseline="value")``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jdpt.parallel.step import Frozen

Array = jax.Array
Metrics = dict[str, Array]


class _StepScaledLinear(nnx.Module):
    """dpok ``ConditionalLinear``: ``(x W + b) * gamma[step]``, ``gamma`` ``[num_steps, out]``
    drawn from U[0, 1), ``W`` Xavier-normal."""

    def __init__(self, d_in: int, d_out: int, num_steps: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(d_in, d_out, kernel_init=nnx.initializers.xavier_normal(), rngs=rngs)
        self.gamma = nnx.Param(jax.random.uniform(rngs.params(), (num_steps, d_out)))

    def __call__(self, x: Array, step: Array) -> Array:
        return self.linear(x) * self.gamma[...][step]


class ValueNet(nnx.Module):
    """DPOK's value network (dpok ``ValueMulti``): ``concat(flatten(x_t), text)`` through
    ``depth`` step-scaled linear layers of width ``hidden`` with ReLU, then a linear layer to a
    scalar. Defaults are dpok's (3 layers of 256, 50 sampler steps).

    Args:
        state_size: number of elements of one state ``x_t`` (dpok: 4 x 64 x 64 SD latents).
        text_size: width of the text embedding (dpok: 768, the reward model's CLIP ViT-L/14 text
            features; the Shapes world: e.g. the pooled prompt embedding).
        num_steps: sampler steps (the step index ``t`` is in ``[0, num_steps)``).
    """

    def __init__(self, state_size: int, text_size: int, num_steps: int = 50, hidden: int = 256,
                 depth: int = 3, *, rngs: nnx.Rngs):
        if min(state_size, num_steps, hidden, depth) < 1 or text_size < 0:
            raise ValueError(f"ValueNet needs positive sizes; got state_size={state_size}, text_size={text_size}, "
                             f"num_steps={num_steps}, hidden={hidden}, depth={depth}")
        self.state_size, self.text_size, self.num_steps = state_size, text_size, num_steps
        sizes = [state_size + text_size] + [hidden] * depth
        self.layers = nnx.List([_StepScaledLinear(a, b, num_steps, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(hidden, 1, kernel_init=nnx.initializers.xavier_normal(), rngs=rngs)

    def __call__(self, x_t: Array, text: Array, step: Array) -> Array:
        """``x_t``: ``[B, ...]`` states; ``text``: ``[B, text_size]``; ``step``: ``[B]`` int step
        indices. Returns ``[B]`` fp32 values."""
        b = x_t.shape[0]
        if x_t.size != b * self.state_size or text.shape != (b, self.text_size) or step.shape != (b,):
            raise ValueError(f"ValueNet(state_size={self.state_size}, text_size={self.text_size}) got x_t "
                             f"{tuple(x_t.shape)}, text {tuple(text.shape)}, step {tuple(step.shape)}; expected "
                             f"[B, ...] with {self.state_size} elements per row, [B, {self.text_size}], [B]")
        h = jnp.concatenate([x_t.reshape(b, -1), text.astype(x_t.dtype)], axis=1).astype(jnp.float32)
        for layer in self.layers:
            h = jax.nn.relu(layer(h, step))
        return self.out(h)[:, 0]


def value_batch(batch: dict[str, Any], rewards: Array, text: Array) -> dict[str, Array]:
    """A rollout's transitions as value-regression rows (row ``b K + k`` = sample ``b``, step ``k``).

    Args:
        batch: a DDPO/DPOK rollout batch (``x_t`` ``[B, K, ...]``, recorded in step order).
        rewards: ``[B]`` final rewards; text: ``[B, D]`` per-sample text embeddings.
    Returns:
        ``{"x_t": [B K, ...], "text": [B K, D], "step": [B K] int32, "reward": [B K] fp32}``.
    """
    x_t = jnp.asarray(batch["x_t"])
    b, k = x_t.shape[:2]
    rewards, text = jnp.asarray(rewards, jnp.float32), jnp.asarray(text)
    if rewards.shape != (b,) or text.ndim != 2 or text.shape[0] != b:
        raise ValueError(f"value_batch needs rewards [B] and text [B, D] for B = {b} samples; got rewards "
                         f"{tuple(rewards.shape)}, text {tuple(text.shape)}")
    return {"x_t": x_t.reshape(b * k, *x_t.shape[2:]), "text": jnp.repeat(text, k, axis=0),
            "step": jnp.tile(jnp.arange(k, dtype=jnp.int32), b), "reward": jnp.repeat(rewards, k)}


def value_loss(value: ValueNet, rows: dict[str, Array]) -> tuple[Array, Metrics]:
    """dpok ``_train_value_func``: ``mean((V(x_t, text, step) - reward)²)`` over ``rows`` (a
    :func:`value_batch`). Returns ``(loss, {"value": mean V})``."""
    v = value(rows["x_t"], rows["text"], rows["step"])
    return jnp.mean((v - rows["reward"].astype(jnp.float32)) ** 2), {"value": jnp.mean(v)}


@dataclasses.dataclass(frozen=True)
class ValueRegression:
    """The value net's objective for ``make_train_step`` (model = a :class:`ValueNet`; batch = a
    :func:`value_batch`). dpok's optimizer: AdamW, lr 1e-4, 256 rows per mini-batch."""

    def loss(self, params: nnx.State, frozen: Frozen, batch: dict[str, Array],
             key: Array) -> tuple[Array, Metrics]:
        return value_loss(frozen.model(params), batch)


def value_advantages(value: ValueNet, batch: dict[str, Any], rewards: Array, text: Array) -> Array:
    """DPOK's advantages ``A[b, k] = r[b] - V(x_t[b, k], text[b], k)`` ``[B, K]`` fp32, without
    gradient, for ``batch["advantages"]`` of a ``DPOK(baseline="value")`` update (``batch``: the
    rollout batch with all ``K`` transitions in step order). Pure: jit it."""
    rows = value_batch(batch, rewards, text)
    v = jax.lax.stop_gradient(value(rows["x_t"], rows["text"], rows["step"]))
    b, k = jnp.shape(batch["x_t"])[:2]
    return (rows["reward"] - v).reshape(b, k)
